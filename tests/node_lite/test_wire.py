"""Sans-IO tests of the wire codec: round trips, stream framing, malformed input."""

from __future__ import annotations

import copy
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import node_lite
from node_lite import (
    FrameTooLargeError,
    LimitExceededError,
    Limits,
    MalformedFrameError,
    Name,
    ProtocolError,
    SlimError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from node_lite.wire import (
    PROTOCOL_VERSION,
    Error,
    FrameDecoder,
    Hello,
    HelloAck,
    Ping,
    Pong,
    Publish,
    RouteAdvert,
    RouteUpdate,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
    check_publish,
    decode_frame,
    decode_message,
    encode,
    encode_frame,
    frame_prefix,
    marked,
    timestamp_marks,
)

U32 = 2**32 - 1
U64 = 2**64 - 1
MAX_ID = 2**64 - 2
LIMITS = Limits()

# -- strategies -------------------------------------------------------------------------

# Name components: non-empty, no '/', no surrounding whitespace (Name refuses those).
components = st.text(
    alphabet=st.characters(exclude_characters="/", exclude_categories=("Cs",)),
    min_size=1, max_size=12,
).filter(lambda s: s == s.strip())
instance_ids = st.integers(0, MAX_ID)
full_names = st.builds(Name, components, components, components, instance_ids)
any_names = st.builds(Name, components, components, components, st.none() | instance_ids)
node_ids = st.text(min_size=1, max_size=16)
short_text = st.text(max_size=24)
metadata = st.none() | st.dictionaries(st.text(max_size=10), st.text(max_size=24),
                                       min_size=1, max_size=6)
caps = st.dictionaries(
    st.text(max_size=10),
    st.none() | st.booleans() | st.integers(-(2**63), U64) | st.text(max_size=10),
    max_size=6,
)

hellos = st.one_of(
    st.builds(Hello, token=short_text, role=st.just("app"), name=full_names, caps=caps),
    st.builds(Hello, token=short_text, role=st.just("peer"), node_id=node_ids, caps=caps),
)
hello_acks = st.builds(HelloAck, conn_id=st.integers(0, 2**63), node_id=node_ids,
                       max_frame_size=st.integers(1, 2**31))
subscribes = st.builds(Subscribe, name=any_names, request_id=st.integers(0, U32))
unsubscribes = st.builds(Unsubscribe, name=any_names, request_id=st.integers(0, U32))
subscribe_acks = st.builds(
    SubscribeAck, request_id=st.integers(0, U32), ok=st.booleans(),
    code=st.none() | st.text(max_size=16), message=st.none() | short_text,
)
publishes = st.builds(
    Publish,
    source=full_names,
    destination=any_names,
    fanout=st.integers(1, U32),
    ttl=st.integers(0, 255),
    session_id=st.integers(0, U32),
    session_type=st.integers(0, 255),
    kind=st.integers(0, 255),
    message_id=st.integers(0, U32),
    payload_type=st.none() | st.text(max_size=16),
    metadata=metadata,
    identity=st.none() | short_text,
    error=st.booleans(),
    origins=st.none() | st.lists(node_ids, max_size=5).map(tuple),
    payload=st.binary(max_size=256),
)
errors = st.builds(
    Error, code=st.text(max_size=16), message=short_text,
    ref=st.none() | st.integers(0, U32), name=st.none() | any_names,
    session_id=st.none() | st.integers(0, U32),
)
pings = st.builds(Ping, nonce=st.integers(0, U64))
pongs = st.builds(Pong, nonce=st.integers(0, U64))
route_updates = st.builds(
    RouteUpdate,
    full=st.booleans(),
    add=st.lists(st.builds(RouteAdvert, any_names,
                           st.lists(node_ids, min_size=1, max_size=4).map(tuple)),
                 max_size=4).map(tuple),
    remove=st.lists(st.tuples(any_names, node_ids), max_size=4).map(tuple),
)
messages = st.one_of(hellos, hello_acks, subscribes, unsubscribes, subscribe_acks, publishes,
                     errors, pings, pongs, route_updates)

ALL_TYPES = (Hello, HelloAck, Subscribe, Unsubscribe, SubscribeAck, Publish, Error, Ping, Pong,
             RouteUpdate)

# Arbitrary msgpack-able values (no ext types).
msgpack_scalars = (st.none() | st.booleans() | st.integers(-(2**63), U64)
                   | st.floats(allow_nan=False) | st.text(max_size=12) | st.binary(max_size=12))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)
# Values shaped like names, with arbitrary (often invalid) parts.
name_like = st.lists(msgpack_scalars | st.text(max_size=4), min_size=0, max_size=5)


def roundtrip(message: Any, limits: Limits = LIMITS) -> Any:
    frame = encode_frame(message)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    return decode_message(decode_frame(frame[4:]), limits)


