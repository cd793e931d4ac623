# SLIM-GK v1 epoch state (sans-IO): rosters and their diffs, per-sender hash
# ratchets (section 2.7) and application-message encryption and checks.
# One departure from section 2.7: a ratchet step is one keyed BLAKE2b-512 (message
# key || next chain key) instead of two HKDF-Expand calls, for speed; the roots
# of the chains still come from the HKDF key schedule.
from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from ._e2e_base import (
    LABEL_APP_AAD,
    LABEL_APP_SIG,
    MAX_OBJECT,
    MAX_SUBJECT,
    U32,
    U64,
    VERSION,
    E2EError,
    Rng,
    _refuse_ext,
    aead_decrypt,
    aead_encrypt,
    as_bin,
    as_int,
    as_list,
    as_map,
    as_str,
    pack_sorted,
    ratchet,
    unpack,
    verify_signature,
    wipe,
)
from ._e2e_identity import SigningIdentity


class Member:
    """A roster entry: subject, Ed25519 signing key and current X25519 envelope key."""

    __slots__ = ("enc_pk", "spk", "sub")

    def __init__(self, sub: str, spk: bytes, enc_pk: bytes) -> None:
        self.sub = sub
        self.spk = spk
        self.enc_pk = enc_pk


Roster = dict[int, Member]


def wire_roster(roster: Roster) -> list[list[Any]]:
    return [[leaf, m.sub, m.spk, m.enc_pk] for leaf, m in sorted(roster.items())]


def member_of(entry: object, what: str) -> tuple[int, Member]:
    e = as_list(entry, what, 4)
    if len(e) != 4:
        raise E2EError("malformed", f"{what}: expected [leaf, sub, spk, enc_pk]")
    return as_int(e[0], what), Member(as_str(e[1], what, MAX_SUBJECT), as_bin(e[2], what, 32),
                                      as_bin(e[3], what, 32))


def _bad_commit(why: str) -> E2EError:
    return E2EError("bad_commit", why)


def next_roster(roster: Roster, op: str, target: object, diff: dict[str, Any],
                ) -> tuple[Roster, set[int]]:
    """Apply a commit's diff to a copy of ``roster``: (new roster, removed leaves).

    v1 commits add or remove exactly one member (``target``) or refresh (no target).
    """
    out = dict(roster)
    adds = as_list(diff.get("add"), "diff.add")
    rms = as_list(diff.get("rm"), "diff.rm")
    upds = as_list(diff.get("upd"), "diff.upd")
    shape_ok = {"add": len(adds) == 1 and not rms, "remove": len(rms) == 1 and not adds,
                "refresh": not adds and not rms and target is None}.get(op, False)
    if not shape_ok:
        raise _bad_commit(f"diff does not match op {op!r}")
    gone: set[int] = set()
    for r in rms:
        leaf = as_int(r, "diff.rm")
        m = out.pop(leaf, None)
        if leaf == 0 or m is None or m.sub != target:
            raise _bad_commit(f"cannot remove leaf {leaf} ({target!r})")
        gone.add(leaf)
    for u in upds:
        pair = as_list(u, "diff.upd", 2)
        if len(pair) != 2:
            raise E2EError("malformed", "diff.upd: expected [leaf, enc_pk]")
        leaf, pk = as_int(pair[0], "diff.upd"), as_bin(pair[1], "diff.upd", 32)
        m = out.get(leaf)
        if m is None:
            raise _bad_commit(f"update of an empty leaf {leaf}")
        out[leaf] = Member(m.sub, m.spk, pk)
    subs = {m.sub for m in out.values()}
    for a in adds:
        leaf, m = member_of(a, "diff.add")
        if leaf in out or m.sub in subs or m.sub != target:
            raise _bad_commit(f"cannot add {m.sub!r} at leaf {leaf}")
        out[leaf] = m
    return out, gone


#: Spacing of the chain keys a receiver remembers ahead of its position.
CHECKPOINT_EVERY = 64


