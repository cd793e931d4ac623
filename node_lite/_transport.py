# The one anyio layer under the sans-IO cores: a coalescing outbox per
# connection, an in-memory byte stream for in-process connections, and the
# per-backend read settings measured on this project's machine.
from __future__ import annotations

import math
import os
import select
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._util import Wakeup

# Bytes read per receive(): as many as fit under glibc's mmap threshold (128 KiB).
# A larger read buffer is mmapped, shrunk and unmapped again on every read (tens of
# microseconds each), so asyncio's transports are set to this size (see tune_reading).
READ_SIZE = 124 * 1024
# Chunks an asyncio transport may read ahead of receive() before it pauses.
READ_AHEAD = 2
# Chunks buffered in one direction of an in-memory stream (each one write; an
# outbox writes at most WRITE_SLICE at once).
_MEMORY_CHUNKS = 16
# Largest batch the reading task sends itself instead of waking the writer.
DIRECT_SEND_MAX = 16 * 1024
# Batches larger than this go out in slices on streams whose progress cannot be
# seen (trio, in-memory): the write deadline then measures progress, not the size of
# the batch, and an in-memory stream (which counts writes) holds a bounded number
# of bytes. On asyncio the transport's buffer shows progress instead. (64 KiB slices
# cost trio's node half its throughput with 1 KiB frames.)
WRITE_SLICE = 256 * 1024


