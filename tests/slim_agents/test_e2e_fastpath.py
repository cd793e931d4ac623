"""The hand-written encodings and the canonical-layout fast paths of application
messages (slim_agents._e2e_epoch) against msgpack and the general decoders: same
bytes out, and for any input the same answer or the same E2EError code."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slim_agents import _e2e_base as base
from slim_agents._e2e import E2EError, SigningIdentity
from slim_agents._e2e_epoch import (
    AppHeader,
    AppLayout,
    Chain,
    Epoch,
    Member,
    app_aad,
    app_fields,
    canonical_app_fields,
    canonical_plaintext,
    decode_app_fields,
    decode_plaintext,
    open_app,
    open_next,
    parse_app,
    seal_app,
)
from slim_agents._session_e2e import aad_tail

U32 = base.U32
U64 = base.U64
IDENTITY = SigningIdentity(bytes(range(32)))
SENDER = Member("sender", IDENTITY.public_key, bytes(32))
FIELDS = ("ct", "e", "g", "iv", "k", "n", "s", "v")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Integers around every msgpack width boundary, and sizes around every bin width.
ints = st.one_of(st.integers(0, 127), st.integers(128, 255), st.integers(256, 0xFFFF),
                 st.integers(0x1_0000, U32), st.integers(U32 + 1, U64),
                 st.integers(-(2**63), -1), st.sampled_from([0, 127, 128, 255, 256, 0xFFFF,
                                                             0x1_0000, U32, U32 + 1, U64]))
u32s = st.one_of(st.integers(0, 300), st.sampled_from([127, 128, 255, 256, 0xFFFF, 0x1_0000,
                                                       U32]), st.integers(0, U32))
u64s = st.one_of(u32s, st.integers(U32 + 1, U64), st.just(U64))
blobs = st.one_of(st.binary(max_size=300),
                  st.sampled_from([255, 256, 0xFFFF, 0x1_0000]).map(bytes))
junk = st.one_of(st.none(), st.booleans(), ints, st.text(max_size=4), st.binary(max_size=30),
                 st.lists(st.integers(0, 3), max_size=2), st.floats(allow_nan=False),
                 st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=1))


# -- a msgpack writer free to choose any valid encoding of a value -----------------------


def int_encodings(v: int) -> list[bytes]:
    out = [bytes((v,))] if 0 <= v < 128 else []
    if -32 <= v < 0:
        out.append(struct.pack("b", v))
    for code, fmt in ((0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q"),
                      (0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")):
        try:
            out.append(bytes((code,)) + struct.pack(fmt, v))
        except struct.error:
            pass
    return out


def sized(size: int, short: int | None, codes: tuple[int, int, int]) -> list[bytes]:
    """Headers of a str/bin/array/map of ``size`` items: the fix form, then 8/16/32 bits."""
    out = [bytes((short + size,))] if short is not None and size < 16 else []
    for code, fmt in zip(codes, (">B", ">H", ">I"), strict=True):
        if code and size < 256 ** struct.calcsize(fmt):
            out.append(bytes((code,)) + struct.pack(fmt, size))
    return out


def pick_encoding(options: list[bytes], draw: Callable[[Any], Any]) -> bytes:
    if not options:
        return b""
    if draw(st.integers(0, 15)):
        return options[0]
    return draw(st.sampled_from(options))  # type: ignore[no-any-return]


def encode(value: Any, draw: Callable[[Any], Any]) -> bytes:
    """``value`` in msgpack, each part in an encoding picked by ``draw`` (mostly the
    shortest, canonical one)."""
    def pick(options: list[bytes]) -> bytes:
        return pick_encoding(options, draw)

    if value is None:
        return b"\xc0"
    if value is True or value is False:
        return b"\xc3" if value else b"\xc2"
    if type(value) is int:
        return pick(int_encodings(value))
    if type(value) is float:
        return b"\xcb" + struct.pack(">d", value)
    if type(value) is str:
        raw = value.encode()
        heads = [bytes((0xA0 + len(raw),))] if len(raw) < 32 else []
        return pick(heads + sized(len(raw), None, (0xD9, 0xDA, 0xDB))) + raw
    if type(value) is bytes:
        return pick(sized(len(value), None, (0xC4, 0xC5, 0xC6))) + value
    if type(value) is list:
        return pick(sized(len(value), 0x90, (0, 0xDC, 0xDD))) + b"".join(
            encode(x, draw) for x in value)
    if type(value) is dict:
        items = list(value.items())
        return pick(sized(len(items), 0x80, (0, 0xDE, 0xDF))) + b"".join(
            encode(k, draw) + encode(v, draw) for k, v in items)
    raise TypeError(type(value))


def encode_map_header(size: int, draw: Callable[[Any], Any]) -> bytes:
    return pick_encoding(sized(size, 0x80, (0, 0xDE, 0xDF)), draw)


@st.composite
def app_maps(draw: Callable[[Any], Any]) -> list[tuple[Any, Any]]:
    """Header entries, mostly well formed: some missing, wrong, extra or repeated."""
    good: dict[str, Any] = {
        "ct": draw(blobs), "e": draw(u64s), "g": draw(st.binary(min_size=16, max_size=16)),
        "iv": draw(st.binary(min_size=24, max_size=24)), "k": "app", "n": draw(u32s),
        "s": draw(u32s), "v": 1}
    items: list[tuple[Any, Any]] = []
    for key in FIELDS:
        how = draw(st.sampled_from(["good"] * 40 + ["junk", "missing", "int"]))
        if how == "good":
            items.append((key, good[key]))
        elif how == "junk":
            items.append((key, draw(junk)))
        elif how == "int":
            items.append((key, draw(ints)))
    if draw(st.integers(0, 3)) == 0:
        items += draw(st.lists(st.tuples(st.one_of(st.text(max_size=3), st.integers(0, 3)),
                                         junk), max_size=2))
    if items and draw(st.integers(0, 9)) == 0:
        items.append(draw(st.sampled_from(items)))
    if draw(st.integers(0, 3)) == 0:
        items = draw(st.permutations(items))
    return items


def outcome(f: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "ok", f(*args, **kwargs)
    except E2EError as exc:
        return "error", exc.code


def check_header(data: bytes) -> None:
    general = outcome(decode_app_fields, data)
    fast = canonical_app_fields(data)
    if fast is not None:
        assert general == ("ok", fast)
        assert [type(x) for x in fast] == [bytes, int, int, int, bytes, bytes]
    assert outcome(app_fields, data) == general
    parsed = outcome(parse_app, data)
    assert parsed == general
    if parsed[0] == "ok":
        assert type(parsed[1]) is AppHeader


def check_plaintext(pt: bytes) -> None:
    for signed in (False, True):
        general = outcome(decode_plaintext, pt, signed)
        fast = canonical_plaintext(pt, signed)
        if fast is not None:
            assert general == ("ok", fast)


# -- encoders: the same bytes as msgpack --------------------------------------------------


@given(st.one_of(ints, st.booleans()))
def test_pack_uint_is_packb(n: int) -> None:
    assert base.pack_uint(n) == msgpack.packb(n)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 0xFFFF, 0x1_0000])
def test_bin_header_is_packb(size: int) -> None:
    assert base.bin_header(size) + bytes(size) == msgpack.packb(bytes(size))


@FAST
@given(st.binary(min_size=32, max_size=32), u32s, st.binary(max_size=600), blobs,
       st.binary(min_size=24, max_size=24))
def test_ratchet_seal_and_open_are_ratchet_then_the_aead(key: bytes, g: int, plaintext: bytes,
                                                         aad: bytes, iv: bytes) -> None:
    message_key, next_key = base.ratchet(key, g)
    chain = bytearray(key)
    ct = base.ratchet_seal(chain, g, plaintext, aad, iv)
    assert ct == base.aead_encrypt(plaintext, aad, iv, message_key)
    assert chain == next_key  # moved to g + 1
    assert base.ratchet_open(key, g, ct, aad, iv) == (plaintext, next_key)
    assert base.ratchet_open(key, g ^ 1, ct, aad, iv) is None  # another generation's key
    assert base.ratchet_open(key, g, ct, aad + b"x", iv) is None
    assert base.ratchet_open(key, g, ct[:-1], aad, iv) is None
    assert base.ratchet_open(key, g, ct[:15], aad, iv) is None  # shorter than a tag


def test_a_seal_that_fails_spends_its_generation_and_the_chain_stays_usable() -> None:
    key = bytes(range(32))
    mine = Chain(bytearray(key))
    with pytest.raises(ValueError, match="24-byte nonce"):
        seal_app(mine, None, group_id=bytes(16), epoch=5, leaf=1, plaintext=b"lost",
                 aad=b"", rng=lambda n: bytes(n - 1))
    after = seal_app(mine, None, group_id=bytes(16), epoch=5, leaf=1, plaintext=b"after",
                     aad=b"", rng=bytes)
    h = app_fields(after)
    assert h[3] == 1  # generation 0 was spent
    assert open_app(Chain(bytearray(key)), SENDER, h, b"", signed=False, max_forward=10,
                    max_skipped=4) == b"after"


@FAST
@given(st.binary(max_size=20), u64s, u32s, u32s, blobs)
def test_app_aad_is_the_canonical_list(group_id: bytes, epoch: int, leaf: int, g: int,
                                       aad: bytes) -> None:
    want = msgpack.packb([base.LABEL_APP_AAD, group_id, epoch, leaf, g, aad], use_bin_type=True)
    assert app_aad(group_id, epoch, leaf, g, aad) == want
    assert app_aad(group_id, epoch, leaf, g, bytearray(aad)) == want  # type: ignore[arg-type]


@given(st.integers(0, U32), st.sampled_from([None, "", "text", "é" * 40]),
       st.sampled_from([None, {}, {"k": "v", "a": "b"}]))
def test_aad_tail_is_packb(mid: int, payload_type: str | None,
                           metadata: dict[str, str] | None) -> None:
    pack = msgpack.packb
    want = (pack(mid) + (pack(payload_type) if payload_type else b"\xa0")
            + (pack(sorted(metadata.items())) if metadata else b"\x90"))
    assert aad_tail(mid, payload_type, metadata) == want


@FAST
@given(key=st.binary(min_size=32, max_size=32), g=u32s, epoch=u64s, leaf=u32s,
       group_id=st.binary(min_size=16, max_size=16), iv=st.binary(min_size=24, max_size=24),
       plaintext=blobs, aad=st.binary(max_size=300), signed=st.booleans(),
       layout=st.sampled_from(["none", "same", "other"]))
def test_seal_app_writes_the_canonical_encoding(key: bytes, g: int, epoch: int, leaf: int,
                                                group_id: bytes, iv: bytes, plaintext: bytes,
                                                aad: bytes, signed: bool, layout: str) -> None:
    """As seal_app wrote it with msgpack.packb, and it opens again (through the fast paths)."""
    lay = {"none": None, "same": AppLayout(group_id, epoch, leaf),
           "other": AppLayout(group_id, epoch ^ 1, leaf ^ 1)}[layout]
    chain = Chain(bytearray(key), lay)
    chain.n = g
    out = seal_app(chain, IDENTITY if signed else None, group_id=group_id, epoch=epoch,
                   leaf=leaf, plaintext=plaintext, aad=aad, rng=lambda n: iv[:n])
    message_key, next_key = base.ratchet(key, g)
    full = msgpack.packb([base.LABEL_APP_AAD, group_id, epoch, leaf, g, aad], use_bin_type=True)
    inner: dict[str, bytes] = {"b": plaintext}
    if signed:
        inner["sig"] = IDENTITY.sign(base.LABEL_APP_SIG, full + plaintext)
    ct = base.aead_encrypt(msgpack.packb(inner, use_bin_type=True), full, iv, message_key)
    assert out == msgpack.packb({"ct": ct, "e": epoch, "g": group_id, "iv": iv, "k": "app",
                                 "n": g, "s": leaf, "v": 1}, use_bin_type=True)
    assert (chain.n, bytes(chain.key)) == (g + 1, next_key)
    assert canonical_app_fields(out) == (group_id, epoch, leaf, g, iv, ct)
    receiver = Chain(bytearray(key), lay)
    receiver.n = g
    assert open_app(receiver, SENDER, app_fields(out), aad, signed=signed, max_forward=10,
                    max_skipped=4) == plaintext
    assert receiver.n == g + 1


# -- decoders: the fast path answers as the general one -----------------------------------


@FAST
@given(st.data())
def test_header_fast_path_agrees_with_the_decoder(data: st.DataObject) -> None:
    """Any key order, encoding width, missing, extra, repeated or ill-typed field."""
    items = data.draw(app_maps())
    draw = data.draw
    raw = b"".join(encode(k, draw) + encode(v, draw) for k, v in items)
    check_header(encode_map_header(len(items), draw) + raw)


CANONICAL = {"ct": b"\x01" * 40, "e": 3, "g": bytes(range(16)), "iv": bytes(range(24)),
             "k": "app", "n": 300, "s": 1, "v": 1}
EDGE_VALUES: list[Any] = [-(2**63), -(2**31) - 1, -(2**31), -32769, -129, -33, -1, 0, 1, 127, 128,
                          255, 256, 0xFFFF, 0x1_0000, U32, U32 + 1, U64, None, True, "app", "",
                          b"", bytes(15), bytes(16), bytes(17), bytes(23), bytes(24),
                          bytes(25), bytes(255), bytes(256), 1.0, [], {}]


def all_encodings(value: Any) -> list[bytes]:
    if type(value) is int:
        return int_encodings(value)
    if type(value) is str:
        raw = value.encode()
        return [bytes((0xA0 + len(raw),)) + raw] + [
            h + raw for h in sized(len(raw), None, (0xD9, 0xDA, 0xDB))]
    if type(value) is bytes:
        return [h + value for h in sized(len(value), None, (0xC4, 0xC5, 0xC6))]
    return [msgpack.packb(value, use_bin_type=True)]


@pytest.mark.parametrize("field", FIELDS)
def test_header_fast_path_with_one_field_changed(field: str) -> None:
    """Every encoding of every edge value in one field of an otherwise canonical header;
    and every encoding of its key; and the map header in every width."""
    def header(key: bytes, value: bytes, head: bytes = b"\x88") -> bytes:
        parts = [key + value if k == field else msgpack.packb(k) + msgpack.packb(
            v, use_bin_type=True) for k, v in CANONICAL.items()]
        return head + b"".join(parts)

    key = msgpack.packb(field)
    hits = 0
    for value in [*EDGE_VALUES, CANONICAL[field]]:
        for enc in all_encodings(value):
            data = header(key, enc)
            check_header(data)
            hits += canonical_app_fields(data) is not None
    assert hits > 0
    value = msgpack.packb(CANONICAL[field], use_bin_type=True)
    for enc in all_encodings(field)[1:]:
        check_header(header(enc, value))
        assert canonical_app_fields(header(enc, value)) is None
    for head in (b"\x87", b"\x89", b"\xde\x00\x08", b"\xdf\x00\x00\x00\x08"):
        check_header(header(key, value, head))
    assert canonical_app_fields(header(key, value)) is not None


@FAST
@given(ct=blobs, epoch=u64s, g=u32s, leaf=u32s, group_id=st.binary(min_size=16, max_size=16),
       iv=st.binary(min_size=24, max_size=24))
def test_canonical_headers_take_the_fast_path(ct: bytes, epoch: int, g: int, leaf: int,
                                              group_id: bytes, iv: bytes) -> None:
    data = msgpack.packb({"ct": ct, "e": epoch, "g": group_id, "iv": iv, "k": "app", "n": g,
                          "s": leaf, "v": 1}, use_bin_type=True)
    assert canonical_app_fields(data) == (group_id, epoch, leaf, g, iv, ct)
    check_header(data)


@FAST
@given(st.binary(min_size=32, max_size=32), u32s, st.binary(max_size=300),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=3),
       st.integers(0, 10**6), st.binary(max_size=3), st.booleans())
def test_header_fast_path_on_mutated_messages(key: bytes, g: int, plaintext: bytes,
                                              flips: list[tuple[int, int]], cut: int,
                                              insert: bytes, signed: bool) -> None:
    chain = Chain(bytearray(key))
    chain.n = g
    good = seal_app(chain, IDENTITY if signed else None, group_id=bytes(16), epoch=g % 300,
                    leaf=g % 70_000, plaintext=plaintext, aad=b"", rng=bytes)
    data = bytearray(good)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    check_header(bytes(data))
    check_header(bytes(data[: cut % (len(data) + 1)]))
    at = cut % (len(data) + 1)
    check_header(bytes(data[:at]) + insert + bytes(data[at:]))


@FAST
@given(st.data())
def test_plaintext_fast_path_agrees_with_the_decoder(data: st.DataObject) -> None:
    draw = data.draw
    items: list[tuple[Any, Any]] = []
    if draw(st.integers(0, 5)):
        items.append(("b", draw(st.one_of(blobs, junk))))
    if draw(st.booleans()):
        items.append(("sig", draw(st.one_of(st.binary(min_size=64, max_size=64), blobs,
                                            junk))))
    if draw(st.integers(0, 3)) == 0:
        items.append((draw(st.sampled_from(["pad", "b", "sig", "x"])), draw(junk)))
    if draw(st.booleans()):
        items = draw(st.permutations(items))
    raw = b"".join(encode(k, draw) + encode(v, draw) for k, v in items)
    pt = encode_map_header(len(items), draw) + raw
    check_plaintext(pt)
    cut = draw(st.integers(0, len(pt)))
    check_plaintext(pt[:cut])
    check_plaintext(pt[:cut] + draw(st.binary(max_size=3)) + pt[cut:])


@FAST
@given(blobs, st.binary(min_size=64, max_size=64), st.booleans(),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=2),
       st.integers(0, 10**6), st.binary(max_size=3))
def test_plaintext_fast_path_on_mutated_plaintexts(body: bytes, sig: bytes, signed: bool,
                                                   flips: list[tuple[int, int]], cut: int,
                                                   insert: bytes) -> None:
    good = msgpack.packb({"b": body, "sig": sig} if signed else {"b": body}, use_bin_type=True)
    data = bytearray(good)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    at = cut % (len(data) + 1)
    for pt in (bytes(data), bytes(data[:at]), bytes(data[:at]) + insert + bytes(data[at:])):
        check_plaintext(pt)


@FAST
@given(blobs, st.binary(min_size=64, max_size=64))
def test_canonical_plaintexts_take_the_fast_path(body: bytes, sig: bytes) -> None:
    unsigned = msgpack.packb({"b": body}, use_bin_type=True)
    signed = msgpack.packb({"b": body, "sig": sig}, use_bin_type=True)
    assert canonical_plaintext(unsigned, False) == (body, None)
    assert canonical_plaintext(signed, True) == (body, sig)
    assert canonical_plaintext(unsigned, True) is None
    assert canonical_plaintext(signed, False) is None
    check_plaintext(unsigned)
    check_plaintext(signed)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(("inner", "code"), [
    ({"b": b"hi", "pad": bytes(7)}, None),          # other keys: the general decoder
    ({"pad": b"", "b": b"hi"}, None),
    ({"b": "hi"}, "malformed"),
    ({}, "malformed"),
])
def test_open_app_falls_back_to_the_decoder(signed: bool, inner: dict[str, Any],
                                            code: str | None) -> None:
    """Plaintexts and headers of other encodings still open (or fail with the same code)."""
    key, g, gid, aad = bytes(range(32)), 300, bytes(16), b"routing"
    full = app_aad(gid, 2, 1, g, aad)
    if signed and "b" in inner and type(inner["b"]) is bytes:
        inner = {**inner, "sig": IDENTITY.sign(base.LABEL_APP_SIG, full + inner["b"])}
    iv = bytes(24)
    ct = base.aead_encrypt(msgpack.packb(inner, use_bin_type=True), full, iv,
                           base.ratchet(key, g)[0])
    # Reversed keys, uint32 ints and a bin16 ct: not the canonical layout.
    header = (b"\x88\xa1v\x01\xa1s\xce" + struct.pack(">I", 1) + b"\xa1n\xce"
              + struct.pack(">I", g) + b"\xa1k\xa3app\xa2iv\xc4\x18" + iv + b"\xa1g\xc4\x10"
              + gid + b"\xa1e\x02\xa2ct\xc5" + struct.pack(">H", len(ct)) + ct)
    assert canonical_app_fields(header) is None
    chain = Chain(bytearray(key), AppLayout(gid, 2, 1))
    chain.n = g
    result = outcome(open_app, chain, SENDER, app_fields(header), aad, signed=signed,
                     max_forward=10, max_skipped=4)
    assert result == (("ok", b"hi") if code is None else ("error", code))
    assert chain.n == (g + 1 if code is None else g)


def test_signed_plaintext_without_a_signature_is_refused_as_before() -> None:
    key, g, gid = bytes(range(32)), 0, bytes(16)
    full = app_aad(gid, 0, 1, g, b"")
    for inner in ({"b": b"x"}, {"b": b"x", "sig": "text"}, {"b": b"x", "sig": bytes(64)}):
        ct = base.aead_encrypt(msgpack.packb(inner, use_bin_type=True), full, bytes(24),
                               base.ratchet(key, g)[0])
        h = (gid, 0, 1, g, bytes(24), ct)
        with pytest.raises(E2EError) as exc:
            open_app(Chain(bytearray(key)), SENDER, h, b"", signed=True, max_forward=10,
                     max_skipped=4)
        assert exc.value.code == "bad_signature"


@pytest.mark.parametrize("data", [
    b"", b"\x88", b"\x88\xa2ct", b"\x88\xa2ct\xc4", b"\x88\xa2ct\xc4\xff", b"\x88\xa2ct\xc6",
    b"\x88\xa2ct\xc6\xff\xff\xff\xff", b"\x88\xa2ct\xc7\x00",
])
def test_header_fast_path_on_short_inputs(data: bytes) -> None:
    check_header(data)
    check_plaintext(data)


# -- the one-pass read of the next message (open_next) ------------------------------------


def _started_epoch(key: bytes, leaf: int, signed: bool, gid: bytes = bytes(16),
                   ) -> tuple[Epoch, Chain]:
    """An epoch whose chain of ``leaf`` has started (one message read the full way),
    and that sender's own chain, ready for its second message."""
    roster = {0: Member("me", bytes(32), bytes(32)), leaf: SENDER}
    ep = Epoch(5, roster, bytearray(key * len(roster)), bytes(16))
    mine = Chain(bytearray(key))
    first = seal_app(mine, IDENTITY if signed else None, group_id=gid, epoch=5, leaf=leaf,
                     plaintext=b"first", aad=b"aad", rng=bytes)
    h = app_fields(first)
    assert open_app(ep.chain(leaf), SENDER, h, b"aad", signed=signed, max_forward=10,
                    max_skipped=4) == b"first"
    return ep, mine


