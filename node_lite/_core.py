# The node's protocol logic (sans-IO): bytes and `now` in, frames written to
# per-connection sinks out.
#
# Invariants:
# * The first frame of an inbound connection is a hello; nothing else is
#   processed before it is accepted, and pre-hello frames are small.
# * An app connection is bound to the name its token allows; a publish with
#   another source is refused (forbidden_source).
# * A publish is forwarded as the exact bytes received, except over links,
#   where the ttl is decremented and the served origins are set.
# * Flow cache: once a publish from an app has been fully checked and routed,
#   the bytes of its routing header (v, t, src, dst, fan, canonical order) are
#   remembered with the decision; later frames starting with those bytes are
#   forwarded in runs without decoding, until the routing table changes.
#   Receivers check every field (repeated keys are refused, so a tail cannot
#   override a checked header field); see wire.FlowDecoding for their own cache.
# * A frame never goes back out the connection it came in on.
# * Writes go to sinks; a sink over its limit is handled by the slow-consumer
#   policy here (drop or disconnect) or reported to the driver (wait).
# * An app connection may have an inbound token bucket: over it, publishes
#   are dropped (DROP) or the driver is told to pause reading (PAUSE).
# * A subscription passes the subscribe ACL, then (for a claimed or
#   moderated channel) the moderator's grant, before it touches the table.
from __future__ import annotations

import enum
import logging
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from ._acl import SubscribeAcl, check_grant
from ._auth import Identity, TokenProvider, TokenVerifier, parse_unverified
from ._errors import (
    AuthenticationError,
    FrameTooLargeError,
    MalformedFrameError,
    ProtocolError,
    UnknownMessageTypeError,
)
from ._limits import DEFAULT_LIMITS, Limits, RatePolicy, SlowConsumerPolicy
from ._names import Name, instance_id_for
from ._routing import RoutingTable
from .wire import (
    _PREFIX,
    Announce,
    Command,
    CommandResult,
    DirectoryEntry,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    HelloAck,
    Lookup,
    LookupResult,
    Ping,
    Pong,
    ReportRequest,
    ReportResult,
    RouteUpdate,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
    check_publish,
    decode_frame,
    decode_message,
    encode_frame,
    frame_prefix,
    marked,
    timestamp_marks,
)

log = logging.getLogger("node_lite.node")

# Frames before the hello is accepted are tiny; bound pre-auth work. (Tokens
# are verified synchronously here, one at a time, so there is no pool of
# concurrent verifications to bound with a semaphore as upstream does;
# Limits.max_connections bounds the connections waiting for their hello.)
PRE_AUTH_MAX_FRAME = 16 * 1024
# A connection that sends this many malformed frames within the window is closed.
MALFORMED_STRIKES = 3
MALFORMED_WINDOW = 10.0
# At most one rate_limited error per connection in this many seconds (the rest are counted).
RATE_ERROR_INTERVAL = 1.0


class ConnKind(enum.Enum):
    PENDING = "pending"  # inbound, waiting for hello
    DIALING = "dialing"  # outbound link, waiting for hello_ack
    APP = "app"
    PEER = "peer"


class Sink(Protocol):
    """Where the core writes frames for one connection (the driver's outbox)."""

    @property
    def pending_bytes(self) -> int: ...

    @property
    def pending_frames(self) -> int: ...

    def write(self, data: bytes | memoryview, frames: int = 1) -> None: ...

    def close(self, code: str | None, message: str) -> None: ...


_ROUTING = (ConnKind.APP, ConnKind.PEER)
# Routing decisions cached per app connection (one per destination it sends to).
MAX_FLOWS = 16


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _packb(*items: Any) -> bytes:
    return b"".join(msgpack.packb(x, use_bin_type=True) for x in items)


@dataclass(slots=True)
class _Flow:
    """A routing decision for frames whose body starts with ``prefix``."""

    prefix: bytes
    targets: tuple[_Conn, ...]
    generation: int


