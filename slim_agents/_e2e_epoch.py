# SLIM-GK v1 epoch state (sans-IO): rosters and their diffs, per-sender hash
# ratchets (section 2.7) and application-message encryption and checks.
# One departure from section 2.7: a ratchet step is one keyed BLAKE2b-512 (message
# key || next chain key) instead of two HKDF-Expand calls, for speed; the roots
# of the chains still come from the HKDF key schedule.
# Application messages are written in their canonical msgpack by hand, and read
# by a fast path when laid out that way; any other encoding goes to the full
# decoder, and both give the same answer (tests/slim_agents/test_e2e_fastpath.py).
from __future__ import annotations

import re
from typing import Any, Final, NamedTuple

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
    as_bin,
    as_int,
    as_list,
    as_map,
    as_str,
    bin_header,
    pack_uint,
    ratchet,
    ratchet_open,
    ratchet_seal,
    sha256,
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


def roster_digest(roster: Roster) -> bytes:
    """SHA-256 of the canonical roster ``[[leaf, sub, spk, enc_pk], ...]`` by leaf.

    Every member hashes it at every commit. Members hold checked types (:func:`member_of`
    checks what comes off the wire), and lists of ints, strings and bytes are canonical
    as msgpack packs them, so no canonical walk is needed.
    """
    return sha256(msgpack.packb(wire_roster(roster), use_bin_type=True))


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
    """One sender's hash ratchet: the chain key of generation ``n`` and skipped keys;
    ``layout``, when known, the fixed bytes of that sender's messages in that epoch."""

    __slots__ = ("ahead", "key", "layout", "n", "skipped")

    def __init__(self, key: bytearray, layout: AppLayout | None = None) -> None:
        self.key = key
        self.layout = layout
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
        self.layout = None  # a wiped send chain seals nothing more
        self.skipped.clear()
        self.ahead.clear()


class Epoch:
    """Receive state of one epoch: its roster and every other sender's chain.

    A chain starts at its sender's first message in the epoch (most members of a large
    group send nothing in most epochs); until then its root waits in ``roots``, and
    starting the chain wipes the root there.
    """

    __slots__ = ("auth", "chains", "expires", "number", "roots", "roster", "slots")

    def __init__(self, number: int, roster: Roster, roots: bytearray, auth: bytes) -> None:
        self.number = number
        self.roster = roster
        self.roots = roots  # the root of the i-th leaf of ``roster`` at [32 * i, 32 * i + 32]
        self.slots = {leaf: 32 * i for i, leaf in enumerate(roster)}
        self.chains: dict[int, Chain] = {}
        self.auth = auth
        self.expires = float("inf")

    def chain(self, leaf: int) -> Chain:
        """The receive chain of the member at ``leaf`` (in the roster)."""
        c = self.chains.get(leaf)
        if c is None:
            c = self.chains[leaf] = self.take(leaf)
        return c

    def take(self, leaf: int) -> Chain:
        """Start ``leaf``'s chain from its root, wiped here (it leaves the epoch)."""
        at = self.slots.pop(leaf)
        chain = Chain(self.roots[at:at + 32])
        self.roots[at:at + 32] = bytes(32)
        return chain

    def wipe(self) -> None:
        wipe(self.roots)
        self.slots.clear()
        for c in self.chains.values():
            c.wipe()
        self.chains.clear()


# -- application messages ---------------------------------------------------------------


class AppLayout:
    """The bytes of an application message fixed for one sender in one epoch.

    ``aad``: ``canonical([label, group_id, epoch, leaf, g, aad])`` up to ``g``; ``head``:
    the canonical header from ``"e"`` up to the iv bytes; ``tail``: from ``"s"`` to the end.
    """

    __slots__ = ("aad", "epoch", "group_id", "head", "leaf", "tail")

    def __init__(self, group_id: bytes, epoch: int, leaf: int) -> None:
        self.group_id = group_id
        self.epoch = epoch
        self.leaf = leaf
        gid: bytes = msgpack.packb(group_id, use_bin_type=True)
        label: bytes = msgpack.packb(LABEL_APP_AAD)
        self.aad = b"\x96" + label + gid + pack_uint(epoch) + pack_uint(leaf)
        self.head = b"\xa1e" + pack_uint(epoch) + b"\xa1g" + gid + b"\xa2iv\xc4\x18"
        self.tail = b"\xa1s" + pack_uint(leaf) + b"\xa1v" + pack_uint(VERSION)

    def full_aad(self, packed_g: bytes, aad: bytes) -> bytes:
        """``canonical([label, group_id, epoch, leaf, g, aad])``: what the AEAD and the
        signature of message ``g`` bind (``packed_g``: ``pack_uint(g)``, which the
        header holds too)."""
        return b"".join((self.aad, packed_g, bin_header(len(aad)), aad))


