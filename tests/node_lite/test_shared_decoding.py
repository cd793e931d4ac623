"""Frames decoded once for all the connections of an event loop (SharedDecoding)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from node_lite import Name, NodeConfig, open_node
from node_lite._client import (
    _PAUSE,
    _SHARED_ENTRIES,
    _SHARED_FRAME_MAX,
    SharedDecoding,
    shared_decoding,
)
from node_lite.wire import (
    FrameDecoder,
    MalformedFrameError,
    Publish,
    Subscribe,
    SubscribeAck,
    decode_frame,
    encode_frame,
    frame_prefix,
)
from tests.helpers import SECRET, app_connection, unique

SRC = Name("org", "ns", "src", 1)
CHAN = Name("org", "ns", "chan")


def frame(mid: int, payload: bytes = b"p") -> memoryview:
    body = encode_frame(Publish(source=SRC, destination=CHAN, fanout=4, message_id=mid,
                                payload=payload))[4:]
    return memoryview(body)


def test_a_frame_is_decoded_once_and_equals_its_own_decoding() -> None:
    shared = SharedDecoding()
    first = shared.decode(frame(1), check_ext=False)
    again = shared.decode(memoryview(bytes(frame(1))), check_ext=True)  # other buffer
    assert again is first
    assert first == decode_frame(frame(1))
    assert first.memo == ()  # kept for several readers: nothing derived from it yet
    assert shared.decode(frame(2), check_ext=False) is not first


def test_a_frame_to_one_instance_is_not_kept() -> None:
    # Only one connection gets it: keeping it would only age it in the collector.
    shared = SharedDecoding()
    body = encode_frame(Publish(source=SRC, destination=Name("org", "ns", "dst", 2),
                                message_id=1, payload=b"p"))[4:]
    first = shared.decode(memoryview(body), check_ext=False)
    assert first == decode_frame(body)
    assert shared.decode(memoryview(body), check_ext=False) is not first
    assert not shared._new and not shared._old


def test_a_frame_that_does_not_decode_is_refused_every_time() -> None:
    shared = SharedDecoding()
    bad = memoryview(b"\x81\xa1v\x01")  # no type tag
    for _ in range(2):
        with pytest.raises(MalformedFrameError):
            shared.decode(bad, check_ext=False)
    with pytest.raises(MalformedFrameError):
        decode_frame(bad)


def test_a_large_frame_is_decoded_each_time() -> None:
    shared = SharedDecoding()
    big = frame(1, b"x" * _SHARED_FRAME_MAX)
    first = shared.decode(big, check_ext=False)
    second = shared.decode(big, check_ext=False)
    assert first == second and first is not second


def test_entries_are_bounded_by_two_generations() -> None:
    shared = SharedDecoding()
    for mid in range(3 * _SHARED_ENTRIES + 5):
        shared.decode(frame(mid), check_ext=False)
    assert len(shared._new) + len(shared._old) <= 2 * _SHARED_ENTRIES
    # The most recent generation is still there.
    last = 3 * _SHARED_ENTRIES + 4
    assert shared.decode(frame(last), check_ext=False) is shared.decode(frame(last),
                                                                         check_ext=False)


def test_frames_nobody_shares_pause_the_sharing_and_shared_ones_do_not() -> None:
    alone = SharedDecoding()
    for mid in range(_SHARED_ENTRIES + 1):  # misses only
        alone.decode(frame(mid), check_ext=False)
    assert alone.paused == _PAUSE
    group = SharedDecoding()
    for mid in range(_SHARED_ENTRIES + 1):
        for _ in range(2):  # each frame read by two connections
            group.decode(frame(mid), check_ext=False)
    assert group.paused == 0


async def _subscribed(conn: Any, chan: Name) -> None:
    await conn.send(Subscribe(name=chan, request_id=1))
    with anyio.fail_after(5):
        assert isinstance(await conn.receive(), SubscribeAck)


async def _envelope(conn: Any) -> dict[str, Any]:
    with anyio.fail_after(5):
        while True:
            for d in await conn.receive_envelopes():
                if d["t"] == "pub":
                    return d


@pytest.mark.anyio
async def test_connections_of_one_loop_share_the_decoded_frame() -> None:
    chan = Name("org", "ns", unique("chan"))
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        async with app_connection(node.url, "src") as (src, src_name), \
                app_connection(node.url, "a") as (a, _), \
                app_connection(node.url, "b") as (b, _):
            shared = shared_decoding()
            assert shared.connections == 3
            for conn in (a, b):
                await _subscribed(conn, chan)
            await src.send(Publish(source=src_name, destination=chan, fanout=2,
                                   payload=b"both"))
            got_a, got_b = await _envelope(a), await _envelope(b)
            assert got_a is got_b
            assert got_a["body"] == b"both"
        assert shared.connections == 0


@pytest.mark.anyio
async def test_a_lone_connection_decodes_its_frames_itself() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        async with app_connection(node.url, "solo") as (solo, _name):
            shared = shared_decoding()
            assert shared.connections == 1
            await _subscribed(solo, Name("org", "ns", unique("chan")))
            assert not shared._new and not shared._old


def test_a_buffer_of_frames_decodes_as_each_frame_alone() -> None:
    import msgpack

    from node_lite.wire import ProtocolError

    stamped = msgpack.packb({**decode_frame(frame(3)), "when": msgpack.Timestamp(1)})
    big = frame(2, b"x" * _SHARED_FRAME_MAX)
    bodies = [bytes(frame(1)), bytes(big), bytes(frame(4))]

    def spans(bodies: list[bytes]) -> tuple[bytes, list[int]]:
        return FrameDecoder().feed_spans(
            b"".join(frame_prefix(len(b)) + b for b in bodies))

    shared = SharedDecoding()
    buf, bounds = spans(bodies)
    first = shared.decode_spans(buf, bounds)
    assert first == [decode_frame(b) for b in bodies]
    buf2, _ = spans(bodies)  # the same frames read by another connection
    again = shared.decode_spans(buf2, bounds)
    assert again[0] is first[0] and again[2] is first[2]
    assert again[1] == first[1] and again[1] is not first[1]  # too large to keep
    assert shared._hits == 2
    # A timestamp (an ext type msgpack decodes itself) is found and refused.
    buf, bounds = spans([bytes(frame(5)), stamped])
    with pytest.raises(ProtocolError, match="timestamp"):
        shared.decode_spans(buf, bounds)