@dataclass(slots=True)
class _Conn:
    id: int
    sink: Sink
    kind: ConnKind
    decoder: FrameDecoder
    opened_at: float
    deadline: float | None = None
    last_rx: float = 0.0
    next_ping: float | None = None
    name: Name | None = None
    name_wire: list[Any] | None = None
    identity: Identity | None = None
    peer_node: str | None = None
    subscriptions: int = 0
    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    strikes: deque[float] = field(default_factory=deque)
    flows: list[_Flow] = field(default_factory=list)
    card: bytes | None = None
    closed: bool = False
    read_deadline: float | None = None  # set while part of a frame is held
    read_paused: bool = False  # the driver stopped reading: silence is ours, not the peer's
    # inbound token bucket (app connections, when a rate is configured)
    tokens_frames: float = math.inf
    tokens_bytes: float = math.inf
    rate_at: float = 0.0
    rate_error_at: float = -math.inf
    rate_dropped: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection, as returned by ``statistics()``."""

    conn_id: int
    kind: str
    name: str | None
    peer_node: str | None
    subject: str | None
    subscriptions: int
    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    pending_bytes: int
    pending_frames: int
    drops: dict[str, int]


class NodeCore:
    """Protocol state of one node, shared by all its connections."""

    def __init__(
        self,
        node_id: str,
        *,
        limits: Limits | None = None,
        verifier: TokenVerifier | None = None,
        peer_token: TokenProvider | None = None,
        rng: random.Random | None = None,
        flow_cache: bool = True,
        acl: SubscribeAcl | None = None,
    ) -> None:
        self.node_id = node_id
        self.flow_cache = flow_cache
        self.limits = limits or DEFAULT_LIMITS
        self.acl = acl or SubscribeAcl()
        self._rate_limited = self.limits.rate_limited
        # claimed channel (service, id) -> the moderator's public key
        self._claims: dict[tuple[tuple[str, str, str], int | None], bytes] = {}
        #: When the driver's timer is due (set by get_timer); a new earlier
        #: deadline sets ``timer_poke`` so the driver re-reads get_timer.
        self.timer_due = math.inf
        self.timer_poke = False
        self.verifier = verifier
        self.peer_token = peer_token
        self.table = RoutingTable(node_id, rng=rng)
        self._conns: dict[int, _Conn] = {}
        self.drops: Counter[str] = Counter()
        self.errors_sent: Counter[str] = Counter()
        self.accepted = 0
        self.refused = 0
        self.closed_totals: Counter[str] = Counter()
        self._known_names: set[tuple[Any, ...]] = set()
        self._commands: dict[tuple[int, int], Any] = {}
        self._command_ids = 0
        #: (tag, CommandResult) pairs from apps, taken by the driver.
        self.command_results: list[tuple[Any, CommandResult]] = []
        self.congested: list[Sink] = []
        #: Observers of every chunk read, ``tap(conn_id, data)``; ``data`` None when the
        #: connection is gone (traces and wiretaps; they must not raise).
        self.taps: list[Callable[[int, bytes | None], None]] = []
        #: Builds the report a ReportRequest gets (set by the driver, which knows links).
        self.reporter: Callable[[], dict[str, Any]] | None = None
        #: Sinks written during the last data_received (the driver may flush them directly).
        self.touched: list[Sink] = []

    # -- connection lifecycle --------------------------------------------------------

    def connection_made(self, conn_id: int, sink: Sink, now: float, *, dial: bool = False) -> None:
        """Register a new connection; ``dial`` marks an outbound link this node opened."""
        conn = _Conn(
            id=conn_id, sink=sink, kind=ConnKind.DIALING if dial else ConnKind.PENDING,
            decoder=FrameDecoder(min(PRE_AUTH_MAX_FRAME, self.limits.max_frame_size)),
            opened_at=now, deadline=now + self.limits.hello_timeout,
        )
        self._conns[conn_id] = conn
        if not dial and len(self._conns) > self.limits.max_connections:
            self.refused += 1
            self.drops["max_connections"] += 1
            self._fail(conn, ErrorCode.LIMIT_EXCEEDED,
                       f"the node serves at most {self.limits.max_connections} connections")
            return
        if dial:
            token = self.peer_token.get_token(now=now) if self.peer_token else ""
            self._write(conn, encode_frame(Hello(token=token, role="peer", node_id=self.node_id)))

    def connection_lost(self, conn_id: int) -> None:
        """Forget a closed connection and withdraw its routes."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        conn.closed = True
        for tap in self.taps:
            tap(conn_id, None)
        for key in [k for k in self._commands if k[0] == conn_id]:
            self.command_results.append((self._commands.pop(key), CommandResult(
                request_id=key[1], ok=False, error="the app disconnected")))
        totals = self.closed_totals
        totals["frames_in"] += conn.frames_in
        totals["frames_out"] += conn.frames_out
        totals["bytes_in"] += conn.bytes_in
        totals["bytes_out"] += conn.bytes_out
        if conn.kind is ConnKind.PEER:
            log.info("link to %s (conn %d) is down", conn.peer_node, conn_id)
        self._send_updates(self.table.remove_connection(conn_id))
        if self._claims:
            for claim in list(self._claims):
                self._release_claim(claim)

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` must run, if any."""
        deadlines = [d for c in self._conns.values()
                     for d in (c.deadline, c.next_ping,
                               None if c.read_paused else c.read_deadline) if d is not None]
        due = min(deadlines) if deadlines else None
        self.timer_due = math.inf if due is None else due
        return due

    def _arm(self, deadline: float) -> None:
        if deadline < self.timer_due:
            self.timer_due = deadline
            self.timer_poke = True

    def handle_timer(self, now: float) -> None:
        """Close connections whose hello did not arrive in time; keep links alive."""
        keepalive = self.limits.keepalive
        for conn in list(self._conns.values()):
            if conn.closed:
                continue
            if conn.deadline is not None and now >= conn.deadline:
                conn.deadline = None
                self.refused += 1
                self._fail(conn, ErrorCode.UNAUTHENTICATED, "no hello before the deadline")
            elif conn.read_deadline is not None and now >= conn.read_deadline \
                    and not conn.read_paused:
                conn.read_deadline = None
                self.drops["read_timeout"] += 1
                self._fail(conn, ErrorCode.READ_TIMEOUT,
                           f"part of a frame held for {self.limits.read_timeout:g} s")
            elif conn.next_ping is not None and now >= conn.next_ping:
                if now - conn.last_rx > 3 * keepalive:
                    conn.next_ping = None
                    self.drops["link_timeout"] += 1
                    self._fail(conn, "link_timeout", f"no traffic for {3 * keepalive:g} s")
                else:
                    conn.next_ping = now + keepalive
                    self._write(conn, encode_frame(Ping(nonce=int(now * 1000))))

    # -- input -----------------------------------------------------------------------

    def data_received(self, conn_id: int, data: bytes, now: float) -> list[Sink]:
        """Process bytes from a connection.

        :returns: sinks left over their limit under the WAIT policy; the driver
            should stop reading ``conn_id`` until they drain.
        """
        if self.taps:
            for tap in self.taps:
                tap(conn_id, data)
        conn = self._conns.get(conn_id)
        if conn is None or conn.closed:
            return []
        congested: list[Sink] = []
        self.congested = congested
        self.touched = []
        conn.last_rx = now
        conn.bytes_in += len(data)
        limits = self.limits
        # PAUSE charges everything read; DROP charges (and drops) publishes only.
        drop_mode = pause_mode = False
        if self._rate_limited and conn.kind is ConnKind.APP:
            self._refill(conn, now)
            if limits.rate_policy is RatePolicy.DROP:
                drop_mode = True
            else:
                pause_mode = True
                conn.tokens_bytes -= len(data)
        decoder = conn.decoder
        try:
            buf = decoder.prepare(data)
        except FrameTooLargeError as exc:
            self._fail(conn, ErrorCode.FRAME_TOO_LARGE, str(exc))
            return congested
        if buf is None:  # still inside one frame
            self._hold_partial(conn, now)
            return congested
        marks: list[int] | None = None  # scanned for when a frame is first decoded
        limit = decoder.max_frame_size
        unpack_from = _PREFIX.unpack_from
        view = memoryview(buf)
        flows = conn.flows
        table = self.table
        size = len(buf)
        pos = frames = 0
        use_flows = True
        # One walk over the frame lengths; runs of frames that match a known
        # flow are forwarded as one slice (see "Flow cache" above).
        while size - pos >= 4:
            length = unpack_from(buf, pos)[0]
            if length > limit:
                conn.frames_in += frames
                self._fail(conn, ErrorCode.FRAME_TOO_LARGE,
                           str(FrameTooLargeError(length, limit)))
                return congested
            end = pos + 4 + length
            if end > size:
                break
            frames += 1
            if flows and use_flows:
                for flow in flows:
                    if buf.startswith(flow.prefix, pos + 4, end):
                        break
                else:
                    flow = None
                if flow is not None and flow.generation == table.generation:
                    prefix = flow.prefix
                    start = pos
                    pos = end
                    run = 1
                    # Frames of a flow usually share their size: compare the
                    # length prefix and the routing header in one call.
                    step = end - start
                    head = buf[start:start + 4] + prefix
                    while True:
                        if size - pos >= step and buf.startswith(head, pos):
                            pos += step
                            run += 1
                            continue
                        if size - pos < 4:
                            break
                        length = unpack_from(buf, pos)[0]
                        end = pos + 4 + length
                        if length > limit or end > size \
                                or not buf.startswith(prefix, pos + 4, end):
                            break
                        step = end - pos
                        head = buf[pos:pos + 4] + prefix
                        pos = end
                        run += 1
                    if drop_mode and not self._take(conn, run, pos - start):
                        # Over the rate: walk these frames one by one instead.
                        pos = start
                        frames -= 1
                        use_flows = False
                        continue
                    frames += run - 1
                    chunk = view[start:pos]
                    for target in flow.targets:
                        if not target.closed:
                            self._deliver_run(conn, target, chunk, run)
                    continue
                if flow is not None:
                    flows.remove(flow)
            frame = view[pos:end]
            pos = end
            try:
                if marks is None:
                    marks = timestamp_marks(buf)
                d = decode_frame(frame[4:], check_ext=bool(marks) and marked(
                    marks, end - len(frame), end))
                if d["t"] == "pub" and conn.kind in _ROUTING:
                    if drop_mode and not self._take(conn, 1, len(frame)):
                        self._rate_drop(conn, d, now)
                    else:
                        self._on_publish(conn, frame, d, buf, end - len(frame))
                else:
                    self._on_control(conn, d, now)
            except UnknownMessageTypeError as exc:
                # Kept open: newer peers may send types this version does not know.
                self._error(conn, ErrorCode.UNKNOWN_TYPE, str(exc))
            except ProtocolError as exc:
                if conn.kind in (ConnKind.PENDING, ConnKind.DIALING):
                    self._fail(conn, exc.code, str(exc))
                    break
                self._strike(conn, exc, now)
            if conn.closed:
                break
        conn.frames_in += frames
        if not conn.closed:
            try:
                decoder.keep(buf, pos)
            except FrameTooLargeError as exc:
                self._fail(conn, ErrorCode.FRAME_TOO_LARGE, str(exc))
            if decoder.buffered:
                self._hold_partial(conn, now)
            else:
                conn.read_deadline = None
            if pause_mode:
                conn.tokens_frames -= frames
        return congested

    def _hold_partial(self, conn: _Conn, now: float) -> None:
        # Armed only while part of a frame is held: arming on every read woke
        # the timer task (and its scan of all connections) once per read.
        conn.read_deadline = deadline = now + self.limits.read_timeout
        if deadline < self.timer_due:
            self._arm(deadline)

    # -- inbound rate ----------------------------------------------------------------

    def _refill(self, conn: _Conn, now: float) -> None:
        elapsed = now - conn.rate_at
        if elapsed > 0:
            limits = self.limits
            conn.rate_at = now
            burst = limits.rate_burst
            conn.tokens_frames = min(conn.tokens_frames + elapsed * limits.rate_frames,
                                     limits.rate_frames * burst)
            conn.tokens_bytes = min(conn.tokens_bytes + elapsed * limits.rate_bytes,
                                    limits.rate_bytes * burst)

    def _take(self, conn: _Conn, frames: int, size: int) -> bool:
        if conn.tokens_frames >= frames and conn.tokens_bytes >= size:
            conn.tokens_frames -= frames
            conn.tokens_bytes -= size
            return True
        return False

    def _rate_drop(self, conn: _Conn, d: dict[str, Any], now: float) -> None:
        self.drops["rate_limited"] += 1
        conn.drops["rate_limited"] += 1
        conn.rate_dropped += 1
        if now - conn.rate_error_at >= RATE_ERROR_INTERVAL:
            conn.rate_error_at = now
            dropped, conn.rate_dropped = conn.rate_dropped, 0
            mid, sid = d.get("mid"), d.get("sid")
            self._error(conn, ErrorCode.RATE_LIMITED,
                        f"over the inbound rate limit: {dropped} publish(es) dropped",
                        ref=mid if type(mid) is int else None,
                        session_id=sid if type(sid) is int else None)

    def reading_paused(self, conn_id: int, paused: bool, now: float) -> None:
        """The driver stops (or resumes) reading ``conn_id`` for flow control.

        While paused the read timeout does not run; on resume it restarts.
        """
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        conn.read_paused = paused
        if not paused and conn.read_deadline is not None:
            conn.read_deadline = deadline = now + self.limits.read_timeout
            self._arm(deadline)

    def read_pause(self, conn_id: int, now: float) -> float:
        """Seconds the driver should wait before reading ``conn_id`` again (PAUSE policy)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.closed or conn.kind is not ConnKind.APP \
                or not self._rate_limited:
            return 0.0
        self._refill(conn, now)
        wait = 0.0  # a bucket below zero only exists for a finite rate
        if conn.tokens_frames < 0:
            wait = -conn.tokens_frames / self.limits.rate_frames
        if conn.tokens_bytes < 0:
            wait = max(wait, -conn.tokens_bytes / self.limits.rate_bytes)
        return wait

    def _strike(self, conn: _Conn, exc: ProtocolError, now: float) -> None:
        self.drops["malformed"] += 1
        conn.drops["malformed"] += 1
        strikes = conn.strikes
        strikes.append(now)
        while strikes and now - strikes[0] > MALFORMED_WINDOW:
            strikes.popleft()
        if len(strikes) >= MALFORMED_STRIKES:
            self._fail(conn, exc.code, f"{exc} (too many malformed frames)")
        else:
            self._error(conn, exc.code, str(exc))

    def _on_control(self, conn: _Conn, d: dict[str, Any], now: float) -> None:
        if conn.kind is ConnKind.PENDING:
            if d["t"] != "hello":
                self.refused += 1
                self._fail(conn, ErrorCode.UNAUTHENTICATED, "the first frame must be a hello")
                return
            self._on_hello(conn, decode_message(d, self.limits), now)  # type: ignore[arg-type]
            return
        msg = decode_message(d, self.limits)
        if conn.kind is ConnKind.DIALING:
            if isinstance(msg, HelloAck):
                self._link_up(conn, msg.node_id)
            elif isinstance(msg, Error):
                log.warning("link conn %d refused by peer: %s: %s", conn.id, msg.code, msg.message)
                self._close(conn, None, "refused by peer")
            else:
                self._fail(conn, ErrorCode.UNAUTHENTICATED, "expected hello_ack")
            return
        if isinstance(msg, Subscribe):
            self._on_subscribe(conn, msg, now)
        elif isinstance(msg, Unsubscribe):
            self._on_unsubscribe(conn, msg)
        elif isinstance(msg, Ping):
            self._write(conn, encode_frame(Pong(nonce=msg.nonce)))
        elif isinstance(msg, RouteUpdate):
            if conn.kind is not ConnKind.PEER:
                raise MalformedFrameError("route updates are only accepted on links", field="t")
            self._send_updates(self.table.apply_update(conn.id, msg))
        elif isinstance(msg, Announce):
            if conn.kind is not ConnKind.APP:
                raise MalformedFrameError("only apps announce themselves", field="t")
            conn.card = msg.card or None
        elif isinstance(msg, Lookup):
            if conn.kind is not ConnKind.APP:
                raise MalformedFrameError("only apps look up the directory", field="t")
            self._write(conn, encode_frame(self.lookup(msg)))
        elif isinstance(msg, ReportRequest):
            if conn.kind is not ConnKind.APP:
                raise MalformedFrameError("only apps ask for reports", field="t")
            report = self.reporter() if self.reporter is not None else {}
            self._write(conn, encode_frame(ReportResult(request_id=msg.request_id,
                                                        report=report)))
        elif isinstance(msg, CommandResult):
            if conn.kind is not ConnKind.APP:
                raise MalformedFrameError("command results come from apps", field="t")
            pending = self._commands.pop((conn.id, msg.request_id), None)
            if pending is not None:
                self.command_results.append((pending, msg))
        elif isinstance(msg, Error):
            log.info("conn %d reported %s: %s", conn.id, msg.code, msg.message)
        elif msg.TYPE in ("pong", "sub_ack"):
            pass
        elif isinstance(msg, Hello | HelloAck):
            raise MalformedFrameError("hello after the handshake", field="t")

    def lookup(self, query: Lookup) -> LookupResult:
        """The directory: apps on this node (with their cards), then names other nodes route.

        Sorted by name; cut at ``query.limit`` entries or when the answer
        would outgrow a frame (``truncated`` then says so).
        """
        n = len(query.prefix)

        def wanted(name: Name) -> bool:
            return n == 0 or (name.org, name.ns, name.app)[:n] == query.prefix

        found: dict[Name, DirectoryEntry] = {}
        for c in self._conns.values():
            if c.kind is ConnKind.APP and not c.closed and c.name is not None \
                    and wanted(c.name):
                found[c.name] = DirectoryEntry(c.name, "", c.card)
        for name, kind, _ in self.table.entries():
            if kind.startswith("remote:") and name.id is not None and wanted(name) \
                    and name not in found:
                found[name] = DirectoryEntry(name, kind[7:], None)
        budget = self.limits.max_frame_size - 4096
        out: list[DirectoryEntry] = []
        truncated = False
        for name in sorted(found, key=str):
            entry = found[name]
            cost = 64 + 4 * self.limits.max_name_component + len(entry.card or b"")
            if len(out) == query.limit or cost > budget:
                truncated = True
                break
            budget -= cost
            out.append(entry)
        return LookupResult(request_id=query.request_id, entries=tuple(out),
                            truncated=truncated)

    def _on_hello(self, conn: _Conn, hello: Hello, now: float) -> None:
        try:
            identity = self._verify(hello.token, now)
            if hello.role == "app":
                assert hello.name is not None
                self._check_name(identity, hello.name)
        except AuthenticationError as exc:
            self.refused += 1
            log.info("conn %d refused: %s", conn.id, exc)
            code = (ErrorCode.FORBIDDEN_SOURCE if exc.reason == "forbidden_source"
                    else ErrorCode.UNAUTHENTICATED)
            self._fail(conn, code, exc.reason)
            return
        if hello.role == "peer" and hello.node_id == self.node_id:
            self.refused += 1
            self._fail(conn, ErrorCode.UNAUTHENTICATED, "a node cannot link to itself")
            return
        conn.identity = identity
        conn.deadline = None
        conn.decoder.max_frame_size = self.limits.max_frame_size
        self.accepted += 1
        if hello.role == "peer":
            assert hello.node_id is not None
            self._write(conn, encode_frame(HelloAck(
                conn_id=conn.id, node_id=self.node_id, max_frame_size=self.limits.max_frame_size)))
            self._link_up(conn, hello.node_id)
            return
        assert hello.name is not None
        conn.kind = ConnKind.APP
        conn.name = hello.name
        conn.name_wire = hello.name.to_wire()
        limits = self.limits
        conn.rate_at = now
        conn.tokens_frames = limits.rate_frames * limits.rate_burst
        conn.tokens_bytes = limits.rate_bytes * limits.rate_burst
        self._write(conn, encode_frame(HelloAck(
            conn_id=conn.id, node_id=self.node_id, max_frame_size=self.limits.max_frame_size)))
        # Unicast and anycast to the app work from the first moment.
        conn.subscriptions += 1
        self._send_updates(self.table.subscribe(hello.name, conn.id))

    def _verify(self, token: str, now: float) -> Identity:
        if self.verifier is None:
            return parse_unverified(token)
        return self.verifier.verify(token, now=now)

    def _check_name(self, identity: Identity, name: Name) -> None:
        if self.verifier is None:
            return  # development mode: no secret configured, names are trusted
        bound = identity.claims.get("name")
        if bound is not None:
            if bound != str(name):
                raise AuthenticationError("forbidden_source", detail=f"token is bound to {bound}")
        elif name.id != instance_id_for(identity.subject):
            raise AuthenticationError("forbidden_source",
                                      detail="instance id does not match the token subject")

    def _link_up(self, conn: _Conn, peer_node: str) -> None:
        conn.kind = ConnKind.PEER
        conn.peer_node = peer_node
        conn.deadline = None
        conn.next_ping = conn.last_rx + self.limits.keepalive
        conn.decoder.max_frame_size = self.limits.max_frame_size
        log.info("link to %s (conn %d) is up", peer_node, conn.id)
        full = self.table.add_link(conn.id, peer_node)
        self._write(conn, encode_frame(full))

    def _on_subscribe(self, conn: _Conn, msg: Subscribe, now: float) -> None:
        if conn.kind is not ConnKind.APP:
            raise MalformedFrameError("subscriptions come from apps; links send route updates")
        if conn.subscriptions >= self.limits.max_subscriptions:
            self.drops["subscribe_limit"] += 1
            self._ack(conn, msg.request_id, ok=False, code=ErrorCode.LIMIT_EXCEEDED,
                      message=f"at most {self.limits.max_subscriptions} subscriptions")
            return
        refusal = self._subscribe_refusal(conn, msg, now)
        if refusal is not None:
            self.drops["forbidden_subscribe"] += 1
            conn.drops["forbidden_subscribe"] += 1
            log.info("conn %d: subscribe to %s refused: %s", conn.id, msg.name, refusal)
            self._ack(conn, msg.request_id, ok=False, code=ErrorCode.FORBIDDEN_SUBSCRIBE,
                      message=refusal)
            return
        if msg.claim is not None:
            self._claims[(msg.name.service, msg.name.id)] = msg.claim
        conn.subscriptions += 1
        self._send_updates(self.table.subscribe(msg.name, conn.id))
        self._ack(conn, msg.request_id)

    def _subscribe_refusal(self, conn: _Conn, msg: Subscribe, now: float) -> str | None:
        """Why the ACL or the channel's moderator refuses this subscription, if they do."""
        acl = self.acl
        if acl.is_open and not self._claims and msg.claim is None:
            return None
        name = msg.name
        subject = conn.identity.subject if conn.identity else ""
        if not acl.allows(subject, conn.name, name):
            return f"the subscribe ACL does not allow {name}"
        key = (name.service, name.id)
        claimed = self._claims.get(key)
        if msg.claim is not None:
            if name.id is not None:
                return "only a channel (a name without an instance id) can be claimed"
            if claimed is not None:
                return None if claimed == msg.claim else \
                    f"{name} is moderated by another key"
            if any(c != conn.id for c in self.table.local_connections(name)):
                return f"{name} already has subscribers; it can only be claimed while unused"
            return None
        if claimed is None:
            if acl.is_moderated(name):
                return f"{name} is moderated and its moderator has not claimed it"
            return None
        if msg.grant is None:
            return f"{name} is moderated: a grant from its moderator is required"
        assert conn.name is not None
        return check_grant(claimed, msg.grant, name, conn.name, now)

    def _release_claim(self, key: tuple[tuple[str, str, str], int | None]) -> None:
        # A claim lasts while the channel has subscribers here (a moderator that
        # reconnects re-claims with the same key).
        if not self.table.local_connections(Name(*key[0], key[1])):
            del self._claims[key]

    def _on_unsubscribe(self, conn: _Conn, msg: Unsubscribe) -> None:
        if conn.kind is not ConnKind.APP:
            raise MalformedFrameError("subscriptions come from apps; links send route updates")
        existed, updates = self.table.unsubscribe(msg.name, conn.id)
        if existed:
            conn.subscriptions -= 1
            key = (msg.name.service, msg.name.id)
            if key in self._claims:
                self._release_claim(key)
        self._send_updates(updates)
        self._ack(conn, msg.request_id, ok=existed,
                  code=None if existed else "not_subscribed",
                  message=None if existed else f"{msg.name} is not subscribed here")

    def _ack(self, conn: _Conn, rid: int, *, ok: bool = True, code: str | None = None,
             message: str | None = None) -> None:
        if rid:
            self._write(conn, encode_frame(SubscribeAck(request_id=rid, ok=ok, code=code,
                                                        message=message)))

    # -- publish ---------------------------------------------------------------------

    def _on_publish(self, conn: _Conn, frame: memoryview, d: dict[str, Any],
                    buf: bytes = b"", start: int = 0) -> None:
        check_publish(d, self.limits, self._known_names)
        dst = d["dst"]
        service = (dst[0], dst[1], dst[2])
        if conn.kind is ConnKind.APP:
            if d["src"] != conn.name_wire:
                self.drops["forbidden_source"] += 1
                self._error(conn, ErrorCode.FORBIDDEN_SOURCE,
                            f"this connection may only send as {conn.name}",
                            ref=d.get("mid"), session_id=d.get("sid"))
                return
            if self._claims and (service, dst[3]) in self._claims \
                    and conn.id not in self.table.local_connections(Name(*dst)):
                # Only members of a moderated channel speak on it.
                self.drops["forbidden_publish"] += 1
                self._error(conn, ErrorCode.FORBIDDEN_PUBLISH,
                            f"{Name(*dst)} is moderated; only its subscribers publish to it",
                            ref=d.get("mid"), session_id=d.get("sid"))
                return
            origins = None
        else:
            origins = d.get("orig")
        if d["fan"] == 1:
            target = self.table.match_one_key(service, dst[3], conn.id)
            if target is None:
                self._no_route(conn, d)
                return
            self._forward(conn, target, frame, d, None)
            if dst[3] is not None:  # anycast picks anew for every frame
                self._remember_flow(conn, d, buf, start, {target: None})
            return
        targets = self.table.match_all_key(service, dst[3], conn.id, origins)
        if not targets:
            self._no_route(conn, d)
            return
        for target, served in targets.items():
            self._forward(conn, target, frame, d, served)
        self._remember_flow(conn, d, buf, start, targets)

    def _remember_flow(self, conn: _Conn, d: dict[str, Any], buf: bytes, start: int,
                       targets: dict[int, list[str] | None]) -> None:
        """Cache the routing decision of a checked frame from an app, keyed by its header bytes.

        Only when the frame starts with the canonical encoding of v, t, src,
        dst and fan (what this package's encoder writes) and every target is
        an app: frames over links are re-encoded one by one.
        """
        if conn.kind is not ConnKind.APP or not buf or not self.flow_cache:
            return
        conns = [self._conns.get(t) for t in targets]
        if any(c is None or c.closed or c.kind is not ConnKind.APP for c in conns):
            return
        prefix = _map_header(len(d)) + _packb(
            "v", d["v"], "t", "pub", "src", d["src"], "dst", d["dst"], "fan", d["fan"])
        if not buf.startswith(prefix, start + 4):
            return
        flows = conn.flows
        for old in flows:
            if old.prefix == prefix:  # re-learned after a rate-limited walk: replace it
                flows.remove(old)
                break
        if len(flows) >= MAX_FLOWS:
            flows.pop()
        flows.insert(0, _Flow(prefix, tuple(c for c in conns if c is not None),
                              self.table.generation))

    def _forward(self, src: _Conn, target_id: int, frame: memoryview, d: dict[str, Any],
                 served: list[str] | None) -> None:
        target = self._conns.get(target_id)
        if target is None or target.closed:
            return
        if target.kind is ConnKind.PEER:
            ttl = d["ttl"] - 1
            if ttl <= 0:
                self.drops["ttl_expired"] += 1
                return
            out = dict(d)
            out["ttl"] = ttl
            if d["fan"] != 1 and served is not None:
                out["orig"] = served
            else:
                out.pop("orig", None)  # a static route carries every origin
            body = msgpack.packb(out, use_bin_type=True)
            self._deliver(src, target, frame_prefix(len(body)) + body)
        else:
            self._deliver(src, target, frame)

    def _deliver(self, src: _Conn, target: _Conn, data: bytes | memoryview) -> None:
        sink = target.sink
        if (sink.pending_bytes >= self.limits.max_pending_bytes
                or sink.pending_frames >= self.limits.max_pending_frames):
            policy = self.limits.slow_consumer
            if policy is SlowConsumerPolicy.WAIT and src.kind is ConnKind.APP \
                    and target.kind is ConnKind.APP:
                if sink not in self.congested:
                    self.congested.append(sink)
            elif policy is SlowConsumerPolicy.DISCONNECT and target.kind is ConnKind.APP:
                self._fail(target, ErrorCode.SLOW_CONSUMER, "outbound backlog is full")
                return
            else:
                self.drops["queue_full"] += 1
                target.drops["queue_full"] += 1
                return
        target.frames_out += 1
        target.bytes_out += len(data)
        self._write_sink(sink, data)

    def _deliver_run(self, src: _Conn, target: _Conn, run: memoryview, frames: int) -> None:
        sink = target.sink
        if (sink.pending_bytes >= self.limits.max_pending_bytes
                or sink.pending_frames >= self.limits.max_pending_frames):
            policy = self.limits.slow_consumer
            if policy is SlowConsumerPolicy.WAIT:
                if sink not in self.congested:
                    self.congested.append(sink)
            elif policy is SlowConsumerPolicy.DISCONNECT:
                self._fail(target, ErrorCode.SLOW_CONSUMER, "outbound backlog is full")
                return
            else:
                self.drops["queue_full"] += frames
                target.drops["queue_full"] += frames
                return
        target.frames_out += frames
        target.bytes_out += len(run)
        self._write_sink(sink, run, frames)

    def _no_route(self, conn: _Conn, d: dict[str, Any]) -> None:
        self.drops["no_route"] += 1
        if conn.kind is not ConnKind.APP or d.get("err"):
            return  # an intermediate node drops silently, as upstream
        dst = d["dst"]
        self._error(conn, ErrorCode.NO_ROUTE, f"no matching found for {Name(*dst)}",
                    ref=d.get("mid"), name=Name(*dst), session_id=d.get("sid"))

    # -- output helpers --------------------------------------------------------------

    def _write(self, conn: _Conn, data: bytes) -> None:
        if not conn.closed:
            conn.frames_out += 1
            conn.bytes_out += len(data)
            self._write_sink(conn.sink, data)

    def _write_sink(self, sink: Sink, data: bytes | memoryview, frames: int = 1) -> None:
        touched = self.touched
        if sink not in touched:
            touched.append(sink)
        sink.write(data, frames)

    def _error(self, conn: _Conn, code: str, message: str, *, ref: int | None = None,
               name: Name | None = None, session_id: int | None = None) -> None:
        self.errors_sent[str(code)] += 1
        self._write(conn, encode_frame(Error(code=str(code), message=message, ref=ref,
                                             name=name, session_id=session_id)))

    def _fail(self, conn: _Conn, code: str, message: str) -> None:
        """Send an error and close the connection after it is flushed."""
        if conn.closed:
            return
        self._error(conn, code, message)
        self._close(conn, str(code), message)

    def _close(self, conn: _Conn, code: str | None, message: str) -> None:
        conn.closed = True
        conn.deadline = conn.next_ping = conn.read_deadline = None
        conn.sink.close(code, message)

    def _send_updates(self, updates: dict[int, RouteUpdate]) -> None:
        for link, update in updates.items():
            conn = self._conns.get(link)
            if conn is not None:
                self._write(conn, encode_frame(update))

    # -- operations and introspection ------------------------------------------------

    def close_connection(self, conn_id: int, code: str, message: str) -> None:
        conn = self._conns.get(conn_id)
        if conn is not None:
            self._fail(conn, code, message)

    def set_route(self, name: Name, conn_id: int) -> None:
        if conn_id not in self._conns:
            raise KeyError(f"no connection {conn_id}")
        self.table.set_route(name, conn_id)

    def remove_route(self, name: Name, conn_id: int) -> bool:
        return self.table.remove_route(name, conn_id)

    def command_app(self, target: Name, op: str, args: dict[str, Any], tag: Any) -> bool:
        """Send a management command to the app connected here as ``target``.

        Its result later appears in :attr:`command_results` as ``(tag, result)``.
        :returns: False when no app of that name is connected to this node.
        """
        wire = target.to_wire()
        for conn in self._conns.values():
            if conn.kind is ConnKind.APP and not conn.closed and (
                    conn.name_wire == wire or (target.id is None and conn.name is not None
                    and conn.name.same_service(target))):
                self._command_ids = self._command_ids % 0xFFFF_FFFF + 1
                rid = self._command_ids
                self._commands[(conn.id, rid)] = tag
                self._write(conn, encode_frame(Command(request_id=rid, op=op, args=args)))
                return True
        return False

    def connection_kind(self, conn_id: int) -> ConnKind | None:
        conn = self._conns.get(conn_id)
        return conn.kind if conn else None

    def peer_of(self, conn_id: int) -> str | None:
        conn = self._conns.get(conn_id)
        return conn.peer_node if conn else None

    def connection_ids(self, kind: ConnKind | None = None) -> list[int]:
        return [c.id for c in self._conns.values() if kind is None or c.kind is kind]

    def connection_statistics(self, conn_id: int) -> ConnectionStatistics:
        c = self._conns[conn_id]
        return ConnectionStatistics(
            conn_id=c.id, kind=c.kind.value, name=str(c.name) if c.name else None,
            peer_node=c.peer_node, subject=c.identity.subject if c.identity else None,
            subscriptions=c.subscriptions, frames_in=c.frames_in, bytes_in=c.bytes_in,
            frames_out=c.frames_out, bytes_out=c.bytes_out,
            pending_bytes=c.sink.pending_bytes, pending_frames=c.sink.pending_frames,
            drops=dict(c.drops),
        )

    def all_statistics(self) -> Iterable[ConnectionStatistics]:
        return [self.connection_statistics(i) for i in list(self._conns)]