def _layout(chain: Chain, group_id: bytes, epoch: int, leaf: int) -> AppLayout:
    """The chain's layout, made at its first message (kept: the chain's messages share it)."""
    lay = chain.layout
    if lay is None or lay.leaf != leaf or lay.epoch != epoch or lay.group_id != group_id:
        lay = chain.layout = AppLayout(group_id, epoch, leaf)
    return lay


def app_aad(group_id: bytes, epoch: int, leaf: int, g: int, aad: bytes) -> bytes:
    """``canonical([label, group_id, epoch, leaf, g, aad])``."""
    return AppLayout(group_id, epoch, leaf).full_aad(pack_uint(g), aad)


_CT: Final = b"\x88\xa2ct"
_K_N: Final = b"\xa1k\xa3app\xa1n"
_SIG64: Final = b"\xa3sig\xc4\x40"


def seal_app(chain: Chain, identity: SigningIdentity | None, *, group_id: bytes, epoch: int,
             leaf: int, plaintext: bytes, aad: bytes, rng: Rng) -> bytes:
    """Encrypt with the next generation of our own chain (signed unless ``identity`` is None)."""
    _layout(chain, group_id, epoch, leaf)
    return seal_next(chain, identity, plaintext, aad, rng)


def seal_next(chain: Chain, identity: SigningIdentity | None, plaintext: bytes, aad: bytes,
              rng: Rng) -> bytes:
    """:func:`seal_app` with the chain's own layout: the send chain of the current epoch,
    whose layout is set when the epoch is installed (and dropped when it is wiped)."""
    lay = chain.layout
    if lay is None:
        raise E2EError("not_member", "removed from the group")
    g = chain.n
    if g > U32:
        raise ValueError("generation space exhausted: the moderator must refresh")
    packed_g = pack_uint(g)
    full_aad = lay.full_aad(packed_g, aad)
    # The canonical encodings, written out: {"b": plaintext[, "sig": sig]}, then the header.
    if identity is not None:
        sig = identity.sign(LABEL_APP_SIG, full_aad + plaintext)
        pt = b"".join((b"\x82\xa1b", bin_header(len(plaintext)), plaintext,
                       b"\xa3sig", bin_header(len(sig)), sig))
    else:
        pt = b"\x81\xa1b" + bin_header(len(plaintext)) + plaintext
    iv = rng(24)
    chain.n = g + 1  # with the key, which ratchet_seal moves first: g is spent even on error
    ct = ratchet_seal(chain.key, g, pt, full_aad, iv)
    return b"".join((_CT, bin_header(len(ct)), ct, lay.head, iv, _K_N, packed_g, lay.tail))


class AppHeader(NamedTuple):
    """The clear part of an application message."""

    group_id: bytes
    epoch: int
    leaf: int
    g: int
    iv: bytes
    ct: bytes


#: :class:`AppHeader` as a plain tuple (the hot path skips building the named one).
AppFields = tuple[bytes, int, int, int, bytes, bytes]


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


# The canonical header after "ct" (as seal_app writes it, ints of any width): one
# pattern match in C instead of a decode and eight type checks. Per int, the groups
# hold a one-byte value (fixint or uint8), a uint16, a uint32 (and for "e" a uint64).
_APP_REST: Final = re.compile(
    rb"\xa1e(?:(?:\xcc|(?=[\x00-\x7f]))(.)|\xcd(..)|\xce(.{4})|\xcf(.{8}))"
    rb"\xa1g\xc4\x10(.{16})\xa2iv\xc4\x18(.{24})\xa1k\xa3app"
    rb"\xa1n(?:(?:\xcc|(?=[\x00-\x7f]))(.)|\xcd(..)|\xce(.{4}))"
    rb"\xa1s(?:(?:\xcc|(?=[\x00-\x7f]))(.)|\xcd(..)|\xce(.{4}))"
    rb"\xa1v\x01", re.DOTALL)


