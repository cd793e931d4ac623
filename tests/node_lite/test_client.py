"""The client side of a node connection: what it makes of the bytes a node sends."""

from __future__ import annotations

import struct

import anyio
import pytest

from node_lite import Limits
from node_lite._client import NodeConnection
from node_lite._transport import memory_stream_pair
from node_lite.wire import Ping, decode_message, encode_frame

pytestmark = pytest.mark.anyio


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("bad", [
    b"\x93\x01\x02\x03",  # an array, not a map
    b"\xc1",  # a byte msgpack never uses
    b"\x82\xa1v\x01\xa1t\xd6\xff\x00\x00\x00\x01",  # a timestamp as the type tag
])
async def test_a_bad_frame_costs_only_itself(bad: bytes) -> None:
    ours, theirs = memory_stream_pair()
    async with ours, theirs, anyio.create_task_group() as tg:
        conn = NodeConnection(ours, tg, limits=Limits())
        # One read: a good frame, the bad one, another good one.
        await theirs.send(encode_frame(Ping(nonce=1)) + raw_frame(bad)
                          + encode_frame(Ping(nonce=2)))
        with anyio.fail_after(5):
            envelopes = await conn.receive_envelopes()
        assert [decode_message(d) for d in envelopes] == [Ping(nonce=1), Ping(nonce=2)]
        assert sum(conn.bad_frames.values()) == 1
        assert set(conn.bad_frames) <= {"MalformedFrameError", "UnsupportedVersionError"}
        tg.cancel_scope.cancel()


async def test_reads_go_to_the_callback_only_once_released(anyio_backend_name: str) -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as multi:
        (listener,) = multi.listeners
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as ours, \
                anyio.create_task_group() as tg:
            theirs = await tg.start(_accept_one, listener)
            conn = NodeConnection(ours, tg, limits=Limits())
            taken: list[bytes] = []
            took = anyio.Event()

            def take(data: bytes) -> bool:
                taken.append(data)
                took.set()
                return True

            reading = conn.read_in_callback(take)
            if anyio_backend_name != "asyncio":  # trio streams have no such callback
                assert reading is None
                tg.cancel_scope.cancel()
                return
            assert reading is not None and reading.held
            with anyio.fail_after(5):
                # Held: bytes wait for the reader, as before the hello.
                await theirs.send(encode_frame(Ping(nonce=1)))
                assert [decode_message(d) for d in await conn.receive_envelopes()] == \
                    [Ping(nonce=1)]
                assert conn.caught_up
                reading.release()
                await theirs.send(encode_frame(Ping(nonce=2)) + encode_frame(Ping(nonce=3)))
                await took.wait()
            envelopes = [d for data in taken for d in conn.decode(data)]
            assert [decode_message(d) for d in envelopes] == [Ping(nonce=2), Ping(nonce=3)]
            tg.cancel_scope.cancel()


async def _accept_one(listener: anyio.abc.SocketListener, *,
                      task_status: anyio.abc.TaskStatus[anyio.abc.SocketStream]) -> None:
    async with await listener.accept() as stream:
        task_status.started(stream)
        await anyio.sleep_forever()