def body(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode(obj_or_bytes: Any, limits: Limits = LIMITS) -> Any:
    raw = obj_or_bytes if isinstance(obj_or_bytes, bytes) else body(obj_or_bytes)
    return decode_message(decode_frame(raw), limits)


def assert_raises(exc_type: type[ProtocolError], code: str, raw: Any,
                  limits: Limits = LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(raw, limits)
    assert type(info.value) is exc_type, repr(info.value)
    assert info.value.code == code
    assert isinstance(info.value, SlimError)
    return info.value


# -- round trips ------------------------------------------------------------------------


@given(messages)
def test_roundtrip_every_message_type(message: Any) -> None:
    out = roundtrip(message)
    assert type(out) is type(message)
    assert out == message


@given(publishes)
def test_publish_roundtrip_fields(message: Publish) -> None:
    out = roundtrip(message)
    assert isinstance(out, Publish)
    for name in Publish.__dataclass_fields__:
        assert getattr(out, name) == getattr(message, name), name
    if message.origins is not None:
        assert type(out.origins) is tuple
    assert type(out.payload) is bytes


@pytest.mark.parametrize("strategy", [hellos, hello_acks, subscribes, unsubscribes,
                                      subscribe_acks, publishes, errors, pings, pongs,
                                      route_updates])
@settings(max_examples=25)
@given(data=st.data())
def test_roundtrip_per_type(strategy: Any, data: st.DataObject) -> None:
    message = data.draw(strategy)
    assert roundtrip(message) == message


@given(messages)
@settings(max_examples=50)
def test_encode_is_frame_body(message: Any) -> None:
    frame = encode_frame(message)
    assert encode(message) == frame[4:]
    assert frame_prefix(len(frame) - 4) == frame[:4]
    # An envelope map encodes like the message it holds.
    assert encode_frame(message.to_dict()) == frame
    d = decode_frame(frame[4:])
    assert d["v"] == PROTOCOL_VERSION
    assert d["t"] == type(message).TYPE


def test_publish_header_comes_first() -> None:
    message = Publish(source=Name("a", "b", "c", 1), destination=Name("a", "b", "d"),
                      payload=b"x", metadata={"k": "v"})
    keys = list(message.to_dict())
    assert keys[:4] == ["v", "t", "src", "dst"]
    assert keys[-1] == "body"


def test_publish_wildcard_destination_and_defaults() -> None:
    d = {"v": 1, "t": "pub", "src": ["a", "b", "c", 7], "dst": ["a", "b", "d", None],
         "fan": 1, "ttl": 8}
    out = decode(d)
    assert out == Publish(source=Name("a", "b", "c", 7), destination=Name("a", "b", "d"))
    check_publish(d, LIMITS)


def test_type_tags_are_distinct() -> None:
    tags = [cls.TYPE for cls in ALL_TYPES]
    assert len(set(tags)) == len(tags)


# -- FrameDecoder -----------------------------------------------------------------------


def feed_in_chunks(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        out.extend(bytes(f) for f in decoder.feed(stream[prev:cut]))
        prev = cut
    return out


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    parts = draw(st.lists(
        st.one_of(
            messages.map(encode_frame),
            st.binary(max_size=64).map(lambda b: frame_prefix(len(b)) + b),
            st.just(frame_prefix(0)),
        ),
        min_size=1, max_size=8,
    ))
    stream = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=30))
    return parts, stream, cuts


@settings(max_examples=100)
@given(frame_streams())
def test_decoder_any_chunking_yields_the_same_frames(case: tuple[list[bytes], bytes, list[int]]
                                                     ) -> None:
    frames, stream, cuts = case
    decoder = FrameDecoder()
    assert feed_in_chunks(decoder, stream, cuts) == frames
    assert decoder.buffered == 0


@given(frame_streams())
@settings(max_examples=30)
def test_decoder_single_byte_chunks(case: tuple[list[bytes], bytes, list[int]]) -> None:
    frames, stream, _ = case
    decoder = FrameDecoder()
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(bytes(f) for f in decoder.feed(stream[i:i + 1]))
    assert out == frames
    assert decoder.buffered == 0


@given(st.lists(messages, min_size=1, max_size=5), st.data())
@settings(max_examples=50)
def test_decoder_frames_decode_to_the_messages(msgs: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    decoder = FrameDecoder()
    views = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        views.extend(decoder.feed(stream[prev:cut]))
        prev = cut
    assert all(isinstance(v, memoryview) and v.readonly for v in views)
    assert [decode_message(decode_frame(v[4:])) for v in views] == msgs


def test_decoder_zero_length_body() -> None:
    decoder = FrameDecoder()
    assert [bytes(f) for f in decoder.feed(b"\x00\x00")] == []
    assert decoder.buffered == 2
    assert [bytes(f) for f in decoder.feed(b"\x00\x00")] == [b"\x00\x00\x00\x00"]
    assert decoder.buffered == 0
    frames = decoder.feed(frame_prefix(0) * 3)
    assert [bytes(f) for f in frames] == [frame_prefix(0)] * 3
    # An empty body is not a valid message.
    with pytest.raises(MalformedFrameError):
        decode_frame(frames[0][4:])


def test_decoder_empty_feed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00") == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == 1


def test_decoder_frame_at_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    frame = frame_prefix(1024) + b"x" * 1024
    assert [bytes(f) for f in decoder.feed(frame)] == [frame]


def big_publish(size: int) -> bytes:
    return encode_frame(Publish(source=Name("a", "b", "c", 1), destination=Name("a", "b", "d"),
                                payload=bytes(range(256)) * (size // 256)))


def test_decoder_big_frame_single_byte_chunks() -> None:
    big = big_publish(200 * 1024)
    stream = encode_frame(Ping(nonce=1)) + big + frame_prefix(0) + encode_frame(Pong(nonce=2))
    decoder = FrameDecoder(max_frame_size=256 * 1024)
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(bytes(f) for f in decoder.feed(stream[i:i + 1]))
    assert out == [encode_frame(Ping(nonce=1)), big, frame_prefix(0), encode_frame(Pong(nonce=2))]
    message = decode_message(decode_frame(out[1][4:]))
    assert isinstance(message, Publish)
    assert len(message.payload) == 200 * 1024


@given(st.lists(st.integers(0, 3 * 1024 * 1024), max_size=40))
@settings(max_examples=20)
def test_decoder_big_frames_any_chunking(cuts: list[int]) -> None:
    frames = [big_publish(200 * 1024), big_publish(1536 * 1024), frame_prefix(0),
              big_publish(600 * 1024)]
    stream = b"".join(frames)
    decoder = FrameDecoder(max_frame_size=2 << 20)
    cuts = [c for c in cuts if c <= len(stream)]
    assert feed_in_chunks(decoder, stream, cuts) == frames
    assert decoder.buffered == 0


def test_decoder_big_frame_above_default_limit_needs_raised_limit() -> None:
    big = big_publish(1536 * 1024)
    with pytest.raises(FrameTooLargeError):
        FrameDecoder().feed(big)
    assert [bytes(f) for f in FrameDecoder(max_frame_size=2 << 20).feed(big)] == [big]


# -- oversized frames -------------------------------------------------------------------


@pytest.mark.parametrize("length", [1025, 4096, 0x7FFF_FFFF, 0xFFFF_FFFF])
def test_oversized_prefix_raises_on_the_fourth_byte(length: int) -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    prefix = frame_prefix(length)
    for b in prefix[:3]:
        assert decoder.feed(bytes([b])) == []
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(prefix[3:])  # no body byte was ever sent
    assert info.value.size == length
    assert info.value.limit == 1024
    assert info.value.code == "frame_too_large"


@pytest.mark.parametrize("length", [1025, 0x7FFF_FFFF])
def test_oversized_prefix_in_one_chunk(length: int) -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(frame_prefix(length))
    assert (info.value.size, info.value.limit) == (length, 1024)


def test_oversized_prefix_with_default_limit() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(frame_prefix(0x7FFF_FFFF))
    assert info.value.size == 0x7FFF_FFFF
    assert info.value.limit == Limits().max_frame_size


@given(st.integers(0, 3), st.integers(1025, 0xFFFF_FFFF))
@settings(max_examples=50)
def test_oversized_prefix_after_a_good_frame(split: int, length: int) -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    good = encode_frame(Ping(nonce=3))
    prefix = frame_prefix(length)
    first = decoder.feed(good + prefix[:split])
    assert [bytes(f) for f in first] == [good]
    assert decoder.buffered == split
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(prefix[split:])
    assert (info.value.size, info.value.limit) == (length, 1024)


def test_oversized_prefix_after_good_frame_in_same_chunk() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(FrameTooLargeError) as info:
        decoder.feed(encode_frame(Ping()) + frame_prefix(5000))
    assert info.value.size == 5000


# -- malformed frames -------------------------------------------------------------------

PING = {"v": 1, "t": "ping", "n": 1}


@pytest.mark.parametrize(
    ("raw", "exc_type", "code"),
    [
        pytest.param(b"", MalformedFrameError, "malformed", id="empty"),
        pytest.param(b"\xc1", MalformedFrameError, "malformed", id="never-used-byte"),
        pytest.param(b"\x81\xa1v\xc1", MalformedFrameError, "malformed", id="invalid-inner"),
        pytest.param(body(PING)[:-1], MalformedFrameError, "malformed", id="truncated"),
        pytest.param(body(PING)[:3], MalformedFrameError, "malformed", id="truncated-key"),
        pytest.param(body(PING) + b"\x00", MalformedFrameError, "malformed", id="trailing"),
        pytest.param(body(PING) * 2, MalformedFrameError, "malformed", id="two-maps"),
        pytest.param(body([1, "ping"]), MalformedFrameError, "malformed", id="array-top"),
        pytest.param(body("ping"), MalformedFrameError, "malformed", id="str-top"),
        pytest.param(body(None), MalformedFrameError, "malformed", id="nil-top"),
        pytest.param(body(1), MalformedFrameError, "malformed", id="int-top"),
        pytest.param(body({"t": "ping"}), UnsupportedVersionError, "unsupported_version",
                     id="no-version"),
        pytest.param(body({"v": 2, "t": "ping"}), UnsupportedVersionError,
                     "unsupported_version", id="version-2"),
        pytest.param(body({"v": 0, "t": "ping"}), UnsupportedVersionError,
                     "unsupported_version", id="version-0"),
        pytest.param(body({"v": True, "t": "ping"}), UnsupportedVersionError,
                     "unsupported_version", id="version-true"),
        pytest.param(body({"v": 1.0, "t": "ping"}), UnsupportedVersionError,
                     "unsupported_version", id="version-float"),
        pytest.param(body({"v": "1", "t": "ping"}), UnsupportedVersionError,
                     "unsupported_version", id="version-str"),
        pytest.param(body({"v": 1}), MalformedFrameError, "malformed", id="no-type"),
        pytest.param(body({"v": 1, "t": 1}), MalformedFrameError, "malformed", id="int-type"),
        pytest.param(body({"v": 1, "t": b"ping"}), MalformedFrameError, "malformed",
                     id="bytes-type"),
        pytest.param(body({"v": 1, "t": None}), MalformedFrameError, "malformed",
                     id="nil-type"),
        pytest.param(body({1: 1, "v": 1, "t": "ping"}), MalformedFrameError, "malformed",
                     id="int-key"),
        pytest.param(body({"v": 1, "t": "ping", "x": {1.5: 1}}), MalformedFrameError,
                     "malformed", id="float-key-nested"),
        pytest.param(body({"v": 1, "t": "ping", "x": {None: 1}}), MalformedFrameError,
                     "malformed", id="nil-key-nested"),
        pytest.param(b"\x82\xa1v\x01\xa1t\xa2\xff\xfe", MalformedFrameError, "malformed",
                     id="invalid-utf8-value"),
        pytest.param(b"\x82\xa1v\x01\xa2\xc3\x28\xa4ping", MalformedFrameError, "malformed",
                     id="invalid-utf8-key"),
        pytest.param(b"\x91" * 10_000 + b"\xc0", MalformedFrameError, "malformed",
                     id="deep-arrays"),
        pytest.param(b"\x82\xa1v\x01\xa1x" + b"\x91" * 10_000 + b"\xc0", MalformedFrameError,
                     "malformed", id="deep-arrays-in-map"),
        pytest.param(b"\x81\xa1a" * 10_000 + b"\xc0", MalformedFrameError, "malformed",
                     id="deep-maps"),
        pytest.param(b"\xdd\xff\xff\xff\xff", MalformedFrameError, "malformed", id="array32"),
        pytest.param(b"\xdf\xff\xff\xff\xff", MalformedFrameError, "malformed", id="map32"),
        pytest.param(b"\xdc\xff\xff", MalformedFrameError, "malformed", id="array16"),
        pytest.param(b"\xde\xff\xff", MalformedFrameError, "malformed", id="map16"),
        pytest.param(b"\xdb\xff\xff\xff\xff", MalformedFrameError, "malformed", id="str32"),
        pytest.param(b"\xc6\xff\xff\xff\xff", MalformedFrameError, "malformed", id="bin32"),
        pytest.param(b"\x82\xa1v\x01\xa1t\xdd\xff\xff\xff\xff", MalformedFrameError,
                     "malformed", id="array32-nested"),
    ],
)
def test_malformed_frames(raw: bytes, exc_type: type[ProtocolError], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(raw)
    assert type(info.value) is exc_type, repr(info.value)
    assert info.value.code == code
    assert isinstance(info.value, SlimError)
    if exc_type is MalformedFrameError:
        assert isinstance(info.value, ValueError)


def test_unsupported_version_carries_the_version() -> None:
    with pytest.raises(UnsupportedVersionError) as info:
        decode_frame(body({"v": 7, "t": "ping"}))
    assert info.value.version == 7


@pytest.mark.parametrize("header", [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"])
def test_huge_container_headers_fail_without_allocating(header: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(MalformedFrameError):
            decode_frame(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decode_frame_accepts_memoryview() -> None:
    frame = encode_frame(Ping(nonce=9))
    assert decode_message(decode_frame(memoryview(frame)[4:])) == Ping(nonce=9)


# ext types anywhere are refused

ext_types = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16))


def _place(value: Any, where: str) -> Any:
    base: dict[str, Any] = {"v": 1, "t": "pub", "src": ["a", "b", "c", 1],
                            "dst": ["a", "b", "c", None], "fan": 1, "ttl": 1, "body": b""}
    if where == "top":
        return value
    if where == "version":
        base["v"] = value
    elif where == "type":
        base["t"] = value
    elif where == "extra":
        base["zz"] = value
    elif where == "nested":
        base["zz"] = [{"a": [value]}]
    elif where == "meta":
        base["meta"] = {"k": value}
    elif where == "name":
        base["src"] = ["a", "b", "c", value]
    elif where == "body":
        base["body"] = value
    return base


EXT_PLACES = ["top", "version", "type", "extra", "nested", "meta", "name", "body"]


@given(ext_types, st.sampled_from(EXT_PLACES))
def test_ext_types_are_refused_anywhere(ext: msgpack.ExtType, where: str) -> None:
    raw = body(_place(ext, where))
    with pytest.raises(MalformedFrameError) as info:
        decode_frame(raw)
    assert info.value.code == "malformed"


@pytest.mark.parametrize("where", EXT_PLACES)
@pytest.mark.parametrize(
    "ts", [msgpack.Timestamp(0), msgpack.Timestamp(1, 5), msgpack.Timestamp(2**40, 5)],
    ids=["ts32", "ts64", "ts96"],
)
def test_timestamp_ext_type_is_refused_anywhere(ts: msgpack.Timestamp, where: str) -> None:
    # The timestamp extension (type -1) is an ext type like any other: it must be refused
    # as malformed, not turned into a msgpack.Timestamp object (decode_frame passes it on
    # in ignored keys, and reports it in "v" as an unsupported version).
    raw = body(_place(ts, where))
    with pytest.raises(ProtocolError) as info:
        decode_message(decode_frame(raw))
    assert type(info.value) is MalformedFrameError, repr(info.value)
    assert info.value.code == "malformed"


# Every ext encoding msgpack turns into a Timestamp itself (type byte -1 = 0xff).
TIMESTAMP_ENCODINGS = {
    "fixext4": b"\xd6\xff" + bytes(4), "fixext8": b"\xd7\xff" + bytes(8),
    "ext8-12": b"\xc7\x0c\xff" + bytes(12), "ext8-4": b"\xc7\x04\xff" + bytes(4),
    "ext16-8": b"\xc8\x00\x08\xff" + bytes(8),
    "ext32-12": b"\xc9\x00\x00\x00\x0c\xff" + bytes(12),
}
_SENTINEL = "\x00sentinel\x00"


@pytest.mark.parametrize("where", [w for w in EXT_PLACES if w != "top"])
@pytest.mark.parametrize("encoding", list(TIMESTAMP_ENCODINGS))
def test_the_timestamp_scan_finds_every_encoding(encoding: str, where: str) -> None:
    # The hot paths skip the walk for Timestamp objects in frames without a mark:
    # a mark must be found for each encoding, in the frame that holds it.
    raw = body(_place(_SENTINEL, where)).replace(body(_SENTINEL),
                                                  TIMESTAMP_ENCODINGS[encoding])
    plain = body(_place("text", "extra"))
    buf = plain + raw + plain
    marks = timestamp_marks(buf)
    start, end = len(plain), len(plain) + len(raw)
    assert marked(marks, start, end)
    assert not marked(marks, 0, start) and not marked(marks, end, len(buf))
    with pytest.raises(MalformedFrameError, match="timestamp"):
        decode_frame(raw, check_ext=marked(marks, start, end))


def _decodes_to_timestamp(data: bytes, at: int) -> bool:
    # Whether an ext object with its type byte at ``at`` decodes to a Timestamp.
    for start in range(max(0, at - 5), at):
        try:
            obj = msgpack.unpackb(data[start:], raw=False, strict_map_key=False)
        except msgpack.ExtraData as extra:
            obj = extra.unpacked
        except Exception:
            continue
        if isinstance(obj, msgpack.Timestamp):
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(
    [enc for enc in TIMESTAMP_ENCODINGS.values()]
    + [b"\xc7\x05\xff", b"\xd8\xff", b"\xd4\xff", b"\xc8\x01\x0c\xff"])), max_size=12))
def test_the_timestamp_scan_misses_no_timestamp_in_any_bytes(parts: list[bytes]) -> None:
    # Every 0xff that starts to decode as a Timestamp is marked (spurious marks only
    # cost a walk); the sizes msgpack refuses for a timestamp need none.
    data = b"".join(parts)
    marks = timestamp_marks(data)
    assert marks == sorted(set(marks))
    for at in range(len(data)):
        if data[at] == 0xFF and _decodes_to_timestamp(data, at):
            assert at in marks, (data, at)


def test_frames_without_marks_are_not_marked() -> None:
    assert timestamp_marks(b"") == [] and timestamp_marks(b"\xff\xff") == []
    assert timestamp_marks(body(_place("text", "extra"))) == []
    assert timestamp_marks(b"\x00\xd6\xff") == [2]
    assert not marked([2], 0, 2) and marked([2], 2, 3) and not marked([], 0, 9)


# -- field validation -------------------------------------------------------------------

VALID: dict[str, dict[str, Any]] = {
    "hello": {"v": 1, "t": "hello", "role": "app", "tok": "token",
              "name": ["org", "ns", "app", 5], "caps": {"x": 1}},
    "hello_peer": {"v": 1, "t": "hello", "role": "peer", "tok": "token", "node": "n1"},
    "hello_ack": {"v": 1, "t": "hello_ack", "conn": 1, "node": "n1", "mfs": 1024},
    "sub": {"v": 1, "t": "sub", "name": ["org", "ns", "app", None], "rid": 1},
    "unsub": {"v": 1, "t": "unsub", "name": ["org", "ns", "app", 3], "rid": 0},
    "sub_ack": {"v": 1, "t": "sub_ack", "rid": 1, "ok": True, "code": "c", "msg": "m"},
    "pub": {"v": 1, "t": "pub", "src": ["org", "ns", "app", 1],
            "dst": ["org", "ns", "other", None], "fan": 1, "ttl": 8, "sid": 0, "st": 0,
            "k": 0, "mid": 0, "pt": "text", "meta": {"k": "v"}, "id": "tok", "err": False,
            "orig": ["n1"], "body": b"payload"},
    "err": {"v": 1, "t": "err", "code": "no_route", "msg": "m", "ref": 1,
            "name": ["org", "ns", "app", None], "sid": 2},
    "ping": {"v": 1, "t": "ping", "n": 1},
    "pong": {"v": 1, "t": "pong", "n": 1},
    "routes": {"v": 1, "t": "routes", "full": True,
               "add": [[["org", "ns", "app", None], ["n1", "n2"]]],
               "del": [[["org", "ns", "app", 4], "n1"]]},
}

MISSING = object()


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_templates_decode(kind: str) -> None:
    message = decode(VALID[kind])
    assert message.TYPE == VALID[kind]["t"]
    assert decode(message.to_dict()) == message


BAD_FIELDS: list[Any] = [
    # hello
    ("hello", "tok", b"token"), ("hello", "tok", 1), ("hello", "tok", MISSING),
    ("hello", "tok", None), ("hello", "role", "admin"), ("hello", "role", MISSING),
    ("hello", "role", True), ("hello", "role", ["app"]),
    ("hello", "name", ["org", "ns", "app"]), ("hello", "name", ["org", "ns", "app", 1, 2]),
    ("hello", "name", ["org", "ns", "app", None]),  # a full name is required
    ("hello", "name", MISSING), ("hello", "name", "org/ns/app/1"),
    ("hello", "name", ["", "ns", "app", 1]), ("hello", "name", ["org", "n/s", "app", 1]),
    ("hello", "name", ["org", "ns", "app", -1]), ("hello", "name", ["org", "ns", "app", U64]),
    ("hello", "name", ["org", "ns", "app", True]), ("hello", "name", ["org", "ns", "app", 1.0]),
    ("hello", "name", ["org", "ns", b"app", 1]), ("hello", "name", ["org", 1, "app", 1]),
    ("hello", "name", {"org": "org"}),
    ("hello", "caps", ["x"]), ("hello", "caps", {"x": 1.5}), ("hello", "caps", {"x": [1]}),
    ("hello", "caps", {"x": b"b"}), ("hello", "caps", {b"x": 1}), ("hello", "caps", None),
    ("hello_peer", "node", ""), ("hello_peer", "node", MISSING), ("hello_peer", "node", 1),
    ("hello_peer", "node", b"n1"),
    # hello_ack
    ("hello_ack", "conn", True), ("hello_ack", "conn", -1), ("hello_ack", "conn", 2**63 + 1),
    ("hello_ack", "conn", "1"), ("hello_ack", "conn", MISSING), ("hello_ack", "conn", 1.0),
    ("hello_ack", "node", ""), ("hello_ack", "node", MISSING), ("hello_ack", "node", 1),
    ("hello_ack", "mfs", 0), ("hello_ack", "mfs", 2**31 + 1), ("hello_ack", "mfs", False),
    ("hello_ack", "mfs", MISSING),
    # sub / unsub
    ("sub", "name", MISSING), ("sub", "name", None), ("sub", "name", "org/ns/app"),
    ("sub", "name", ["org", "ns", "app"]), ("sub", "name", ["org", "ns", "app", None, None]),
    ("sub", "name", ["org", "", "app", None]), ("sub", "name", ["org", "ns", "a/b", None]),
    ("sub", "name", ["org", "ns", "app", -1]), ("sub", "name", ["org", "ns", "app", U64]),
    ("sub", "name", ["org", "ns", "app", False]), ("sub", "rid", True), ("sub", "rid", -1),
    ("sub", "rid", 2**32), ("sub", "rid", "1"), ("sub", "rid", None),
    ("unsub", "name", ["org", "ns", "app", "1"]), ("unsub", "rid", 1.5),
    ("unsub", "name", MISSING),
    # sub_ack
    ("sub_ack", "rid", MISSING), ("sub_ack", "rid", True), ("sub_ack", "rid", -1),
    ("sub_ack", "ok", 1), ("sub_ack", "ok", "true"), ("sub_ack", "ok", None),
    ("sub_ack", "code", b"c"), ("sub_ack", "code", 1), ("sub_ack", "msg", 1),
    ("sub_ack", "msg", b"m"),
    # pub
    ("pub", "src", MISSING), ("pub", "src", None), ("pub", "src", ["org", "ns", "app", None]),
    ("pub", "src", ["org", "ns", "app"]), ("pub", "src", ["org", "ns", "app", 1, 1]),
    ("pub", "src", ["org", "ns", "", 1]), ("pub", "src", ["o/rg", "ns", "app", 1]),
    ("pub", "src", ["org", "ns", "app", -1]), ("pub", "src", ["org", "ns", "app", U64]),
    ("pub", "src", ["org", "ns", "app", True]),
    ("pub", "dst", MISSING), ("pub", "dst", None), ("pub", "dst", ["org", "ns", "app"]),
    ("pub", "dst", ["org", "ns", "app", None, 1]), ("pub", "dst", ["org", "ns", "/", None]),
    ("pub", "dst", ["org", "ns", "app", -5]),
    ("pub", "fan", 0), ("pub", "fan", True), ("pub", "fan", 2**32), ("pub", "fan", MISSING),
    ("pub", "fan", 1.0), ("pub", "ttl", 256), ("pub", "ttl", -1), ("pub", "ttl", MISSING),
    ("pub", "ttl", False), ("pub", "sid", -1), ("pub", "sid", 2**32), ("pub", "sid", True),
    ("pub", "st", 256), ("pub", "st", "0"), ("pub", "k", "1"), ("pub", "k", 256),
    ("pub", "mid", 2**32), ("pub", "mid", None), ("pub", "pt", b"text"), ("pub", "pt", 1),
    ("pub", "meta", ["k", "v"]), ("pub", "meta", {"k": 1}), ("pub", "meta", {"k": b"v"}),
    ("pub", "meta", {b"k": "v"}), ("pub", "meta", {"k": None}), ("pub", "meta", "k=v"),
    ("pub", "id", b"tok"), ("pub", "id", 1), ("pub", "err", 1), ("pub", "err", None),
    ("pub", "err", "false"), ("pub", "orig", "n1"), ("pub", "orig", [""]),
    ("pub", "orig", [1]), ("pub", "orig", [b"n1"]), ("pub", "orig", ["n"] * 257),
    ("pub", "orig", {"n1": 1}), ("pub", "body", "payload"), ("pub", "body", None),
    ("pub", "body", [1, 2]), ("pub", "body", 1),
    # err
    ("err", "code", MISSING), ("err", "code", None), ("err", "code", 1),
    ("err", "code", b"no_route"), ("err", "msg", b"m"), ("err", "msg", None),
    ("err", "ref", -1), ("err", "ref", None), ("err", "ref", True), ("err", "ref", 2**32),
    ("err", "name", ["org", "ns", "app"]), ("err", "name", "org/ns/app"),
    ("err", "name", ["org", "ns", "app", -1]), ("err", "sid", True), ("err", "sid", None),
    ("err", "sid", "2"),
    # ping / pong
    ("ping", "n", -1), ("ping", "n", True), ("ping", "n", 1.0),
    ("ping", "n", None), ("pong", "n", "1"), ("pong", "n", -(2**63)), ("pong", "n", b"\x01"),
    # routes
    ("routes", "add", {"x": 1}), ("routes", "add", None), ("routes", "del", "x"),
    ("routes", "del", None), ("routes", "add", [[["org", "ns", "app", None]]]),
    ("routes", "add", [[["org", "ns", "app", None], []]]),
    ("routes", "add", [[["org", "ns", "app", None], ["n"] * 256]]),
    ("routes", "add", [[["org", "ns", "app", None], [""]]]),
    ("routes", "add", [[["org", "ns", "app", None], "n1"]]),
    ("routes", "add", [[["org", "ns", "app", None], [1]]]),
    ("routes", "add", [[["org", "ns"], ["n1"]]]), ("routes", "add", ["x"]),
    ("routes", "add", [[["org", "ns", "app", None], ["n1"], 3]]),
    ("routes", "del", [[["org", "ns", "app", None]]]),
    ("routes", "del", [[["org", "ns", "app", None], 1]]),
    ("routes", "del", [[["org", "ns", "app", None], ""]]),
    ("routes", "del", [[["org", "", "app", None], "n1"]]),
    ("routes", "del", [["org/ns/app", "n1"]]),
    ("routes", "full", 1), ("routes", "full", None),
]


def _with(kind: str, key: str, value: Any) -> dict[str, Any]:
    d = copy.deepcopy(VALID[kind])
    if value is MISSING:
        del d[key]
    else:
        d[key] = value
    return d


@pytest.mark.parametrize(("kind", "key", "value"), BAD_FIELDS,
                         ids=[f"{k}-{f}-{i}" for i, (k, f, _) in enumerate(BAD_FIELDS)])
def test_wrong_field_values(kind: str, key: str, value: Any) -> None:
    exc = assert_raises(MalformedFrameError, "malformed", _with(kind, key, value))
    assert isinstance(exc, ValueError)
    assert exc.field is not None


@pytest.mark.parametrize("key", ["src", "dst", "fan", "ttl", "meta", "orig", "body"])
def test_check_publish_rejects_what_decode_message_rejects(key: str) -> None:
    bad = {"src": ["org", "ns", "app", None], "dst": ["org", "ns"], "fan": 0, "ttl": 300,
           "meta": {"k": 1}, "orig": [""], "body": "text"}[key]
    d = _with("pub", key, bad)
    with pytest.raises(MalformedFrameError) as info:
        check_publish(d, LIMITS)
    assert info.value.field == key


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("hello", "name", ["org", "ns", " app", 1]),
        ("hello", "name", ["org", "ns ", "app", 1]),
        ("pub", "src", ["org", "ns", "app\t", 1]),
        ("pub", "dst", [" ", "ns", "app", None]),
        ("sub", "name", ["org", "ns", "\napp", None]),
        ("err", "name", ["org", "ns", "app ", None]),
        ("routes", "add", [[["org", " ns", "app", None], ["n1"]]]),
    ],
)
def test_name_components_with_surrounding_whitespace_are_malformed(kind: str, key: str,
                                                                    value: Any) -> None:
    # Name() refuses such components with a plain ValueError; the codec must turn every
    # violation into a ProtocolError so that nodes handle it as a malformed frame.
    assert_raises(MalformedFrameError, "malformed", _with(kind, key, value))


def test_wildcard_allowed_where_expected() -> None:
    wildcard = ["org", "ns", "app", None]
    assert decode(_with("pub", "dst", wildcard)).destination == Name("org", "ns", "app")
    assert decode(_with("sub", "name", wildcard)).name.id is None
    assert decode(_with("unsub", "name", wildcard)).name.id is None
    assert decode(_with("err", "name", wildcard)).name == Name("org", "ns", "app")
    assert decode(_with("pub", "dst", ["org", "ns", "app", MAX_ID])).destination.id == MAX_ID
    assert decode(_with("pub", "src", ["org", "ns", "app", 0])).source.id == 0


def test_optional_fields_default() -> None:
    assert decode({"v": 1, "t": "ping"}) == Ping(nonce=0)
    assert decode({"v": 1, "t": "sub", "name": ["a", "b", "c", None]}).request_id == 0
    assert decode({"v": 1, "t": "err", "code": "x"}) == Error(code="x")
    assert decode({"v": 1, "t": "routes"}) == RouteUpdate()
    hello = decode({"v": 1, "t": "hello", "role": "peer", "tok": "", "node": "n"})
    assert hello == Hello(token="", role="peer", node_id="n")
    # Extra keys are ignored (forward compatibility).
    assert decode({**PING, "future": [1, {"a": b"x"}]}) == Ping(nonce=1)


def test_boundaries_accepted() -> None:
    assert decode(_with("ping", "n", U64)) == Ping(nonce=U64)
    assert decode(_with("hello_ack", "conn", 2**63)).conn_id == 2**63
    assert decode(_with("hello_ack", "mfs", 2**31)).max_frame_size == 2**31
    assert decode(_with("pub", "fan", U32)).fanout == U32
    assert decode(_with("pub", "ttl", 255)).ttl == 255
    assert decode(_with("pub", "orig", ["n"] * 256)).origins == ("n",) * 256
    assert len(decode(_with("routes", "add", [[["a", "b", "c", None], ["n"] * 255]])).add[0]
               .path) == 255


def test_unknown_type_tag() -> None:
    exc = assert_raises(UnknownMessageTypeError, "unknown_type", {"v": 1, "t": "teleport"})
    assert isinstance(exc, UnknownMessageTypeError)
    assert exc.type_tag == "teleport"
    assert_raises(UnknownMessageTypeError, "unknown_type", {"v": 1, "t": ""})
    assert_raises(UnknownMessageTypeError, "unknown_type", {"v": 1, "t": "PING"})


# -- limits -----------------------------------------------------------------------------

N = LIMITS.max_name_component
E = LIMITS.max_metadata_entries
MV = LIMITS.max_metadata_value
T = LIMITS.max_token_size


@pytest.mark.parametrize(
    ("kind", "key", "value"),
    [
        ("hello", "name", ["o" * (N + 1), "ns", "app", 1]),
        ("hello", "name", ["org", "é" * (N // 2 + 1), "app", 1]),  # too many UTF-8 bytes
        ("hello", "tok", "t" * (T + 1)),
        ("hello", "tok", "€" * (T // 3 + 1)),
        ("hello", "caps", {"k" * (N + 1): 1}),
        ("hello_peer", "node", "n" * (N + 1)),
        ("hello_ack", "node", "n" * (N + 1)),
        ("sub", "name", ["org", "ns", "a" * (N + 1), None]),
        ("unsub", "name", ["org", "ns", "a" * (N + 1), None]),
        ("sub_ack", "code", "c" * 65),
        ("sub_ack", "msg", "m" * (MV + 1)),
        ("pub", "src", ["org", "ns", "a" * (N + 1), 1]),
        ("pub", "dst", ["o" * (N + 1), "ns", "app", None]),
        ("pub", "meta", {f"k{i}": "v" for i in range(E + 1)}),
        ("pub", "meta", {"k": "v" * (MV + 1)}),
        ("pub", "meta", {"k" * (N + 1): "v"}),
        ("pub", "pt", "p" * (N + 1)),
        ("pub", "id", "i" * (T + 1)),
        ("pub", "orig", ["n" * (N + 1)]),
        ("err", "code", "c" * 65),
        ("err", "msg", "m" * (MV + 1)),
        ("routes", "add", [[["org", "ns", "app", None], ["n" * (N + 1)]]]),
        ("routes", "del", [[["org", "ns", "app", None], "n" * (N + 1)]]),
    ],
)
def test_over_limit_fields(kind: str, key: str, value: Any) -> None:
    exc = assert_raises(LimitExceededError, "limit_exceeded", _with(kind, key, value))
    assert isinstance(exc, LimitExceededError)
    assert exc.value is not None
    assert exc.value > exc.limit


def test_fields_at_limit_are_accepted() -> None:
    d = _with("pub", "meta", {f"k{i:02}": "v" * MV for i in range(E)})
    d["src"] = ["o" * N, "é" * (N // 2), "app", 1]
    d["id"] = "i" * T
    out = decode(d)
    assert isinstance(out, Publish)
    assert out.metadata is not None
    assert len(out.metadata) == E
    assert decode(_with("hello", "tok", "t" * T)).token == "t" * T


def test_custom_limits_apply() -> None:
    small = Limits(max_name_component=4, max_metadata_entries=1, max_metadata_value=3,
                   max_token_size=5)
    decode(_with("sub", "name", ["org", "ns", "abcd", None]), small)
    assert_raises(LimitExceededError, "limit_exceeded",
                  _with("sub", "name", ["org", "ns", "abcde", None]), small)
    assert_raises(LimitExceededError, "limit_exceeded",
                  _with("pub", "meta", {"a": "1", "b": "2"}), small)
    assert_raises(LimitExceededError, "limit_exceeded", _with("pub", "meta", {"a": "1234"}),
                  small)
    assert_raises(LimitExceededError, "limit_exceeded", _with("hello", "tok", "123456"), small)
    with pytest.raises(LimitExceededError):
        check_publish(_with("pub", "meta", {"a": "1", "b": "2"}), small)


# -- fuzzing: only ProtocolError ever escapes -------------------------------------------

TYPE_TAGS = [cls.TYPE for cls in ALL_TYPES]
FIELD_KEYS = sorted({k for d in VALID.values() for k in d} - {"v", "t"})


def decode_or_protocol_error(raw: bytes | memoryview) -> None:
    """Decode a body; any exception other than a ProtocolError propagates and fails."""
    error: ProtocolError | None = None
    try:
        decode_message(decode_frame(raw))
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert isinstance(error, SlimError)
        assert isinstance(error.code, str)


@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    decode_or_protocol_error(raw)


@given(messages, st.data())
def test_fuzz_mutated_valid_bodies(message: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(raw)))
        if op == "flip" and pos < len(raw):
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    decode_or_protocol_error(bytes(raw))


@settings(max_examples=100)
@given(msgpack_values)
def test_fuzz_arbitrary_objects(obj: Any) -> None:
    decode_or_protocol_error(body(obj))


@settings(max_examples=100)
@given(
    st.sampled_from(TYPE_TAGS) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(FIELD_KEYS) | st.text(max_size=4),
                    msgpack_values | name_like, max_size=8),
)
def test_fuzz_envelopes_with_arbitrary_fields(tag: str, fields: dict[str, Any]) -> None:
    decode_or_protocol_error(body({**fields, "v": 1, "t": tag}))


@given(st.sampled_from(sorted(VALID)), st.data())
def test_fuzz_one_field_of_a_valid_message(kind: str, data: st.DataObject) -> None:
    d = copy.deepcopy(VALID[kind])
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(msgpack_values | name_like)
    decode_or_protocol_error(body(d))


@given(st.sampled_from(["name", "src", "dst"]), name_like)
def test_fuzz_name_fields(key: str, value: list[Any]) -> None:
    kind = "pub" if key != "name" else "sub"
    decode_or_protocol_error(body(_with(kind, key, value)))


@given(messages, st.text(max_size=3))
def test_fuzz_name_components(message: Any, junk: str) -> None:
    # Any string may appear as a name component on the wire.
    d = message.to_dict()
    assume("name" in d or "src" in d)
    key = "src" if "src" in d else "name"
    if d[key] is None:
        return
    d[key] = [junk, *d[key][1:]]
    decode_or_protocol_error(body(d))


# -- the error tree ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FrameTooLargeError, MalformedFrameError,
                                 UnknownMessageTypeError, UnsupportedVersionError,
                                 LimitExceededError])
def test_protocol_errors_are_slim_errors(cls: type[ProtocolError]) -> None:
    assert issubclass(cls, ProtocolError)
    assert issubclass(cls, SlimError)
    assert issubclass(ProtocolError, SlimError)
    assert getattr(node_lite, cls.__name__) is cls


def test_malformed_frame_error_is_value_error() -> None:
    assert issubclass(MalformedFrameError, ValueError)
    exc = MalformedFrameError("bad", field="f")
    assert (exc.reason, exc.field, exc.code) == ("bad", "f", "malformed")
    assert "'f'" in str(exc)


def test_error_codes_match_wire_codes() -> None:
    from node_lite.wire import ErrorCode

    assert FrameTooLargeError(1, 0).code == ErrorCode.FRAME_TOO_LARGE
    assert MalformedFrameError("x").code == ErrorCode.MALFORMED
    assert UnknownMessageTypeError("x").code == ErrorCode.UNKNOWN_TYPE
    assert UnsupportedVersionError(2).code == ErrorCode.UNSUPPORTED_VERSION
    assert LimitExceededError("x", 1, 2).code == ErrorCode.LIMIT_EXCEEDED


def test_a_name_sent_to_another_process_hashes_there_afresh() -> None:
    # Names cache their hash; string hashes differ between processes, so a
    # pickled name must not carry its hash along (the multiprocess runtime
    # sends names to workers).
    import pickle
    import subprocess
    import sys

    name = Name("org", "ns", "app", 7)
    assert pickle.loads(pickle.dumps(name)) == name and copy.deepcopy(name) == name
    code = ("import pickle, sys\n"
            "from node_lite import Name\n"
            "n = pickle.loads(sys.stdin.buffer.read())\n"
            "print({Name('org', 'ns', 'app', 7): 'found'}.get(n, 'missing'))\n")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(name),
                         capture_output=True, env={"PYTHONHASHSEED": "12345"}, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert out.stdout.decode().strip() == "found"


# -- check_publish with known names: the one-expression path must agree with the walk ---

def _verdict(d: dict[str, Any], known: set[tuple[Any, ...]] | None) -> str | None:
    try:
        check_publish(d, LIMITS, known)
    except MalformedFrameError as exc:
        return f"{type(exc).__name__}:{exc.field}"
    except LimitExceededError as exc:
        return type(exc).__name__
    return None


# A data frame as sessions send it: no optional field, so the one-expression path applies.
PLAIN_PUB = {k: v for k, v in VALID["pub"].items() if k not in ("pt", "meta", "id", "err", "orig")}


def _warm() -> set[tuple[Any, ...]]:
    known: set[tuple[Any, ...]] = set()
    check_publish(copy.deepcopy(PLAIN_PUB), LIMITS, known)
    assert (*PLAIN_PUB["src"],) in known and (*PLAIN_PUB["dst"],) in known
    return known


def test_check_publish_takes_the_short_path_for_known_names() -> None:
    known = _warm()
    assert check_publish(copy.deepcopy(PLAIN_PUB), LIMITS, known)
    assert not check_publish(copy.deepcopy(PLAIN_PUB), LIMITS, None)
    assert not check_publish({**PLAIN_PUB, "pt": "text"}, LIMITS, known)
    assert not check_publish({**PLAIN_PUB, "src": ["org", "ns", "new", 1]}, LIMITS, known)


# Values that equal a cached id or a bound without being one: bool, float, big ints.
_SLY = [True, False, 1.0, 0, -1, 2**32 - 1, 2**32, 255, 256, None, "1", b"1", [1], 2**64]


@pytest.mark.parametrize(("kind", "key", "value"), [f for f in BAD_FIELDS if f[0] == "pub"]
                         + [("pub", k, v) for k in ("fan", "ttl", "sid", "mid", "st", "k")
                            for v in _SLY]
                         + [("pub", k, [*PLAIN_PUB[k][:3], v]) for k in ("src", "dst")
                            for v in _SLY]
                         # Found by fuzzing: an unhashable component raised TypeError
                         # from the known-names lookup.
                         + [("pub", k, [*PLAIN_PUB[k][:i], v, *PLAIN_PUB[k][i + 1:]])
                            for k in ("src", "dst") for i in range(3) for v in ([1], {})])
def test_check_publish_with_known_names_agrees_with_the_full_walk(kind: str, key: str,
                                                                   value: Any) -> None:
    d = copy.deepcopy(PLAIN_PUB)
    if value is MISSING:
        d.pop(key, None)
    else:
        d[key] = value
    assert _verdict(d, _warm()) == _verdict(copy.deepcopy(d), None)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["src", "dst", "fan", "ttl", "sid", "mid", "st", "k",
                                        "body", "pt", "id", "err", "meta", "orig"]),
                       st.sampled_from([*_SLY, MISSING, ["org", "ns", "app", 1],
                                        ["org", "ns", "app", True], ["org", "ns", "app", None],
                                        b"", {"a": "b"}, ["n1"], "text"])))
def test_check_publish_fast_path_agrees_with_the_full_walk(changes: dict[str, Any]) -> None:
    d = copy.deepcopy(PLAIN_PUB)
    for key, value in changes.items():
        if value is MISSING:
            d.pop(key, None)
        else:
            d[key] = copy.deepcopy(value)
    assert _verdict(d, _warm()) == _verdict(copy.deepcopy(d), None)


@pytest.mark.parametrize("depth", [1, 600, 1000])
def test_a_deeply_nested_frame_is_walked_without_recursion(depth: int) -> None:
    # Found by fuzzing: the walk for Timestamp objects recursed, so a frame nested
    # some 500 deep with a timestamp mark raised RecursionError, not a ProtocolError.
    head = b"\x83\xa1v\x01\xa1t\xa3pub\xa1x"
    with pytest.raises(MalformedFrameError, match="timestamp"):
        decode_frame(head + b"\x91" * depth + TIMESTAMP_ENCODINGS["fixext4"], check_ext=True)
    d = decode_frame(head + b"\x91" * depth + b"\xc0", check_ext=True)
    assert d["t"] == "pub"
