"""Known-answer vectors for SLIM-GK v1 (slim_agents._e2e), from a seeded RNG.

    .venv/bin/python -m tests.slim_agents.make_e2e_vectors          # rewrite the JSON
    .venv/bin/python -m tests.slim_agents.make_e2e_vectors --check  # compare only

test_e2e.py checks every value and that regenerating gives the same file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from node_lite import Identity
from slim_agents import _e2e_base as base
from slim_agents._e2e import GroupState, SigningIdentity, make_key_package

PATH = Path(__file__).with_name("e2e_vectors.json")
NOW = 1_700_000_000.0


class SeededRng:
    """Deterministic bytes: SHA-256(seed || counter) blocks; every call starts a new block."""

    def __init__(self, seed: str) -> None:
        self._seed = seed.encode()
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        return out[:n]


def kat_token(subject: str, identity: SigningIdentity) -> str:
    """A test token: the claims in clear (kat_verify accepts any such token)."""
    claims = {"sub": subject, **identity.pubkey_claim()}
    return "kat." + base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode()).decode()


def kat_verify(token: str) -> Identity:
    claims = json.loads(base64.urlsafe_b64decode(token.removeprefix("kat.")))
    return Identity(subject=claims.pop("sub"), issued_at=0.0, expires_at=float("inf"),
                    claims=claims, token=token)


def h(b: bytes | bytearray) -> str:
    return bytes(b).hex()


def tagged(obj: Any) -> Any:
    """JSON form of a msgpack value: bytes become {"bin": hex}."""
    if isinstance(obj, bytes):
        return {"bin": obj.hex()}
    if isinstance(obj, dict):
        return {"map": {k: tagged(v) for k, v in obj.items()}}
    if isinstance(obj, list):
        return [tagged(x) for x in obj]
    return obj


def untagged(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "bin" in obj:
            return bytes.fromhex(obj["bin"])
        return {k: untagged(v) for k, v in obj["map"].items()}
    if isinstance(obj, list):
        return [untagged(x) for x in obj]
    return obj


CANONICAL_INPUTS: list[Any] = [
    0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -1, -32, -33, -129,
    "", "slim-gk/v1", "é", b"", b"\x00\x01", True, False, None,
    {"z": 1, "a": [1, 2, {"y": b"\xff", "b": None}], "m": "x"},
    ["slim-gk/v1", "sender", (3).to_bytes(4, "big"), 32],
]


def hkdf_vectors(rng: SeededRng) -> list[dict[str, Any]]:
    out = []
    for label, ctx, length in [("epoch", rng(40), 32), ("enc", b"", 32), ("confirm", b"", 32),
                               ("init", b"", 32), ("exporter", b"", 32),
                               ("authenticator", b"", 16), ("sender", base.u32(3), 32),
                               ("key", base.u32(7), 32), ("chain", base.u32(7), 32),
                               ("long", b"ctx", 80)]:
        secret = rng(32)
        out.append({"secret": h(secret), "label": label, "ctx": h(ctx), "length": length,
                    "info": h(base.expand_info(label, ctx, length)),
                    "out": h(base.expand(secret, label, ctx, length))})
    return out


def schedule_vectors(rng: SeededRng) -> list[dict[str, Any]]:
    group_id = rng(16)
    init = bytes(32)  # epoch 0 starts from a zero salt
    th = rng(32)
    out = []
    for epoch in range(4):
        commit_secret = rng(32) if epoch != 2 else bytes(32)  # epoch 2: a path-less add
        roster_hash = rng(32)
        th = base.sha256(th, rng(64))
        joiner = base.extract(init, commit_secret)
        ctx = base.epoch_context(group_id, epoch, roster_hash, th)
        s = base.key_schedule(joiner, ctx)
        out.append({"group_id": h(group_id), "epoch": epoch, "init_secret_prev": h(init),
                    "commit_secret": h(commit_secret), "joiner_secret": h(joiner),
                    "roster_hash": h(roster_hash), "transcript_hash": h(th), "ctx": h(ctx),
                    "epoch_secret": h(s.epoch_secret), "enc_secret": h(s.enc_secret),
                    "confirm_key": h(s.confirm_key), "init_secret": h(s.init_secret),
                    "exporter_secret": h(s.exporter_secret), "authenticator": h(s.authenticator),
                    "confirmation_tag": h(base.confirmation_tag(s.confirm_key, th))})
        init = bytes(s.init_secret)
    return out


def ratchet_vectors(rng: SeededRng) -> dict[str, Any]:
    enc_secret = rng(32)
    leaf = 5
    chain = bytes(base.sender_root(enc_secret, leaf))
    keys, chains = {}, {}
    for g in range(1001):
        key, following = base.ratchet(chain, g)
        if g <= 10 or g == 1000:
            keys[str(g)] = h(key)
            chains[str(g)] = h(chain)
        chain = following
    return {"enc_secret": h(enc_secret), "leaf": leaf,
            "root": h(base.sender_root(enc_secret, leaf)), "chain": chains, "key": keys}


def seal_vector(rng: SeededRng) -> dict[str, Any]:
    sk, pk = base.x25519_keypair(rng)
    message = rng(32)
    seed = "seal-ephemeral"
    return {"recipient_sk": h(sk), "recipient_pk": h(pk), "message": h(message),
            "rng_seed": seed, "sealed": h(base.seal(pk, message, SeededRng(seed)))}


def group_vectors() -> dict[str, Any]:
    """A moderator adds A and B, removes A, refreshes, then sends one message."""
    mod_id = SigningIdentity.generate(SeededRng("mod-identity"))
    mod = GroupState.create(mod_id, kat_token("mod", mod_id), "mod", NOW,
                            rng=SeededRng("mod-group"))
    steps: list[dict[str, Any]] = [{"op": "create", "epoch": mod.epoch,
                                    "authenticator": h(mod.epoch_authenticator)}]
    kps = {}
    for sub in ("alice", "bob"):
        ident = SigningIdentity.generate(SeededRng(f"{sub}-identity"))
        kp, _ = make_key_package(ident, kat_token(sub, ident), sub, NOW,
                                 rng=SeededRng(f"{sub}-kp"))
        kps[sub] = {"identity_seed": h(ident.seed), "rng_seed": f"{sub}-kp",
                    "token": kat_token(sub, ident), "key_package": h(kp),
                    "ref": h(base.sha256(kp))}
        commit, welcome = mod.add(kp, kat_verify, NOW)
        steps.append({"op": "add", "target": sub, "commit": h(commit) if commit else None,
                      "welcome": h(welcome), "epoch": mod.epoch,
                      "authenticator": h(mod.epoch_authenticator)})
    commit, envelopes = mod.remove("alice", NOW)
    assert not envelopes
    steps.append({"op": "remove", "target": "alice", "commit": h(commit), "epoch": mod.epoch,
                  "authenticator": h(mod.epoch_authenticator)})
    commit, envelopes = mod.refresh(NOW)
    steps.append({"op": "refresh", "commit": h(commit), "epoch": mod.epoch,
                  "authenticator": h(mod.epoch_authenticator)})
    aad = base.canonical({"src": "org/ns/mod", "mid": 7})
    message = mod.encrypt(b"known answer", aad)
    return {"now": NOW, "moderator": {"identity_seed": h(mod_id.seed),
                                      "spk": h(mod_id.public_key), "group_rng_seed": "mod-group",
                                      "group_id": h(mod.group_id)},
            "key_packages": kps, "steps": steps,
            "message": {"aad": h(aad), "plaintext": h(b"known answer"), "bytes": h(message),
                        "sender": "mod"}}


def build() -> dict[str, Any]:
    rng = SeededRng("slim-gk/v1 vectors")
    return {
        "version": 1,
        "rfc5869_note": "HKDF itself is checked against RFC 5869 in test_e2e.py",
        "hkdf_expand": hkdf_vectors(rng),
        "canonical": [{"value": tagged(v), "bytes": h(base.canonical(v))}
                      for v in CANONICAL_INPUTS],
        "key_schedule": schedule_vectors(rng),
        "sender_ratchet": ratchet_vectors(rng),
        "seal": seal_vector(rng),
        "group": group_vectors(),
    }


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        same = PATH.exists() and PATH.read_text() == text
        print("vectors match" if same else f"{PATH} differs from a fresh generation")
        return 0 if same else 1
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