def _ct_span(data: bytes) -> tuple[int, int] | None:
    """Where the ciphertext lies in a message that starts with ``_CT`` (by its bin
    header; the end may lie past the data, which the caller's match then refuses)."""
    kind = data[4]
    if kind == 0xC4:
        return 6, 6 + data[5]
    if kind == 0xC5:
        return 7, 7 + (data[5] << 8 | data[6])
    if kind == 0xC6:
        return 9, 9 + int.from_bytes(data[5:9], "big")
    return None


def canonical_app_fields(data: bytes) -> AppFields | None:
    """The fields of a canonically encoded application message, None for anything else
    (:func:`app_fields` then decodes it in full; both agree where this one answers)."""
    if type(data) is not bytes or data[:4] != _CT or not 9 <= len(data) <= MAX_OBJECT:
        return None
    span = _ct_span(data)
    if span is None:
        return None
    start, end = span
    m = _APP_REST.fullmatch(data, end)
    if m is None:
        return None
    e1, e2, e4, e8, gid, iv, n1, n2, n4, s1, s2, s4 = m.groups()
    if n1:
        n = n1[0]
    elif n2:
        n = n2[0] << 8 | n2[1]
    else:
        n = int.from_bytes(n4, "big")
    return (gid, e1[0] if e1 else int.from_bytes(e2 or e4 or e8, "big"),
            s1[0] if s1 else int.from_bytes(s2 or s4, "big"), n, iv, data[start:end])


def app_fields(data: bytes) -> AppFields:
    """The clear fields of an application message, as :func:`parse_app` (a plain tuple)."""
    return canonical_app_fields(data) or decode_app_fields(data)


def parse_app(data: bytes) -> AppHeader:
    return AppHeader._make(app_fields(data))


def decode_app_fields(data: bytes) -> AppFields:
    """:func:`app_fields` by a full decode: any encoding of the map, checked field by field."""
    d = _unpack_flat(data, "app")
    get = d.get
    g, e, s, n, iv, ct = get("g"), get("e"), get("s"), get("n"), get("iv"), get("ct")
    if (get("v") == VERSION and type(get("v")) is int and get("k") == "app"
            and type(g) is bytes and len(g) == 16 and type(e) is int and 0 <= e <= U64
            and type(s) is int and 0 <= s <= U32 and type(n) is int and 0 <= n <= U32
            and type(iv) is bytes and len(iv) == 24 and type(ct) is bytes):
        return g, e, s, n, iv, ct  # well formed: the common case
    version = d.get("v")
    if type(version) is not int:
        raise E2EError("malformed", "app: no version")
    if version != VERSION:
        raise E2EError("unsupported_version", f"app v{version}")
    if d.get("k") != "app":
        raise E2EError("malformed", "not an app message")
    return (as_bin(d.get("g"), "app.g", 16), as_int(d.get("e"), "app.e", 0, U64),
            as_int(d.get("s"), "app.s"), as_int(d.get("n"), "app.n"),
            as_bin(d.get("iv"), "app.iv", 24), as_bin(d.get("ct"), "app.ct"))


def canonical_plaintext(pt: bytes, signed: bool) -> tuple[bytes, bytes | None] | None:
    """(body, signature) of a canonically encoded plaintext, None for any other bytes
    (:func:`decode_plaintext` then decodes them; both agree where this one answers)."""
    if signed:
        end = len(pt) - 70
        if end < 5 or pt[:3] != b"\x82\xa1b" or pt[end:end + 6] != _SIG64:
            return None
        sig: bytes | None = pt[end + 6:]
    else:
        end = len(pt)
        if end < 5 or pt[:3] != b"\x81\xa1b":
            return None
        sig = None
    kind = pt[3]
    if kind == 0xC4:
        start = 5
        size = pt[4]
    elif kind == 0xC5 and end > 5:
        start = 6
        size = pt[4] << 8 | pt[5]
    elif kind == 0xC6:
        start = 8
        size = int.from_bytes(pt[4:8], "big")
    else:
        return None
    if start + size != end:
        return None
    return pt[start:end], sig


