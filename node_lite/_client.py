# A wire-level connection to a node: the hello handshake, a coalescing
# writer, and frames read on demand. slim_agents builds apps on it.
from __future__ import annotations

import ssl
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from itertools import islice
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream, TaskGroup
from anyio.lowlevel import RunVar

from ._config import TlsConfig, split_endpoint
from ._errors import (
    AuthenticationError,
    ConnectError,
    NodeError,
    NoRouteError,
    ProtocolError,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._names import Name
from ._transport import CallbackReading, Outbox, WriteBatch, dial, tune_reading
from ._util import collapse_excgroups
from .wire import (
    Error,
    FlowDecoding,
    FrameDecoder,
    Hello,
    HelloAck,
    Message,
    SharedEnvelope,
    decode_frame,
    decode_message,
    encode_frame,
    timestamp_marks,
)

if TYPE_CHECKING:
    from ._server import Node

_AUTH_CODES = ("unauthenticated", "forbidden_source")


def error_from_frame(err: Error) -> NodeError:
    """The typed exception for an error frame received from a node."""
    if err.code == "no_route":
        return NoRouteError(err.name, err.message)
    return NodeError(err.code, err.message, ref=err.ref, name=err.name,
                     session_id=err.session_id)


# Frames up to this size are decoded once for all connections of an event loop;
# a larger one costs more to copy as a key than its decoding saves.
_SHARED_FRAME_MAX = 2048
_SHARED_ENTRIES = 1024  # per generation: about the frames of one read
# Every _SHARED_ENTRIES misses, fewer than one hit per eight misses (apps talking
# point-to-point) pauses the sharing for _PAUSE frames.
_PAUSE = 16384


class SharedDecoding:
    """Frames decoded once for every connection of one event loop that receives them.

    Apps of one process in the same group get each group frame on their own
    connection. Decoding is a function of the frame's bytes alone, so with more
    than one connection open the map is made once and handed to every reader
    (who must not change it).

    Only frames to a wildcard name (a channel) are kept: a frame to one
    instance reaches one connection, and keeping it would only age it into the
    garbage collector's oldest generation (whose full collections stall the
    loop). Bounded: two generations of entries, the older dropped whole when
    the newer fills (a dict emptied from the front one key at a time makes each
    next removal walk the holes). Where frames are rarely shared, it steps
    aside for a while.
    """

    __slots__ = ("_hits", "_misses", "_new", "_old", "connections", "paused")

    def __init__(self) -> None:
        self.connections = 0
        #: Frames left to decode directly (see _PAUSE).
        self.paused = 0
        self._hits = self._misses = 0
        self._new: dict[bytes, SharedEnvelope] = {}
        self._old: dict[bytes, SharedEnvelope] = {}

    def decode(self, frame: bytes | memoryview, *, check_ext: bool | None = None,
               flows: FlowDecoding | None = None) -> dict[str, Any]:
        """:func:`decode_frame` (or ``flows``' decoding), once per distinct frame among
        the recent ones. ``check_ext`` as :meth:`FlowDecoding.decode` (None: a large
        frame's map is walked, which costs less than scanning its bytes)."""
        if len(frame) > _SHARED_FRAME_MAX:
            return decode_frame(frame, check_ext=check_ext is not False)
        key = frame if type(frame) is bytes else bytes(frame)
        hit = self._new.get(key) or self._old.get(key)
        if hit is not None:
            self._hits += 1
            return hit
        return self._miss(key, check_ext, flows)

    def _miss(self, key: bytes, check_ext: bool | None,
              flows: FlowDecoding | None) -> dict[str, Any]:
        # Raises: nothing kept.
        if flows is not None:
            d = flows.decode(key, 0, len(key), check_ext=check_ext)
        else:
            d = decode_frame(key, check_ext=bool(timestamp_marks(key)) if check_ext is None
                             else check_ext)
        self._misses += 1
        if self._misses >= _SHARED_ENTRIES:
            if self._hits * 8 < self._misses:
                self.paused = _PAUSE
            self._hits = self._misses = 0
        dst = d.get("dst")
        if type(dst) is list and len(dst) == 4 and dst[3] is None:
            if len(self._new) >= _SHARED_ENTRIES:
                self._old, self._new = self._new, {}
            if type(d) is not SharedEnvelope:
                d = SharedEnvelope(d)
                d.checked = None
            d.memo = ()  # read by several apps from now on
            self._new[key] = d
        return d

    def decode_spans(self, buf: bytes, bounds: list[int],
                     flows: FlowDecoding | None = None) -> list[dict[str, Any]]:
        """:meth:`decode` of each frame body ``buf[bounds[i - 1] + 4:bounds[i]]``.

        :raises ProtocolError: as :meth:`decode`.
        """
        # The hits (all but one of the apps that get a frame) take the short way.
        new, old = self._new.get, self._old.get
        out: list[dict[str, Any]] = []
        append = out.append
        hits = 0
        start = bounds[0] + 4
        for end in islice(bounds, 1, None):
            if end - start > _SHARED_FRAME_MAX:
                append(self.decode(memoryview(buf)[start:end], flows=flows))
            else:
                key = buf[start:end]
                hit = new(key) or old(key)
                if hit is not None:
                    hits += 1
                    append(hit)
                else:
                    self._hits += hits
                    hits = 0
                    append(self._miss(key, None, flows))
                    new, old = self._new.get, self._old.get  # a miss may start a generation
            start = end + 4
        self._hits += hits
        return out


_SHARED: RunVar[SharedDecoding] = RunVar("node_lite.shared_decoding")


def shared_decoding() -> SharedDecoding:
    """The current event loop's :class:`SharedDecoding`."""
    try:
        return _SHARED.get()
    except LookupError:
        shared = SharedDecoding()
        _SHARED.set(shared)
        return shared


class NodeConnection:
    """An authenticated connection to a node.

    Frames are written through a coalescing outbox; reading is driven by the
    caller through :meth:`receive` or :meth:`receive_envelopes`, or on plain
    asyncio TCP by the transport's callback (see :meth:`read_in_callback`).
    """

    def __init__(self, stream: ByteStream, tg: TaskGroup, *, limits: Limits) -> None:
        self._stream = stream
        self._limits = limits
        self._batch = WriteBatch()
        #: The writer's queue (an attribute: the hot path reads it per message).
        self.outbox = Outbox(stream, batch=self._batch)
        self._decoder = FrameDecoder(limits.max_frame_size)
        self._flows = FlowDecoding(limits)
        self._ready: deque[dict[str, Any]] = deque()
        # Held (bytes go to receive()) until a reader hands it its take.
        self._reading = CallbackReading(_refuse, held=True)
        self._read_size = tune_reading(stream, self._reading)
        self.hello_ack: HelloAck | None = None
        #: Frames from the node that did not decode, by error type. The length
        #: prefix still frames the stream, so the frames around them are delivered.
        self.bad_frames: Counter[str] = Counter()
        self._shared: SharedDecoding | None = shared_decoding()
        self._shared.connections += 1
        tg.start_soon(self.outbox.run)

    @property
    def pending_bytes(self) -> int:
        return self.outbox.pending_bytes

    def write_deferred(self, data: bytes) -> None:
        """Queue bytes without waking the writer; call :meth:`flush` next."""
        batch = self._batch
        batch.active = True
        try:
            self.outbox.write(data)
        finally:
            batch.active = False

    async def flush(self) -> None:
        """Send what :meth:`write_deferred` queued: from this task when the socket
        can take it now (one task switch less), else by waking the writer."""
        box = self.outbox
        if box.can_send_direct():
            await box.send_direct()
        else:
            box.wake_writer()

    def send_nowait(self, message: Message | Mapping[str, Any] | bytes) -> None:
        """Queue a message (or an already encoded frame) without waiting.

        :raises anyio.ClosedResourceError: if the connection is closed.
        :raises anyio.WouldBlock: if the outbound backlog is over its limit.
        """
        if self.outbox.is_closed:
            raise anyio.ClosedResourceError
        if self.outbox.pending_bytes >= self._limits.max_pending_bytes:
            raise anyio.WouldBlock
        self.outbox.write(message if isinstance(message, bytes) else encode_frame(message))

    async def send(self, message: Message | Mapping[str, Any] | bytes) -> None:
        """Queue a message, waiting while the outbound backlog is over its limit."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        while self.outbox.pending_bytes >= self._limits.max_pending_bytes:
            if self.outbox.is_closed:
                break
            await self.outbox.wait_drained()
        if self.outbox.is_closed:
            raise anyio.ClosedResourceError
        self.outbox.write(message if isinstance(message, bytes) else encode_frame(message))

    def read_in_callback(self, take: Callable[[bytes], bool]) -> CallbackReading | None:
        """Hand the bytes read from now on to ``take`` inside the transport's callback
        (see :class:`CallbackReading`; ``take`` decodes them with :meth:`decode`).

        Returns the reading to :meth:`~CallbackReading.release` once the reader
        has caught up with :meth:`receive_envelopes` (it starts held), or None
        where the stream does not allow it (TLS, trio, uvloop, in-memory).
        """
        reading = self._reading
        if not reading.attached:
            return None
        reading.take = take
        return reading

    @property
    def caught_up(self) -> bool:
        """Nothing decoded is waiting for :meth:`receive_envelopes`."""
        return not self._ready

    async def receive_envelopes(self) -> list[dict[str, Any]]:
        """Read once from the stream and return the envelopes it completes (maybe none).

        A frame that does not decode is counted in :attr:`bad_frames` and skipped.
        The envelopes may be shared with other connections of this event loop
        (see :class:`SharedDecoding`): read them, do not change them.

        :raises anyio.EndOfStream: when the node closed the connection.
        :raises ProtocolError: when the node sent bytes that are not frames.
        """
        if self._ready:
            out = list(self._ready)
            self._ready.clear()
            return out
        try:
            data = await self._stream.receive(self._read_size)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError,
                ssl.SSLError) as exc:
            raise anyio.EndOfStream from exc
        return self.decode(data)

    def decode(self, data: bytes) -> list[dict[str, Any]]:
        """The envelopes that ``data``, read from the stream, completes (maybe none).

        :raises ProtocolError: as :meth:`receive_envelopes`.
        """
        buf, bounds = self._decoder.feed_spans(data)
        ends = range(1, len(bounds))
        flows = self._flows
        shared = self._shared
        if shared is not None and shared.connections > 1:
            if shared.paused > 0:
                shared.paused -= len(ends)
                shared = None
        else:
            shared = None
        try:
            # Timestamps: the decoders check a frame's bytes only where they need to.
            if shared is not None:
                return shared.decode_spans(buf if type(buf) is bytes else bytes(buf), bounds,
                                           flows)
            return [flows.decode(buf, bounds[i - 1] + 4, bounds[i]) for i in ends]
        except ProtocolError:
            pass
        out = []  # the rare case, one frame at a time
        for i in ends:
            start, end = bounds[i - 1] + 4, bounds[i]
            try:
                out.append(flows.decode(buf, start, end) if shared is None
                           else shared.decode(memoryview(buf)[start:end], flows=flows))
            except ProtocolError as exc:
                self.bad_frames[type(exc).__name__] += 1
        return out

    async def receive(self) -> Message:
        """The next typed message from the node.

        :raises anyio.EndOfStream: when the node closed the connection.
        """
        while not self._ready:
            self._ready.extend(await self.receive_envelopes())
        return decode_message(self._ready.popleft(), self._limits)

    async def aclose(self) -> None:
        """Flush what is queued (bounded by one second), then close."""
        if self._shared is not None:
            self._shared.connections -= 1
            self._shared = None
        self.outbox.close()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0):
                await self.outbox.wait_finished()
            await anyio.aclose_forcefully(self._stream)


def _refuse(data: bytes) -> bool:
    raise AssertionError("a held CallbackReading was asked to take bytes")


async def _open_stream(target: str | Node, tls: TlsConfig | None) -> ByteStream:
    if not isinstance(target, str):
        return await target.connect_local()
    host, port, scheme = split_endpoint(target, "endpoint")
    ctx = (tls or TlsConfig()).client_context(scheme)
    try:
        return await dial(host, port, ctx)
    except (OSError, ssl.SSLError, anyio.BrokenResourceError) as exc:
        raise ConnectError(f"cannot connect to {target}: {exc}") from exc


async def handshake(conn: NodeConnection, hello: Hello) -> HelloAck:
    """Send ``hello`` and wait for the node's answer (bound it with a cancel scope).

    :raises AuthenticationError: when the node refuses the token or the name.
    :raises ConnectError: when the node closes or answers something else.
    """
    await conn.send(hello)
    try:
        reply = await conn.receive()
    except anyio.EndOfStream:
        raise ConnectError("the node closed the connection during the handshake") from None
    except ProtocolError as exc:
        raise ConnectError(f"the node sent an invalid frame: {exc}") from exc
    if isinstance(reply, Error):
        if reply.code in _AUTH_CODES:
            raise AuthenticationError(reply.message or reply.code, detail=reply.code)
        raise ConnectError(f"hello refused: {reply.code}: {reply.message}")
    if not isinstance(reply, HelloAck):
        raise ConnectError(f"expected hello_ack, got {type(reply).__name__}")
    conn.hello_ack = reply
    return reply


@asynccontextmanager
async def open_connection(
    target: str | Node,
    *,
    name: Name,
    token: str,
    tls: TlsConfig | None = None,
    limits: Limits | None = None,
    hello_timeout: float = 5.0,
) -> AsyncIterator[NodeConnection]:
    """Connect to a node as an app and complete the hello handshake.

    :param target: ``http://host:port`` / ``host:port`` for TCP, ``https://`` for
        TLS, or a :class:`Node` of this process for an in-memory connection.
    :raises ConnectError: when the node cannot be reached.
    :raises AuthenticationError: when the node refuses the identity.
    """
    stream = await _open_stream(target, tls)
    limits = limits or DEFAULT_LIMITS
    try:
        with collapse_excgroups():
            async with anyio.create_task_group() as tg:
                conn = NodeConnection(stream, tg, limits=limits)
                try:
                    with anyio.move_on_after(hello_timeout) as scope:
                        await handshake(conn, Hello(token=token, name=name))
                    if scope.cancelled_caught:
                        raise ConnectError(f"no answer to hello within {hello_timeout:g} s")
                    yield conn
                finally:
                    await conn.aclose()
                    tg.cancel_scope.cancel()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)
        raise