@pytest.mark.parametrize("leaf", [1, 127, 128, 255])
@pytest.mark.parametrize("signed", [False, True])
def test_open_next_reads_the_next_message_and_nothing_else(leaf: int, signed: bool) -> None:
    ep, mine = _started_epoch(bytes(range(32)), leaf, signed)
    chain = ep.chains[leaf]
    second = seal_app(mine, IDENTITY if signed else None, group_id=bytes(16), epoch=5,
                      leaf=leaf, plaintext=b"second", aad=b"aad", rng=bytes)
    third = seal_app(mine, IDENTITY if signed else None, group_id=bytes(16), epoch=5,
                     leaf=leaf, plaintext=b"third", aad=b"aad", rng=bytes)
    state = (chain.n, bytes(chain.key))
    # Not the next generation, another aad, group or signing mode: left to the full path.
    for data, aad, gid, sig in [(third, b"aad", bytes(16), signed),
                                (second, b"other", bytes(16), signed),
                                (second, b"aad", bytes(15) + b"\x01", signed),
                                (second, b"aad", bytes(16), not signed)]:
        assert open_next(ep, data, aad, gid, sig) is None
        assert (chain.n, bytes(chain.key)) == state
    assert open_next(ep, second, b"aad", bytes(16), signed) == (b"second", SENDER)
    assert chain.n == 2 and open_next(ep, second, b"aad", bytes(16), signed) is None
    assert open_next(ep, third, b"aad", bytes(16), signed) == (b"third", SENDER)


