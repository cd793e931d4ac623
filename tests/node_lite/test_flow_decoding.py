"""A connection decodes the header of each flow once (FlowDecoding)."""

from __future__ import annotations

from typing import Any

import anyio
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_lite import Limits, NodeConfig, ProtocolError, open_node
from node_lite.wire import (
    _FLOW_CHECK,
    _FLOW_FRAME_MAX,
    _FLOW_LENGTHS,
    _FLOW_MAX,
    _FLOW_PAUSE,
    FlowDecoding,
    MalformedFrameError,
    Publish,
    SharedEnvelope,
    check_publish,
    decode_frame,
    timestamp_marks,
)
from tests.helpers import SECRET, app_connection, unique

LIMITS = Limits()
SRC = ["org", "ns", "src", 7]
DST = ["org", "ns", "dst", 9]


def head(src: list[Any] = SRC, dst: list[Any] = DST, **extra: Any) -> dict[str, Any]:
    """A publish's fields before ``mid``, in the order this package writes them."""
    return {"v": 1, "t": "pub", "src": src, "dst": dst, "fan": 1, "ttl": 8, "sid": 5,
            "st": 1, "k": 1, **extra}


def body(mid: int = 1, payload: Any = b"hello", **tail: Any) -> bytes:
    return msgpack.packb({**head(), "mid": mid, **tail, "body": payload}, use_bin_type=True)


def decoded(flows: FlowDecoding, frame: bytes, check_ext: bool | None = False
            ) -> dict[str, Any]:
    """``check_ext`` False: the caller's scan found no timestamp mark; None: unknown,
    the decoder checks where it must."""
    return flows.decode(frame, 0, len(frame), check_ext=check_ext)


def outcome(decode: Any, frame: bytes) -> tuple[str, Any]:
    try:
        return "ok", decode(frame)
    except ProtocolError as exc:
        return "error", type(exc)


def verdict(d: dict[str, Any]) -> bool:
    try:
        check_publish(d, LIMITS)
    except ProtocolError:
        return False
    return True


def test_a_known_flow_decodes_its_tail_only_and_equals_the_full_decoding() -> None:
    flows = FlowDecoding(LIMITS)
    first = decoded(flows, body(1))
    assert first == decode_frame(body(1))
    for mid in (2, 3, 70000):
        d = decoded(flows, body(mid, b"x" * (mid % 300)))
        assert d == decode_frame(body(mid, b"x" * (mid % 300)))
        assert type(d) is SharedEnvelope and d.checked is LIMITS
    assert flows._hits == 3
    # The header's values are shared by the flow's maps; each map is its own.
    assert decoded(flows, body(4)) is not decoded(flows, body(4))


@pytest.mark.parametrize("tail", [
    {"pt": "json"},
    {"meta": {"a": "b"}},
    {"id": "token"},
    {"ack": b"\x90"},
    {"pt": "json", "meta": {"k": "v"}, "ack": b"\x90"},
])
def test_optional_fields_in_the_tail_are_decoded_and_checked(tail: dict[str, Any]) -> None:
    flows = FlowDecoding(LIMITS)
    decoded(flows, body(1, **tail))
    d = decoded(flows, body(2, **tail))
    assert flows._hits == 1
    assert d == decode_frame(body(2, **tail))
    assert d.checked is LIMITS  # type: ignore[attr-defined]


@pytest.mark.parametrize(("good", "bad"), [
    (body(1), body(2, "text, not bytes")),
    (body(1), body(-1)),
    (body(1), body(2**32)),
    (body(1, meta={"k": "v"}), body(2, meta={"k": 5})),
    (body(1, pt="json"), body(2, pt="x" * 1000)),
    (body(1, pt="json"), body(2, pt=3)),
    (body(1, err=True), body(2, err="yes")),
], ids=["str body", "negative mid", "mid over u32", "bad metadata", "long payload type",
        "int payload type", "err not bool"])
def test_a_tail_that_fails_the_checks_is_left_unchecked_for_its_reader(
        good: bytes, bad: bytes) -> None:
    flows = FlowDecoding(LIMITS)
    decoded(flows, good)
    d = decoded(flows, bad)
    assert flows._hits == 1
    assert d == decode_frame(bad)
    assert d.checked is None  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError):
        check_publish(d, LIMITS)


def _with_tail(raw_tail: bytes, count: int) -> bytes:
    """A frame of the known flow whose bytes after the "mid" key are ``raw_tail``."""
    packed_head = b"".join(msgpack.packb(x, use_bin_type=True)
                           for kv in head().items() for x in kv)
    return bytes((0x80 | count,)) + packed_head + b"\xa3mid" + raw_tail


