"""tune_reading: an asyncio transport keeps reading between receives, never more
than READ_AHEAD chunks ahead of its reader, and loses nothing."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream, SocketAttribute

from node_lite._transport import READ_AHEAD, READ_SIZE, _asyncio_transport, tune_reading
from node_lite._util import current_backend

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[ByteStream, socket.socket]]:
    """(the accepted stream, tuned; the client's raw non-blocking socket)."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        raw = socket.create_connection(
            ("127.0.0.1", listener.extra(SocketAttribute.local_port)))
        with raw:
            raw.setblocking(False)
            stream = await listener.listeners[0].accept()
            async with stream:
                assert tune_reading(stream) == READ_SIZE
                yield stream, raw


def fill(raw: socket.socket, sent: bytearray) -> None:
    """Write numbered bytes until the kernel takes no more."""
    while True:
        block = bytes((len(sent) + i) % 251 for i in range(65536))
        try:
            n = raw.send(block)
        except BlockingIOError:
            return
        sent.extend(block[:n])


async def test_a_waiting_reader_leaves_the_transport_reading() -> None:
    async with tcp_pair() as (stream, raw):
        for i in range(3):
            got: list[bytes] = []

            async def read(into: list[bytes]) -> None:
                into.append(await stream.receive(READ_SIZE))

            async with anyio.create_task_group() as tg:
                tg.start_soon(read, got)
                await anyio.lowlevel.checkpoint()  # the reader waits
                raw.send(b"ping %d" % i)
            assert got == [b"ping %d" % i]
            transport = _asyncio_transport(stream)
            if current_backend() == "asyncio":
                # anyio alone pauses after every wait (two selector changes per read)
                assert transport.is_reading()


async def test_read_ahead_is_bounded_and_nothing_is_lost() -> None:
    sent = bytearray()
    async with tcp_pair() as (stream, raw):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        transport = _asyncio_transport(stream)
        if current_backend() == "asyncio":
            # Nobody receives: the transport reads READ_AHEAD chunks, then pauses.
            with anyio.fail_after(10):
                while transport.is_reading():
                    fill(raw, sent)
                    await anyio.lowlevel.checkpoint()
            queue = stream._protocol.read_queue  # type: ignore[attr-defined]
            assert len(queue) == READ_AHEAD
            assert sum(map(len, queue)) <= READ_AHEAD * READ_SIZE
        received = bytearray()
        with anyio.fail_after(20):
            while len(sent) < 8 * READ_SIZE:
                fill(raw, sent)
                received.extend(await stream.receive(READ_SIZE))
            raw.shutdown(socket.SHUT_WR)
            while True:
                try:
                    received.extend(await stream.receive(READ_SIZE))
                except anyio.EndOfStream:
                    break
        assert received == sent
