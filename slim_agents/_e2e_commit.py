# SLIM-GK v1 membership wire objects (sans-IO): building and opening commits,
# per-recipient envelopes and Welcomes (sections 2.5, 2.6 and 2.11). The group
# state in _e2e.py decides what to build and when to apply.
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Final

from ._e2e_base import (
    LABEL_COMMIT,
    LABEL_ENV,
    LABEL_WELCOME,
    MAX_TOKEN,
    U64,
    E2EError,
    EpochSecrets,
    Rng,
    as_bin,
    as_int,
    as_list,
    as_map,
    as_str,
    canonical,
    confirmation_tag,
    epoch_context,
    extract,
    key_schedule,
    open_signed,
    seal,
    seal_open,
    seal_signed,
    sha256,
    unpack,
    verify_signature,
    wipe,
)
from ._e2e_epoch import Roster, member_of, roster_digest, wire_roster
from ._e2e_identity import KeyPackage, KeyPackageSecret, SigningIdentity

#: Rosters up to this size get their envelopes inside the commit (section 2.6).
INLINE_ENVELOPES: Final = 64
#: Largest sealed 32-byte secret (48 bytes of sealed-box overhead), with room.
MAX_SEALED: Final = 256


def bad_commit(why: str) -> E2EError:
    return E2EError("bad_commit", why)


def bad_welcome(why: str) -> E2EError:
    return E2EError("bad_welcome", why)


# -- commits (moderator side) ------------------------------------------------------------


@dataclass(slots=True)
class BuiltCommit:
    commit: bytes
    envelopes: dict[str, bytes]  # subject -> envelope, above INLINE_ENVELOPES members
    joiner: bytearray  # for the Welcome of an add; the caller wipes it
    th: bytes
    conf: bytes
    secrets: EpochSecrets


def build_commit(identity: SigningIdentity, *, group_id: bytes, cid: int, epoch: int,
                 th_prev: bytes, init_secret: bytearray, roster: Roster, own_leaf: int, op: str,
                 target: str | None, diff: dict[str, Any], fresh: bool, rng: Rng) -> BuiltCommit:
    """A signed commit from ``epoch`` to ``epoch + 1`` and the new epoch's secrets.

    ``fresh`` draws a new commit secret sealed to every other member (remove,
    refresh); otherwise it is zero and members need no envelope (path-less add).
    """
    e_to = epoch + 1
    rh = roster_digest(roster)
    secret = bytearray(rng(32)) if fresh else bytearray(32)
    sealed = [(leaf, seal(m.enc_pk, bytes(secret), rng))
              for leaf, m in sorted(roster.items()) if fresh and leaf != own_leaf]
    inline = len(roster) <= INLINE_ENVELOPES
    core = {"g": group_id, "cid": cid, "e_from": epoch, "e_to": e_to, "op": op,
            "target": target, "diff": diff, "roster_hash": rh, "th_prev": th_prev,
            "env": sealed if fresh and inline else None,
            "env_root": sha256(canonical(sealed)) if fresh and not inline else None}
    # The transcript covers the commit without its tag; the tag then confirms it.
    th = sha256(th_prev, canonical(core))
    joiner = bytearray(extract(init_secret, secret))
    wipe(secret)
    secrets = key_schedule(joiner, epoch_context(group_id, e_to, rh, th))
    conf = confirmation_tag(secrets.confirm_key, th)
    tbs = canonical({**core, "conf": conf})
    commit = seal_signed("commit", tbs, identity.sign(LABEL_COMMIT, tbs))
    envelopes: dict[str, bytes] = {}
    if fresh and not inline:
        commit_hash = sha256(tbs)
        for leaf, s in sealed:
            etbs = canonical({"g": group_id, "e_to": e_to, "cid": cid, "leaf": leaf,
                              "commit_hash": commit_hash, "sealed": s})
            envelopes[roster[leaf].sub] = seal_signed("env", etbs, identity.sign(LABEL_ENV, etbs))
    return BuiltCommit(commit, envelopes, joiner, th, conf, secrets)


# -- commits and envelopes (member side) ------------------------------------------------


def open_commit(commit: bytes, mod_spk: bytes, group_id: bytes) -> tuple[bytes, dict[str, Any],
                                                                          int]:
    """Check a commit's signature and group: (tbs, decoded tbs, commit id)."""
    tbs, sig = open_signed(commit, "commit")
    if not verify_signature(mod_spk, LABEL_COMMIT, tbs, sig):
        raise bad_commit("not signed by the moderator")
    d = as_map(unpack(tbs, "commit.tbs"), "commit.tbs")
    if as_bin(d.get("g"), "commit.g", 16) != group_id:
        raise bad_commit("for another group")
    return tbs, d, as_int(d.get("cid"), "commit.cid")


def commit_transcript(th_prev: bytes, d: dict[str, Any]) -> bytes:
    return sha256(th_prev, canonical({k: v for k, v in d.items() if k != "conf"}))


@dataclass(frozen=True, slots=True)
class Envelope:
    cid: int
    e_to: int
    commit_hash: bytes
    sealed: bytes