@pytest.mark.parametrize(("raw_tail", "count", "error"), [
    (b"\x02\xa3src\x93\xa1a\xa1b\xa1c\xa4body\xc4\x00", 12, "repeated key"),
    (b"\x02\xa4body\xc4\x00\xa4body\xc4\x01x", 12, "repeated key"),
    (b"\x02\x05\xc4\x00", 11, "map key"),  # an int key
    (b"\x02\xa4body\xc4\x05ab", 11, None),  # truncated
    (b"\x02\xa4body\xc4\x00\xc0", 11, None),  # a byte left over
    (b"\x02\xa4body\xc4\x00", 12, None),  # a pair missing
    (b"\x02\xa4body\xd4\x05\x00", 11, "ext type"),
    (b"\x02\xa4body\xa2\xff\xfe", 11, None),  # invalid UTF-8
], ids=["header key repeated", "tail key repeated", "int key", "truncated", "extra byte",
        "pair missing", "ext", "bad utf-8"])
def test_a_tail_that_does_not_unpack_cleanly_raises_as_the_full_decoding(
        raw_tail: bytes, count: int, error: str | None) -> None:
    flows = FlowDecoding(LIMITS)
    decoded(flows, body(1))
    frame = _with_tail(raw_tail, count)
    with pytest.raises(MalformedFrameError) as full:
        decode_frame(frame)
    with pytest.raises(MalformedFrameError) as got:
        decoded(flows, frame)
    assert str(got.value) == str(full.value)
    if error:
        assert error in str(got.value)
    assert flows._hits == 0
    assert decoded(flows, body(2)) == decode_frame(body(2))  # the flow is still known
    assert flows._hits == 1


def test_a_timestamp_mark_takes_the_full_walk() -> None:
    flows = FlowDecoding(LIMITS)
    decoded(flows, body(1))
    frame = body(2, meta={"t": "x"})[:-1] + b"x"  # any frame: only the flag matters
    stamp = msgpack.packb({**head(), "mid": 2, "when": msgpack.Timestamp(1), "body": b""})
    with pytest.raises(MalformedFrameError, match="timestamp"):
        flows.decode(stamp, 0, len(stamp), check_ext=True)
    assert flows.decode(frame, 0, len(frame), check_ext=True) == decode_frame(frame)
    assert flows._hits == 0


# Where a timestamp hides in a frame of a learned flow (the header's bytes were checked
# when it was learned; the flow fixes the map's size, so the fields are the same):
# (tail of the learning frame, the same tail with a timestamp).
STAMPED_TAILS = {
    "extra": ({"when": 1}, {"when": msgpack.Timestamp(1)}),
    "meta": ({"meta": {"t": "x"}}, {"meta": {"t": msgpack.Timestamp(1)}}),
    "ack": ({"ack": b"a"}, {"ack": msgpack.Timestamp(1)}),
    "mid": ({}, {}),
}


@pytest.mark.parametrize("where", list(STAMPED_TAILS))
def test_unknown_marks_find_a_timestamp_in_the_tail_of_a_flow(where: str) -> None:
    clean, stamped = STAMPED_TAILS[where]
    flows = FlowDecoding(LIMITS)
    first = body(1, b"", **clean)
    assert decoded(flows, first, None) == decode_frame(first)
    mid: Any = msgpack.Timestamp(2) if where == "mid" else 2
    stamp = msgpack.packb({**head(), "mid": mid, **stamped, "body": b""})
    with pytest.raises(MalformedFrameError, match="timestamp"):
        decoded(flows, stamp, None)
    third = body(3, b"", **clean)
    assert decoded(flows, third, None) == decode_frame(third)  # the flow is still known
    assert flows._hits == 1


def test_unknown_marks_scan_a_frame_off_the_flow_path() -> None:
    flows = FlowDecoding(LIMITS)
    stamp = msgpack.packb({**head(), "mid": 1, "when": msgpack.Timestamp(1), "body": b""})
    with pytest.raises(MalformedFrameError, match="timestamp"):
        decoded(flows, stamp, None)  # nothing learned yet: the full decoding, scanned
    big = msgpack.packb({**head(), "mid": 1, "when": msgpack.Timestamp(1),
                         "body": b"x" * _FLOW_FRAME_MAX})
    with pytest.raises(MalformedFrameError, match="timestamp"):
        decoded(flows, big, None)


def test_a_header_with_timestamp_like_bytes_still_decodes_from_its_flow() -> None:
    # One pair of random instance ids in ~1400 holds such bytes: a scan of each frame
    # marks every frame of that flow; the flow path checked the header once instead.
    src = ["org", "ns", "src", int.from_bytes(b"\x10\xd7\xff\x01\x02\x03\x04\x05", "big")]
    frames = [msgpack.packb({**head(src=src), "mid": mid, "body": b"m"}) for mid in (1, 2, 3)]
    assert all(timestamp_marks(f) for f in frames)
    flows = FlowDecoding(LIMITS)
    assert [decoded(flows, f, None) for f in frames] == [decode_frame(f) for f in frames]
    assert flows._hits == 2


def test_only_checked_publishes_in_their_shortest_encoding_are_learned() -> None:
    flows = FlowDecoding(LIMITS)
    bad_src = msgpack.packb({**head(src=["org", "ns", "", 1]), "mid": 1, "body": b""})
    for _ in range(2):
        d = decoded(flows, bad_src)
        assert type(d) is dict  # its reader checks it and refuses it
        assert not verdict(d)
    long_fan = body(1).replace(b"\xa3fan\x01", b"\xa3fan\xce\x00\x00\x00\x01")
    mid_first = msgpack.packb({"mid": 1, **head(), "body": b""})
    not_pub = msgpack.packb({"v": 1, "t": "err", "code": "x", "mid": 1})
    for frame in (long_fan, mid_first, not_pub):
        for _ in range(2):
            assert decoded(flows, frame) == decode_frame(frame)
    assert flows._hits == 0 and not flows._flows


