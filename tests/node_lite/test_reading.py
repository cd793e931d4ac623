"""tune_reading: an asyncio transport keeps reading between receives, never more
than READ_AHEAD chunks ahead of its reader, and loses nothing. read_in_callback: its
bytes go to a CallbackReading instead, or, while held, to the reader, in order."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream, SocketAttribute

from node_lite._transport import (
    READ_AHEAD,
    READ_SIZE,
    CallbackReading,
    _asyncio_transport,
    tune_reading,
)
from node_lite._util import current_backend
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def tcp_pair(reading: CallbackReading | None = None,
                   ) -> AsyncIterator[tuple[ByteStream, socket.socket]]:
    """(the accepted stream, tuned with ``reading``; the client's raw non-blocking socket)."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        raw = socket.create_connection(
            ("127.0.0.1", listener.extra(SocketAttribute.local_port)))
        with raw:
            raw.setblocking(False)
            stream = await listener.listeners[0].accept()
            async with stream:
                assert tune_reading(stream, reading) == READ_SIZE
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


async def test_callback_reading_takes_bytes_without_a_reader() -> None:
    taken: list[bytes] = []

    def take(data: bytes) -> bool:
        taken.append(data)
        return True

    reading = CallbackReading(take)
    async with tcp_pair(reading) as (_stream, raw):
        if current_backend() != "asyncio":
            assert not reading.attached  # trio streams keep their reading task
            return
        assert reading.attached
        for i in range(3):
            frame = b"frame %d" % i
            raw.send(frame)
            await wait_until(lambda frame=frame: b"".join(taken).endswith(frame),
                             message="the callback to take the bytes")
        assert b"".join(taken) == b"frame 0frame 1frame 2"
        assert not reading.held


async def test_callback_reading_is_attached_only_through_tune_reading() -> None:
    taken: list[bytes] = []
    reading = CallbackReading(lambda data: taken.append(data) is None)
    async with tcp_pair() as (stream, raw):  # tuned without it
        assert not reading.attached
        raw.send(b"to the reader")
        with anyio.fail_after(5):
            assert await stream.receive(READ_SIZE) == b"to the reader"
    assert taken == []


async def test_a_hold_hands_later_bytes_to_the_reader_in_order() -> None:
    """The callback holds every third chunk; the reader drains what was queued behind
    it and releases. Bytes taken and bytes read, in the order they were handled,
    are exactly the bytes sent."""
    if current_backend() != "asyncio":
        pytest.skip("callback reading is for asyncio streams")
    handled = bytearray()
    calls = 0

    def take(data: bytes) -> bool:
        nonlocal calls
        handled.extend(data)
        calls += 1
        return calls % 3 != 0

    sent = bytearray()
    holds = 0
    reading = CallbackReading(take)
    async with tcp_pair(reading) as (stream, raw):
        assert reading.attached
        with anyio.fail_after(20):
            while holds < 5:
                fill(raw, sent)
                await anyio.lowlevel.checkpoint()
                if reading.held:
                    holds += 1
                    while True:  # what the reader does: drain, then release
                        chunk = await stream.receive(READ_SIZE)
                        handled.extend(chunk)
                        if not stream._protocol.read_queue:  # type: ignore[attr-defined]
                            break
                    reading.release()
            raw.shutdown(socket.SHUT_WR)
            while True:
                try:
                    chunk = await stream.receive(READ_SIZE)
                except anyio.EndOfStream:
                    break
                handled.extend(chunk)
                reading.release()
    assert holds == 5
    assert len(sent) > 4 * READ_SIZE
    assert handled == sent