def open_envelope(envelope: bytes, mod_spk: bytes, group_id: bytes, leaf: int) -> Envelope:
    tbs, sig = open_signed(envelope, "env")
    if not verify_signature(mod_spk, LABEL_ENV, tbs, sig):
        raise bad_commit("envelope not signed by the moderator")
    d = as_map(unpack(tbs, "env.tbs"), "env.tbs")
    if as_bin(d.get("g"), "env.g", 16) != group_id:
        raise bad_commit("envelope for another group")
    if as_int(d.get("leaf"), "env.leaf") != leaf:
        raise bad_commit("envelope for another member")
    return Envelope(as_int(d.get("cid"), "env.cid"), as_int(d.get("e_to"), "env.e_to", 0, U64),
                    as_bin(d.get("commit_hash"), "env.commit_hash", 32),
                    as_bin(d.get("sealed"), "env.sealed", None, MAX_SEALED))


def inline_envelope(env: object, leaf: int) -> bytes:
    for entry in as_list(env, "commit.env"):
        pair = as_list(entry, "commit.env", 2)
        if len(pair) == 2 and pair[0] == leaf:
            return as_bin(pair[1], "commit.env", None, MAX_SEALED)
    raise bad_commit("no envelope for us")


# -- welcomes ---------------------------------------------------------------------------


def build_welcome(identity: SigningIdentity, kp: KeyPackage, *, group_id: bytes, epoch: int,
                  cid: int, leaf: int, roster: Roster, joiner: bytearray, th: bytes,
                  conf: bytes, mod_tok: str, settings: dict[str, Any], rng: Rng) -> bytes:
    payload = canonical({
        "joiner_secret": joiner, "roster": wire_roster(roster), "th": th, "conf": conf,
        "mod_spk": identity.public_key, "mod_tok": mod_tok, "leaf": leaf, "settings": settings})
    tbs = canonical({"g": group_id, "e": epoch, "cid": cid, "kp_ref": kp.ref,
                     "sealed": seal(kp.init, payload, rng)})
    return seal_signed("welcome", tbs, identity.sign(LABEL_WELCOME, tbs))


@dataclass(slots=True)
class OpenedWelcome:
    group_id: bytes
    epoch: int
    cid: int
    leaf: int
    roster: Roster
    th: bytes
    mod_spk: bytes
    mod_tok: str
    settings: dict[str, Any]
    secrets: EpochSecrets


def open_welcome(welcome: bytes, kp_secret: KeyPackageSecret,
                 identity: SigningIdentity) -> OpenedWelcome:
    """Open and check a Welcome (all but the moderator's credential)."""
    if kp_secret.init_sk is None:
        raise bad_welcome("key package already used")
    tbs, sig = open_signed(welcome, "welcome")
    d = as_map(unpack(tbs, "welcome.tbs"), "welcome.tbs")
    if as_bin(d.get("kp_ref"), "welcome.kp_ref", 32) != kp_secret.ref:
        raise bad_welcome("for another key package")
    plain = seal_open(as_bin(d.get("sealed"), "welcome.sealed"), kp_secret.init_pk,
                      kp_secret.init_sk)
    if plain is None:
        raise bad_welcome("cannot open")
    p = as_map(unpack(plain, "welcome.sealed"), "welcome.sealed")
    mod_spk = as_bin(p.get("mod_spk"), "welcome.mod_spk", 32)
    # The sealed box is anonymous: the moderator's signature is what authenticates it.
    if not verify_signature(mod_spk, LABEL_WELCOME, tbs, sig):
        raise bad_welcome("bad signature")
    leaf = as_int(p.get("leaf"), "welcome.leaf")
    roster: Roster = {}
    for entry in as_list(p.get("roster"), "welcome.roster"):
        n, m = member_of(entry, "welcome.roster")
        if n in roster or any(x.sub == m.sub for x in roster.values()):
            raise bad_welcome("duplicate roster entry")
        roster[n] = m
    mod, me = roster.get(0), roster.get(leaf)
    if mod is None or mod.spk != mod_spk:
        raise bad_welcome("moderator not at leaf 0")
    if me is None or me.spk != identity.public_key or me.enc_pk != kp_secret.enc_pk:
        raise bad_welcome("our leaf does not hold our keys")
    group_id = as_bin(d.get("g"), "welcome.g", 16)
    epoch = as_int(d.get("e"), "welcome.e", 0, U64)
    th = as_bin(p.get("th"), "welcome.th", 32)
    secrets = key_schedule(as_bin(p.get("joiner_secret"), "welcome.joiner_secret", 32),
                           epoch_context(group_id, epoch, roster_digest(roster), th))
    if not hmac.compare_digest(confirmation_tag(secrets.confirm_key, th),
                               as_bin(p.get("conf"), "welcome.conf", 32)):
        secrets.wipe()
        raise bad_welcome("confirmation tag")
    return OpenedWelcome(group_id, epoch, as_int(d.get("cid"), "welcome.cid"), leaf, roster, th,
                         mod_spk, as_str(p.get("mod_tok"), "welcome.mod_tok", MAX_TOKEN),
                         as_map(p.get("settings", {}), "welcome.settings"), secrets)