def test_a_frame_of_a_local_app_is_decoded_in_place_past_the_size_limit() -> None:
    flows = FlowDecoding(LIMITS)
    big = body(1, b"x" * _FLOW_FRAME_MAX)
    for _ in range(2):
        d = decoded(flows, big)
        assert d == decode_frame(big) and type(d) is dict
    assert not flows._flows


def test_frames_at_an_offset_of_a_larger_buffer() -> None:
    flows = FlowDecoding(LIMITS)
    frames = [body(mid) for mid in range(1, 4)]
    buf = b"junk" + b"".join(frames) + b"more"
    start = 4
    for frame in frames:
        assert flows.decode(buf, start, start + len(frame), check_ext=False) == \
            decode_frame(frame)
        start += len(frame)
    assert flows._hits == 2


def test_flows_and_header_lengths_are_bounded() -> None:
    flows = FlowDecoding(LIMITS)
    for i in range(_FLOW_MAX + 10):
        decoded(flows, msgpack.packb({**head(src=["org", "ns", "s", i]), "mid": 1,
                                      "body": b""}))
    assert len(flows._flows) <= _FLOW_MAX
    for i in range(2 * _FLOW_LENGTHS):
        decoded(flows, msgpack.packb({**head(src=["org", "ns", "s" * (i + 1), 1]),
                                      "mid": 1, "body": b""}))
    assert len(flows._lengths) <= _FLOW_LENGTHS
    assert len(flows._flows) <= _FLOW_LENGTHS


def test_a_new_flow_per_frame_pauses_the_lookups_and_one_flow_does_not() -> None:
    churn = FlowDecoding(LIMITS)
    for i in range(_FLOW_CHECK):
        decoded(churn, msgpack.packb({**head(src=["org", "ns", "s", i]), "mid": 1,
                                      "body": b""}))
    assert churn.paused == _FLOW_PAUSE
    d = decoded(churn, body(1))
    assert churn.paused == _FLOW_PAUSE - 1 and d == decode_frame(body(1))
    steady = FlowDecoding(LIMITS)
    for mid in range(2 * _FLOW_CHECK):
        decoded(steady, body(mid))
    assert steady.paused == 0


tails = st.dictionaries(
    st.sampled_from(["pt", "meta", "id", "err", "ack", "body", "orig", "x", "src", "ttl"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2**33), st.text(max_size=5),
              st.binary(max_size=5), st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                     max_size=2),
              st.lists(st.text(max_size=4), max_size=4)),
    max_size=4)


@settings(max_examples=300, deadline=None)
@given(mid=st.one_of(st.integers(-1, 2**32 + 1), st.text(max_size=2)), tail=tails,
       cut=st.integers(0, 3))
def test_a_flow_decodes_any_tail_as_the_full_decoding_does(
        mid: Any, tail: dict[str, Any], cut: int) -> None:
    flows = FlowDecoding(LIMITS)
    # Taught by a valid frame of as many fields, so that the frame below is of its flow.
    fill = {f"f{i}": b"" for i in range(len(tail))}
    decoded(flows, msgpack.packb({**head(), "mid": 1, **fill}))
    frame = msgpack.packb({**head(), "mid": mid, **tail}, use_bin_type=True)
    frame = frame[:len(frame) - cut]
    full = outcome(decode_frame, frame)
    got = outcome(lambda f: decoded(flows, f), frame)
    assert got == full
    if got[0] == "ok":
        assert flows._hits == (0 if set(tail) & set(head()) else 1)  # a header field changed
        # Marked checked exactly when the full decoding passes the checks.
        assert (getattr(got[1], "checked", None) is LIMITS) == verdict(full[1])


async def _envelopes(conn: Any, count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with anyio.fail_after(10):
        while len(out) < count:
            out += [d for d in await conn.receive_envelopes() if d["t"] == "pub"]
    return out


@pytest.mark.anyio
async def test_frames_through_a_node_decode_from_their_flow() -> None:
    # Whatever bytes the random instance ids put in the header (about one pair in 1400
    # looks like a timestamp to a scan), the frames decode from their flow.
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        async with app_connection(node.url, unique("src")) as (src, src_name), \
                app_connection(node.url, unique("dst")) as (dst, dst_name):
            for mid in range(1, 51):
                await src.send(Publish(source=src_name, destination=dst_name,
                                       message_id=mid, payload=b"m%d" % mid))
            got = await _envelopes(dst, 50)
    assert [d["body"] for d in got] == [b"m%d" % mid for mid in range(1, 51)]
    assert [d["mid"] for d in got] == list(range(1, 51))
    assert all(type(d) is SharedEnvelope and d.checked is dst._limits for d in got)
    assert dst._flows._hits == 49
