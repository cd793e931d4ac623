"""The outbox: writes taken by the transport at once and writes that wait keep their order."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import ByteStream, SocketAttribute, TaskGroup

from node_lite._transport import (
    WRITE_SLICE,
    Outbox,
    WriteBatch,
    memory_stream_pair,
    pause_reading,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio
CHUNKS = 3000  # 3 MiB: more than the (small) socket buffers hold: some writes wait


@asynccontextmanager
async def tight_connection(serve: Callable[[ByteStream], Awaitable[None]],
                           ) -> AsyncIterator[tuple[TaskGroup, ByteStream]]:
    """A TCP connection to ``serve`` with small socket buffers, so that the kernel
    cannot take much while nobody reads: (a task group, the client end)."""
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, \
            anyio.create_task_group() as tg:
        listener.extra(SocketAttribute.raw_socket).setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        tg.start_soon(listener.serve, serve)
        client = await anyio.connect_tcp("127.0.0.1", listener.extra(SocketAttribute.local_port))
        client.extra(SocketAttribute.raw_socket).setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        try:
            yield tg, client
        finally:
            await client.aclose()
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("flush", ["send_direct", "flush_now"])
async def test_writes_keep_their_order_whether_taken_at_once_or_not(
        anyio_backend_name: str, flush: str) -> None:
    received = bytearray()
    reading = anyio.Event()
    done = anyio.Event()

    async def serve(stream: ByteStream) -> None:
        pause_reading(stream)  # else asyncio reads ahead into memory without bound
        async with stream:
            await reading.wait()
            while len(received) < CHUNKS * 1024:
                received.extend(await stream.receive(65536))
            done.set()
            await anyio.sleep_forever()

    async with tight_connection(serve) as (tg, client):
        batch = WriteBatch()
        outbox = Outbox(client, batch=batch)
        immediate = refused = left_to_writer = 0
        write_now = outbox._write_now
        if write_now is not None:

            def counting(data: bytes | memoryview) -> int:
                nonlocal immediate, refused
                held = write_now(data)
                immediate += held >= 0
                refused += held < 0
                return held

            outbox._write_now = counting
        tg.start_soon(outbox.run)
        with anyio.fail_after(20):
            for i in range(CHUNKS):
                # Queued as a node's reader queues a batch, then sent from here when
                # the writer is idle, else handed to the writer (as the reader does).
                batch.active = True
                outbox.write(i.to_bytes(4, "big") * 256)
                batch.active = False
                before = refused
                if flush == "flush_now":  # what a read callback does: no await
                    outbox.flush_now()
                elif outbox.can_send_direct():
                    await outbox.send_direct()
                else:
                    outbox.wake_writer()
                if refused > before:  # the transport still held bytes
                    assert outbox.pending_frames  # queued for the writer, not awaited
                    left_to_writer += 1
                if i % 3 == 0:
                    await anyio.lowlevel.checkpoint()
            reading.set()
            await done.wait()
        outbox.close()
        await outbox.wait_finished()
    chunks = [int.from_bytes(received[k:k + 4], "big") for k in range(0, len(received), 1024)]
    assert chunks == list(range(CHUNKS))
    assert outbox.failed is None and outbox.bytes_written == CHUNKS * 1024
    if anyio_backend_name == "asyncio":
        assert immediate > 0  # anyio's send() was skipped where the transport was idle
        assert left_to_writer > 0  # and a busy one was left to the writer, in order
    else:
        assert write_now is None  # trio's streams keep using send()


async def test_bytes_the_socket_cannot_take_stay_pending_until_sent() -> None:
    # A large batch handed to an idle asyncio transport would sit in its buffer,
    # unseen: the node's backlog limits (and WAIT backpressure) must see it.
    size = 1 << 20
    reading = anyio.Event()
    received = bytearray()

    async def serve(stream: ByteStream) -> None:
        pause_reading(stream)
        async with stream:
            await reading.wait()
            while len(received) < size:
                received.extend(await stream.receive(65536))

    async with tight_connection(serve) as (tg, client):
        outbox = Outbox(client)
        tg.start_soon(outbox.run)
        outbox.write(b"x" * size)
        await wait_until(lambda: not outbox.pending_frames)  # the writer took the batch
        # The peer reads nothing yet: beyond what the socket buffers (and the
        # transport, up to one slice) took, every byte is still pending.
        assert outbox.pending_bytes >= size - 256 * 1024
        reading.set()
        await wait_until(lambda: len(received) == size and not outbox.pending_bytes)
        assert outbox.bytes_written == size and outbox.failed is None
        outbox.close()
        await outbox.wait_finished()


async def test_an_in_memory_stream_holds_a_bounded_number_of_bytes() -> None:
    # Its buffer counts writes: the outbox writes a large batch in slices, so what
    # the stream holds (unseen by pending_bytes) stays near max_chunks * WRITE_SLICE.
    ours, theirs = memory_stream_pair(max_chunks=2)
    data = bytes(range(256)) * 16384  # 4 MiB
    async with ours, theirs, anyio.create_task_group() as tg:
        outbox = Outbox(ours)
        tg.start_soon(outbox.run)
        outbox.write(data)
        await wait_until(lambda: ours._send.statistics().tasks_waiting_send == 1)
        assert ours._send.statistics().current_buffer_used == 2
        assert outbox.pending_bytes >= len(data) - 3 * WRITE_SLICE
        received = bytearray()
        while len(received) < len(data):
            chunk = await theirs.receive(1 << 30)
            assert len(chunk) <= WRITE_SLICE
            received += chunk
        assert received == data
        outbox.close()
        await outbox.wait_finished()


async def test_a_consumer_that_keeps_reading_is_not_cut_for_a_large_batch() -> None:
    # The write deadline is about progress: a batch far larger than the socket
    # buffers, read slowly but steadily, must not look like a stuck consumer.
    size = 2 << 20
    received = bytearray()

    async def serve(stream: ByteStream) -> None:
        pause_reading(stream)
        async with stream:
            while len(received) < size:
                received.extend(await stream.receive(16384))
                await anyio.sleep(0.005)  # pacing: about 3 MB/s, a slice in ~0.1 s

    async with tight_connection(serve) as (tg, client):
        outbox = Outbox(client, write_deadline=0.25)

        async def watchdog() -> None:  # as the node's, every write_deadline / 4
            while True:
                await anyio.sleep(0.06)
                outbox.check_deadline(anyio.current_time())

        tg.start_soon(watchdog)
        tg.start_soon(outbox.run)
        outbox.write(b"x" * size)
        await wait_until(lambda: len(received) == size or outbox.failed is not None)
        assert outbox.failed is None
        assert received == b"x" * size
        outbox.close()
        await outbox.wait_finished()


async def test_the_write_deadline_sees_progress_after_the_transport_took_more() -> None:
    # On asyncio the transport's buffer shows progress. A send that first waited for
    # a small leftover to drain then appends a large batch: the buffer grows, and
    # from then on every shrink is progress (the watchdog's clock is driven here).
    ours, theirs = memory_stream_pair()
    async with ours, theirs:
        outbox = Outbox(ours, write_deadline=1.0)
        held = [10_000]
        outbox._held = lambda: held[0]
        outbox._send_started, outbox._held_mark = 0.0, math.inf  # a send began at 0
        assert not outbox.check_deadline(0.5)  # the first look counts as progress
        held[0] = 2_000_000  # the large batch appended behind the leftover
        assert not outbox.check_deadline(0.9)
        for now in (1.2, 1.6, 2.0, 2.4, 2.8):
            held[0] -= 100_000  # the reader keeps reading
            assert not outbox.check_deadline(now)
        assert not outbox.check_deadline(3.5)  # stuck since 2.8: within the deadline
        assert outbox.check_deadline(4.0)
        assert outbox.failed == "slow_consumer"