async def dial(host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> ByteStream:
    """Open a TCP connection (TLS when a context is given)."""
    if ssl_context is None:
        return await anyio.connect_tcp(host, port)
    return await anyio.connect_tcp(host, port, ssl_context=ssl_context, tls_hostname=host)


def _writable(stream: Any) -> Callable[[], bool]:
    """A check whether a send of a small batch on ``stream`` would complete without
    waiting (made once per stream: finding the socket is not cheap)."""
    if isinstance(stream, MemoryByteStream):
        return stream.can_send
    inner = stream
    while hasattr(inner, "transport_stream"):
        inner = inner.transport_stream
    try:
        sock = inner.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return _never  # not a socket: let the writer task handle it
    poller = select.poll()
    registered = -1

    def writable() -> bool:
        nonlocal registered
        try:
            fd = sock.fileno()
            if fd < 0:
                return False  # closed under us: the writer task will notice
            if fd != registered:
                poller.register(fd, select.POLLOUT)
                registered = fd
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False  # gone: let the writer task handle it

    return writable


def _never() -> bool:
    return False


def _socket_stream(stream: Any) -> Any:
    """The socket stream under a TLS layer (else ``stream`` itself)."""
    return getattr(stream, "transport_stream", stream)


def _asyncio_transport(stream: Any) -> Any:
    """The asyncio transport under an anyio stream (through a TLS layer), else None.

    anyio does not expose it; the read size, read-ahead and direct writes need it.
    """
    return getattr(_socket_stream(stream), "_transport", None)


def _write_now(stream: Any) -> Callable[[bytes | memoryview], int] | None:
    """For a plain TCP stream on anyio's asyncio backend: a function that hands bytes
    to the asyncio transport at once. It returns -1 when it did not (the transport
    is busy), else the bytes the socket did not take (held by the transport).

    anyio's ``send()`` enters a shielded cancel scope and yields to the loop on every
    call, about ten times the cost of the write itself; this skips both whenever the
    transport is idle (nothing buffered, not paused, not closing). Other streams
    (trio, TLS, in-memory) get None and keep using ``send()``.
    """
    if "_asyncio" not in type(stream).__module__:
        return None  # not a plain asyncio socket stream (TLS must encrypt what it sends)
    transport = _asyncio_transport(stream)
    protocol: Any = getattr(stream, "_protocol", None)
    held = _held(stream)
    if held is None or not hasattr(protocol, "write_event") or not hasattr(protocol, "exception"):
        return None

    def write(data: bytes | memoryview) -> int:
        # anyio sets the high-water mark to 0: the transport is paused (its write_event
        # clear) exactly while it holds bytes. Pausing replaces the event: read it each time.
        if not protocol.write_event.is_set() or transport.is_closing() \
                or protocol.exception is not None:
            return -1
        transport.write(data)
        return held()

    return write


def _held(stream: Any) -> Callable[[], int] | None:
    """The bytes an asyncio transport under ``stream`` holds unsent (None elsewhere)."""
    transport = _asyncio_transport(stream)
    size = getattr(transport, "get_write_buffer_size", None)
    return size if callable(size) else None


class CallbackReading:
    """Bytes of a plain asyncio stream handed to ``take`` inside the transport's
    callback, instead of waking a reading task for them: one pass through the event
    loop less per read. Pass one to :func:`tune_reading`, which attaches it where it
    can (plain TCP on asyncio; not TLS, trio, uvloop or in-memory streams).

    ``take`` returns False when work that must wait remains: the callback then holds,
    queueing later bytes in order for the task's ``receive()``, and wakes the task
    with an empty chunk. The task does the waiting part, then calls :meth:`release`.
    """

    __slots__ = ("_resume", "held", "take")

    def __init__(self, take: Callable[[bytes], bool], *, held: bool = False) -> None:
        self.take = take
        #: While set, bytes queue for the task's ``receive()`` instead.
        self.held = held
        self._resume: Callable[[], None] | None = None

    @property
    def attached(self) -> bool:
        return self._resume is not None

    def release(self) -> None:
        """Take bytes in the callback again (reading resumes if the queue had paused it)."""
        self.held = False
        if self._resume is not None:
            self._resume()


def tune_reading(stream: Any, reading: CallbackReading | None = None) -> int:
    """Set up an asyncio stream for a read loop; returns the size to ``receive()``.

    - The transport reads at most that size at once, so a read neither splits a
      chunk nor needs a fresh mmap.
    - It keeps reading between receives, up to READ_AHEAD chunks. anyio resumes
      and pauses the transport around every wait instead: that re-registers the
      socket with the selector twice per wake (two syscalls and a selector key),
      a measurable share of a round trip. Memory stays bounded, as before: past
      READ_AHEAD unread chunks the transport pauses until the reader drains them.

    - With ``reading``, on a plain (not TLS) stream, bytes go to its ``take`` first.

    trio and uvloop streams (whose transports take no new attributes) are left as they are.
    """
    transport = _asyncio_transport(stream)
    if transport is None or not isinstance(getattr(transport, "max_size", None), int):
        return READ_SIZE
    transport.max_size = READ_SIZE
    protocol: Any = getattr(_socket_stream(stream), "_protocol", None)
    queue = getattr(protocol, "read_queue", None)
    if not isinstance(queue, deque) or not hasattr(transport, "is_reading"):
        return READ_SIZE
    pause, resume, received = transport.pause_reading, transport.resume_reading, \
        protocol.data_received

    cb = reading if reading is not None and _socket_stream(stream) is stream else None

    def data_received(data: bytes) -> None:
        if cb is not None and not cb.held and not queue:
            if cb.take(data):
                return
            cb.held = True
            data = b""  # wakes the task, which does what must wait
        received(data)  # the task reads it, after what it holds
        if len(queue) >= READ_AHEAD:
            pause()

    def resume_reading() -> None:
        if len(queue) < READ_AHEAD:
            resume()  # a no-op while reading

    try:
        transport.pause_reading = _nothing
        transport.resume_reading = resume_reading
        protocol.data_received = data_received
    except AttributeError:
        return READ_SIZE
    if cb is not None:
        cb._resume = resume_reading
    if len(queue) < READ_AHEAD:
        resume()
    return READ_SIZE


def _nothing() -> None:
    pass


def pause_reading(stream: Any) -> None:
    """Stop an accepted asyncio stream from reading ahead without bound.

    anyio's asyncio backend resumes the transport only while ``receive()``
    waits, but an accepted transport starts out reading: a fast sender could
    make this process buffer without limit. Pausing it once restores the rule
    "read only when asked". trio streams read only when asked already.
    """
    transport = _asyncio_transport(stream)
    if transport is not None and hasattr(transport, "pause_reading"):
        try:
            transport.pause_reading()
        except RuntimeError:  # already closing
            pass


class WriteBatch:
    """Set while a reader processes a batch: outboxes then leave their writer asleep.

    The reader sends small batches itself afterwards, saving a task switch
    per hop. Safe to share between readers: it is only set around
    synchronous code.
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


class Outbox:
    """Bounded outbound queue of one connection, written by one task that coalesces.

    :meth:`write` never blocks; everything queued is joined into one
    ``send()`` because each anyio send costs a scheduler round trip. A send
    that makes no progress for ``write_deadline`` (see :meth:`check_deadline`)
    marks the consumer slow and ends the writer.
    """

    def __init__(self, stream: ByteStream, *, write_deadline: float = math.inf,
                 low_water: int = 256 * 1024, batch: WriteBatch | None = None) -> None:
        self._stream = stream
        self._writable = _writable(stream)
        self._write_now = _write_now(stream)
        self._held = _held(stream)
        self._held_mark = math.inf  # what the transport held at the last deadline check
        self._batch = batch
        self._buf: list[bytes | memoryview] = []
        self._bytes = 0
        self._frames = 0
        self._inflight = 0
        self._wake: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        self._write_deadline = write_deadline
        self._low_water = low_water
        self.closing = False
        self.close_reason: str | None = None
        self.close_code: str | None = None
        self.failed: str | None = None  # why the writer stopped early
        self.writes = 0
        self.frames_written = 0
        self.bytes_written = 0
        self._finished = anyio.Event()
        self._scope = anyio.CancelScope()
        self._send_started: float | None = None
        self._busy = False  # a direct send is in progress

    @property
    def pending_bytes(self) -> int:
        return self._bytes + self._inflight

    @property
    def pending_frames(self) -> int:
        return self._frames

    @property
    def idle(self) -> bool:
        """The writer is parked and nothing but the latest writes is queued."""
        return self._wake is not None and not self._busy and self._frames <= 1

    @property
    def is_closed(self) -> bool:
        return self.closing or self.failed is not None

    def write(self, data: bytes | memoryview, frames: int = 1) -> None:
        """Queue bytes (``frames`` frames) for the writer (never blocks)."""
        if self.closing or self.failed is not None:
            return
        self._buf.append(data)
        self._bytes += len(data)
        self._frames += frames
        wake = self._wake
        if wake is not None and not self._busy:
            batch = self._batch
            if batch is None or not batch.active:
                self._wake = None
                wake.set()

    def can_send_direct(self) -> bool:
        """Whether the caller may send the queued bytes itself without risk of blocking.

        True when the writer is idle, the batch is small and the socket (or
        in-memory stream) can take it now; on an asyncio transport, when
        :meth:`send_direct` may try it (it leaves a busy one to the writer).
        """
        if self._wake is None or self._busy or not self._buf or self.closing \
                or self.failed is not None:
            return False
        if self._bytes > DIRECT_SEND_MAX:
            return False
        # A direct write to an asyncio transport never waits (send_direct checks
        # that it is idle), so the readiness poll, a syscall, is only for the rest.
        return self._write_now is not None or self._writable()

    def send_now(self) -> bool:
        """:meth:`send_direct` where it needs no await (an asyncio transport): hand the
        queued batch to the transport, or to the writer when the transport is busy.
        False, with nothing done, on other streams."""
        write_now = self._write_now
        if write_now is None:
            return False
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        if write_now(data) >= 0:  # what the socket left is under DIRECT_SEND_MAX
            self.frames_written += self._frames
            self.writes += 1
            self.bytes_written += len(data)
            self._buf = []
            self._bytes = self._frames = 0
        else:  # the transport is busy: the writer waits for it
            self._buf = [data]
            self.wake_writer()
        return True

    def flush_now(self) -> None:
        """Send the queued bytes without awaiting: from here when the transport takes
        them at once (:meth:`send_now`), else by waking the writer."""
        if not (self.can_send_direct() and self.send_now()):
            self.wake_writer()

    async def send_direct(self) -> None:
        """Send the queued batch from the calling task (after :meth:`can_send_direct`)."""
        if self.send_now():
            return
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        self.frames_written += self._frames
        self._buf = []
        self._inflight = len(data)
        self._bytes = self._frames = 0
        self._busy = True
        try:
            await self._send(self._stream, data)
            self.writes += 1
            self.bytes_written += len(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.failed = f"write failed: {type(exc).__name__}"
            self._scope.cancel()
        finally:
            self._busy = False
            self._send_started = None
            self._inflight = 0
        if self._buf or self.closing or self.failed:
            wake, self._wake = self._wake, None
            if wake is not None:
                wake.set()

    def wake_writer(self) -> None:
        """Hand bytes queued during a batch to the writer task."""
        wake = self._wake
        if wake is not None and self._buf and not self._busy:
            self._wake = None
            wake.set()

    def close(self, code: str | None = None, message: str = "") -> None:
        """Stop accepting frames; the writer flushes what is queued, then ends."""
        if not self.closing:
            self.closing = True
            self.close_code = code
            self.close_reason = message
        self._wake_all()

    def _wake_all(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.set()

    async def wait_drained(self) -> None:
        """Return once the backlog is under the low-water mark or the outbox is closed."""
        while self.pending_bytes > self._low_water and not self.is_closed:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    async def wait_finished(self) -> None:
        """Return once the writer task has ended (flushed after close, or failed)."""
        await self._finished.wait()

    def check_deadline(self, now: float) -> bool:
        """Cut the writer if its current send has made no progress for ``write_deadline``.

        Progress is the asyncio transport's buffer shrinking between two calls;
        elsewhere a send (of at most WRITE_SLICE) completing. Called periodically
        by the owner (one watchdog for many outboxes is cheaper than a timer per
        send). Returns whether it was cut.
        """
        started = self._send_started
        if started is None or self.failed is not None:
            return False
        if self._held is not None:
            held, mark = self._held(), self._held_mark
            self._held_mark = held  # also when it grew: the send appended its batch
            if held < mark:  # the socket took bytes since the last check
                self._send_started = now
                return False
        if now - started > self._write_deadline:
            self.failed = "slow_consumer"
            self._scope.cancel()
            return True
        return False

    async def _send(self, stream: ByteStream, data: bytes | memoryview) -> None:
        self._send_started = anyio.current_time()
        self._held_mark = math.inf
        await stream.send(data)  # type: ignore[arg-type]  # memoryview is fine
        self._send_started = None

    async def run(self) -> None:
        """The writer task; returns after :meth:`close` and a final flush, or on failure."""
        stream = self._stream
        write_now = self._write_now
        try:
            with self._scope:
                while True:
                    if not self._buf or self._busy:
                        if self.closing and not self._busy:
                            return
                        self._wake = anyio.Event()
                        await self._wake.wait()
                        continue
                    buf = self._buf
                    data = buf[0] if len(buf) == 1 else b"".join(buf)
                    self.frames_written += self._frames
                    self._buf = []
                    self._inflight = len(data)
                    self._bytes = self._frames = 0
                    held = -1 if write_now is None else write_now(data)
                    if held > 0:
                        # The socket did not take it all: count what the transport holds
                        # until it has drained (send() of nothing waits for that).
                        self._inflight = held
                        await self._send(stream, b"")
                    elif held < 0:
                        if len(data) <= WRITE_SLICE or self._held is not None:
                            await self._send(stream, data)
                        else:
                            view = memoryview(data)
                            for start in range(0, len(view), WRITE_SLICE):
                                await self._send(stream, view[start:start + WRITE_SLICE])
                                self._inflight = max(0, len(view) - start - WRITE_SLICE)
                    self.writes += 1
                    self.bytes_written += len(data)
                    self._inflight = 0
                    drained = self._drained
                    if drained is not None and self.pending_bytes <= self._low_water:
                        self._drained = None
                        drained.set()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.failed = f"write failed: {type(exc).__name__}"
        finally:
            self._buf = []
            self._bytes = self._frames = self._inflight = 0
            if not self.closing:
                self.closing = True
                self.close_reason = self.failed or "writer stopped"
            self._wake_all()
            self._finished.set()


class BusyPoll:
    """Keeps the event loop polling for ``window`` seconds after the last read,
    instead of letting it sleep in the kernel.

    A reply often arrives a few hundred microseconds after the request went out. A
    process asleep in ``epoll_wait`` then pays a wake-up, which on a virtual machine
    costs about as much as the routing itself. While the window is open this task
    checkpoints in a loop, so the loop polls with a zero timeout and handles the
    reply as soon as it lands. Each turn also yields the CPU (``sched_yield``), so
    other runnable processes on that CPU go first: the polling mostly fills time the
    CPU would otherwise spend idle.

    Readers call :meth:`note` after each read; :meth:`run` is the polling task.
    """

    __slots__ = ("_read", "_wakeup", "turns", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        #: Turns polled so far (each one a pass through the event loop).
        self.turns = 0
        self._read = False
        self._wakeup = Wakeup()

    @property
    def sleeping(self) -> bool:
        """Whether the window is closed (the task waits for the next read)."""
        return self._wakeup.waiting is not None

    def note(self) -> None:
        """A read happened: (re)open the window."""
        if self._wakeup.waiting is not None:
            self._wakeup.fire()
        else:
            self._read = True

    async def run(self) -> None:
        window = self.window
        clock = time.monotonic
        give_way = getattr(os, "sched_yield", _nothing)
        while True:
            self._read = False
            await self._wakeup.wait()
            end = clock() + window
            while True:
                await anyio.lowlevel.checkpoint()
                now = clock()
                if self._read:
                    self._read = False
                    end = now + window
                elif now >= end:
                    break
                self.turns += 1
                give_way()


class MemoryByteStream(ByteStream):
    """One end of an in-process byte stream pair (see :func:`memory_stream_pair`)."""

    def __init__(self, send: MemoryObjectSendStream[bytes],
                 receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send = send
        self._receive = receive
        self._leftover: deque[bytes] = deque()
        self._send_closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._leftover:
            chunk = self._leftover.popleft()
            await anyio.lowlevel.checkpoint()
        else:
            chunk = await self._receive.receive()
        if len(chunk) > max_bytes:
            self._leftover.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def send(self, item: bytes) -> None:
        if self._send_closed:
            raise anyio.ClosedResourceError
        await self._send.send(bytes(item))

    def can_send(self) -> bool:
        stats = self._send.statistics()
        return stats.current_buffer_used < stats.max_buffer_size and not self._send_closed

    async def send_eof(self) -> None:
        self._send_closed = True
        self._send.close()

    async def aclose(self) -> None:
        self._send_closed = True
        self._send.close()
        self._receive.close()


def memory_stream_pair(max_chunks: int = _MEMORY_CHUNKS) -> tuple[MemoryByteStream,
                                                                  MemoryByteStream]:
    """Two connected in-process byte streams; each direction holds ``max_chunks`` writes."""
    a_send, b_receive = anyio.create_memory_object_stream[bytes](max_chunks)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](max_chunks)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)