def decode_plaintext(pt: bytes, signed: bool) -> tuple[bytes, object]:
    """(body, the "sig" field when ``signed``) of a plaintext map in any encoding."""
    p = _unpack_flat(pt, "app.pt")
    body = p.get("b")
    if type(body) is not bytes:
        raise E2EError("malformed", "app.b: expected bytes")
    return body, p.get("sig") if signed else None


def open_app(chain: Chain, sender: Member, h: AppFields, aad: bytes, *, signed: bool,
             max_forward: int, max_skipped: int) -> bytes:
    """Steps 3-7 of section 2.7 for a message whose epoch and sender passed: window,
    key, AEAD, signature; the chain moves only once everything verified (a failure
    at most leaves checkpoints of derived future chain keys behind)."""
    group_id, epoch, leaf, n, iv, ct = h
    fresh: list[tuple[int, bytes]] = []
    nxt = b""
    if n == chain.n:  # the next one, in order: the common case
        key, nxt = ratchet(chain.key, n)
    elif n < chain.n:
        opt = chain.skipped.get(n)
        if opt is None:
            raise E2EError("replay", f"generation {n} used or dropped", sender=sender.sub)
        key = opt
    elif n - chain.n > max_forward:
        raise E2EError("too_far_ahead", f"generation {n}, expected {chain.n}", sender=sender.sub)
    else:
        key, nxt, fresh = _ratchet(chain, n, max_skipped)
    full_aad = _layout(chain, group_id, epoch, leaf).full_aad(pack_uint(n), aad)
    pt = aead_decrypt(ct, full_aad, iv, key)
    if pt is None:
        raise E2EError("bad_tag", "header or body altered", sender=sender.sub)
    fields = canonical_plaintext(pt, signed) if len(pt) <= MAX_OBJECT else None
    body, sig = decode_plaintext(pt, signed) if fields is None else fields
    if signed and (type(sig) is not bytes
                   or not verify_signature(sender.spk, LABEL_APP_SIG, full_aad + body, sig)):
        raise E2EError("bad_signature", f"not signed by leaf {leaf}", sender=sender.sub)
    if n < chain.n:
        del chain.skipped[n]
    else:
        chain.advance(nxt, n + 1)
        if fresh:
            chain.skipped.update(fresh)
            while len(chain.skipped) > max_skipped:
                del chain.skipped[min(chain.skipped)]
    return body


def open_next(ep: Epoch, data: bytes, aad: bytes, group_id: bytes, signed: bool,
              ) -> tuple[bytes, Member] | None:
    """(body, sender) of the common message, read in one pass: canonical layout, epoch
    ``ep``, the next generation of a sender whose chain has started in it.

    None for any other message, with nothing changed: the caller then takes the full
    path (:func:`app_fields`, :func:`open_app`), which gives the same answer or the
    right error. The header is compared whole with the sender's layout, so a guessed
    leaf that is wrong simply does not match.
    """
    if type(data) is not bytes or not 40 < len(data) <= MAX_OBJECT or data[:4] != _CT:
        return None
    # A leaf below 256 ends the message as its 4th byte from the end ("s", the leaf,
    # "v", the version); any other message fails the compare with the layout's tail.
    b = data[-4]
    chain = ep.chains.get(b)
    if chain is None:
        return None
    lay = chain.layout
    if lay is None or lay.leaf != b or lay.epoch != ep.number or lay.group_id != group_id:
        return None
    span = _ct_span(data)
    if span is None:
        return None
    start, end = span
    at = end + len(lay.head)
    n = chain.n
    packed_n = pack_uint(n)
    if data[end:at] != lay.head or data[at + 24:] != _K_N + packed_n + lay.tail:
        return None
    full_aad = lay.full_aad(packed_n, aad)
    opened = ratchet_open(chain.key, n, data[start:end], full_aad, data[at:at + 24])
    if opened is None:
        return None
    pt, nxt = opened
    fields = canonical_plaintext(pt, signed)  # shorter than data: within MAX_OBJECT
    if fields is None:
        return None
    body, sig = fields
    m = ep.roster[b]
    if signed and not verify_signature(m.spk, LABEL_APP_SIG, full_aad + body, sig or b""):
        return None
    chain.advance(nxt, n + 1)
    return body, m


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