def test_open_next_leaves_senders_past_leaf_255_and_unstarted_chains_to_the_full_path() -> None:
    ep, mine = _started_epoch(bytes(32), 256, False)
    second = seal_app(mine, None, group_id=bytes(16), epoch=5, leaf=256, plaintext=b"x",
                      aad=b"", rng=bytes)
    assert open_next(ep, second, b"", bytes(16), False) is None
    fresh = Epoch(5, {0: SENDER, 3: SENDER}, bytearray(64), bytes(16))
    first = seal_app(Chain(bytearray(32)), None, group_id=bytes(16), epoch=5, leaf=3,
                     plaintext=b"x", aad=b"", rng=bytes)
    assert open_next(fresh, first, b"", bytes(16), False) is None and not fresh.chains


@FAST
@given(st.binary(min_size=32, max_size=32), st.sampled_from([1, 127, 128, 255]),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
       st.integers(0, 10**6), st.binary(min_size=1, max_size=3), st.booleans())
def test_open_next_refuses_every_altered_message_and_changes_nothing(
        key: bytes, leaf: int, flips: list[tuple[int, int]], cut: int, insert: bytes,
        signed: bool) -> None:
    ep, mine = _started_epoch(key, leaf, signed)
    chain = ep.chains[leaf]
    good = seal_app(mine, IDENTITY if signed else None, group_id=bytes(16), epoch=5,
                    leaf=leaf, plaintext=b"next", aad=b"aad", rng=bytes)
    flipped = bytearray(good)
    for pos, mask in flips:
        flipped[pos % len(good)] ^= mask
    at = cut % len(good)
    for data in (bytes(flipped), good[:at], good[:at] + insert + good[at:]):
        if data != good:
            assert open_next(ep, data, b"aad", bytes(16), signed) is None
            assert chain.n == 1
    assert open_next(ep, good, b"aad", bytes(16), signed) == (b"next", SENDER)