class Chain:
    """One sender's hash ratchet: the chain key of generation ``n`` and skipped keys."""

    __slots__ = ("ahead", "key", "n", "skipped")

    def __init__(self, key: bytearray) -> None:
        self.key = key
        self.n = 0
        # Message keys are bytes (PyNaCl takes bytes): dropped, not overwritten.
        self.skipped: dict[int, bytes] = {}
        # Chain keys of future generations already derived once (every 64th), so that
        # forged far-ahead headers cannot make us re-derive up to 1000 steps each time.
        # They are no older than ``key``: forward secrecy is unchanged.
        self.ahead: dict[int, bytes] = {}

    def advance(self, key: bytes, n: int) -> None:
        self.key[:] = key
        self.n = n
        if self.ahead:
            for g in [g for g in self.ahead if g < n]:
                del self.ahead[g]

    def wipe(self) -> None:
        wipe(self.key)
        self.skipped.clear()
        self.ahead.clear()


class Epoch:
    """Receive state of one epoch: its roster and every other sender's chain."""

    __slots__ = ("auth", "chains", "expires", "number", "roster")

    def __init__(self, number: int, roster: Roster, chains: dict[int, Chain], auth: bytes) -> None:
        self.number = number
        self.roster = roster
        self.chains = chains
        self.auth = auth
        self.expires = float("inf")

    def wipe(self) -> None:
        for c in self.chains.values():
            c.wipe()
        self.chains.clear()


# -- application messages ---------------------------------------------------------------


def app_aad(group_id: bytes, epoch: int, leaf: int, g: int, aad: bytes) -> bytes:
    # canonical([...]): no maps inside, so plain packing is canonical.
    return pack_sorted([LABEL_APP_AAD, group_id, epoch, leaf, g,
                        aad if type(aad) is bytes else bytes(aad)])


def seal_app(chain: Chain, identity: SigningIdentity | None, *, group_id: bytes, epoch: int,
             leaf: int, plaintext: bytes, aad: bytes, rng: Rng) -> bytes:
    """Encrypt with the next generation of our own chain (signed unless ``identity`` is None)."""
    g = chain.n
    if g > U32:
        raise ValueError("generation space exhausted: the moderator must refresh")
    key, chain.key[:] = ratchet(chain.key, g)
    chain.n = g + 1
    full_aad = app_aad(group_id, epoch, leaf, g, aad)
    if identity is not None:
        pt = pack_sorted({"b": plaintext,
                          "sig": identity.sign(LABEL_APP_SIG, full_aad + plaintext)})
    else:
        pt = b"\x81\xa1b" + msgpack.packb(plaintext)  # {"b": plaintext}, canonical
    iv = rng(24)
    ct = aead_encrypt(pt, full_aad, iv, key)
    # Keys already in sorted order: this is the canonical encoding.
    return pack_sorted({"ct": ct, "e": epoch, "g": group_id, "iv": iv, "k": "app", "n": g,
                        "s": leaf, "v": VERSION})


class AppHeader(NamedTuple):
    """The clear part of an application message."""

    group_id: bytes
    epoch: int
    leaf: int
    g: int
    iv: bytes
    ct: bytes


def _unpack_flat(data: bytes, what: str) -> dict[str, Any]:
    # Hot path: the fields read are type-checked one by one, so the deep walk of
    # unpack() is not needed; ext types and non-string keys are still refused.
    if type(data) is not bytes or len(data) > MAX_OBJECT:
        return as_map(unpack(data, what), what)
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except E2EError:
        raise
    except Exception as exc:  # msgpack signals bad input with many exception types
        raise E2EError("malformed", f"{what}: {type(exc).__name__}") from exc
    if type(d) is not dict:
        raise E2EError("malformed", f"{what}: expected a map")
    return d


def parse_app(data: bytes) -> AppHeader:
    d = _unpack_flat(data, "app")
    get = d.get
    g, e, s, n, iv, ct = get("g"), get("e"), get("s"), get("n"), get("iv"), get("ct")
    if (get("v") == VERSION and type(get("v")) is int and get("k") == "app"
            and type(g) is bytes and len(g) == 16 and type(e) is int and 0 <= e <= U64
            and type(s) is int and 0 <= s <= U32 and type(n) is int and 0 <= n <= U32
            and type(iv) is bytes and len(iv) == 24 and type(ct) is bytes):
        return AppHeader(g, e, s, n, iv, ct)  # well formed: the common case
    version = d.get("v")
    if type(version) is not int:
        raise E2EError("malformed", "app: no version")
    if version != VERSION:
        raise E2EError("unsupported_version", f"app v{version}")
    if d.get("k") != "app":
        raise E2EError("malformed", "not an app message")
    return AppHeader(as_bin(d.get("g"), "app.g", 16), as_int(d.get("e"), "app.e", 0, U64),
                     as_int(d.get("s"), "app.s"), as_int(d.get("n"), "app.n"),
                     as_bin(d.get("iv"), "app.iv", 24), as_bin(d.get("ct"), "app.ct"))


def open_app(chain: Chain, sender: Member, h: AppHeader, aad: bytes, *, signed: bool,
             max_forward: int, max_skipped: int) -> bytes:
    """Steps 3-7 of section 2.7 for a message whose epoch and sender passed: window,
    key, AEAD, signature; the chain moves only once everything verified (a failure
    at most leaves checkpoints of derived future chain keys behind)."""
    n = h.g
    fresh: list[tuple[int, bytes]] = []
    nxt = b""
    if n < chain.n:
        opt = chain.skipped.get(n)
        if opt is None:
            raise E2EError("replay", f"generation {n} used or dropped", sender=sender.sub)
        key = opt
    elif n == chain.n:  # the next one, in order: the common case
        key, nxt = ratchet(chain.key, n)
    elif n - chain.n > max_forward:
        raise E2EError("too_far_ahead", f"generation {n}, expected {chain.n}", sender=sender.sub)
    else:
        key, nxt, fresh = _ratchet(chain, n, max_skipped)
    full_aad = app_aad(h.group_id, h.epoch, h.leaf, n, aad)
    pt = aead_decrypt(h.ct, full_aad, h.iv, key)
    if pt is None:
        raise E2EError("bad_tag", "header or body altered", sender=sender.sub)
    p = _unpack_flat(pt, "app.pt")
    body = p.get("b")
    if type(body) is not bytes:
        raise E2EError("malformed", "app.b: expected bytes")
    if signed:
        sig = p.get("sig")
        if type(sig) is not bytes or not verify_signature(sender.spk, LABEL_APP_SIG,
                                                            full_aad + body, sig):
            raise E2EError("bad_signature", f"not signed by leaf {h.leaf}", sender=sender.sub)
    if n < chain.n:
        del chain.skipped[n]
    else:
        chain.advance(nxt, n + 1)
        if fresh:
            chain.skipped.update(fresh)
            while len(chain.skipped) > max_skipped:
                del chain.skipped[min(chain.skipped)]
    return body


def _ratchet(chain: Chain, n: int, max_skipped: int,
             ) -> tuple[bytes, bytes, list[tuple[int, bytes]]]:
    # Derive on a copy: a forged message must not move or burn the chain.
    keep_from = n - max_skipped
    start, ck = chain.n, bytes(chain.key)
    near = [g for g in chain.ahead if start < g <= max(keep_from, start)]
    if near:
        start = max(near)
        ck = chain.ahead[start]
    skipped = []
    for i in range(start, n):
        if i % CHECKPOINT_EVERY == 0 and i > chain.n:
            chain.ahead[i] = ck
        if i >= keep_from:  # older keys would be evicted at once: not derived
            key, ck = ratchet(ck, i)
            skipped.append((i, key))
        else:
            ck = ratchet(ck, i)[1]
    key, ck = ratchet(ck, n)
    return key, ck, skipped
