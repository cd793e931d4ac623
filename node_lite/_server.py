# The node on anyio: listeners, one reader and one coalescing writer per
# connection, links that redial with backoff, and a timer task; all protocol
# decisions are made by NodeCore.
from __future__ import annotations

import itertools
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup, TaskStatus
from anyio.streams.tls import TLSStream

from ._auth import SharedSecretProvider, SharedSecretVerifier, TokenProvider, TokenVerifier
from ._config import ClientConfig, NodeConfig, ServerConfig, split_endpoint
from ._core import ConnectionStatistics, ConnKind, NodeCore
from ._errors import ConfigError, ProtocolError
from ._limits import RatePolicy
from ._names import Name
from ._transport import (
    BusyPoll,
    CallbackReading,
    Outbox,
    WriteBatch,
    dial,
    memory_stream_pair,
    pause_reading,
    tune_reading,
)
from ._util import collapse_excgroups
from .wire import (
    Command,
    CommandResult,
    ErrorCode,
    FrameDecoder,
    Register,
    decode_frame,
    decode_message,
    encode_frame,
)

log = logging.getLogger("node_lite.node")
# Reconnect backoff for links: from 100 ms, doubling, capped at 2 s (with jitter).
LINK_BACKOFF_MIN = 0.1
LINK_BACKOFF_MAX = 2.0
# Time allowed for a TLS handshake on an accepted connection.
TLS_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class LinkStatistics:
    """State of one configured link."""

    endpoint: str
    connected: bool
    peer_node: str | None
    conn_id: int | None
    attempts: int
    failures: int


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    """A snapshot of a node, as returned by :meth:`Node.statistics`."""

    node_id: str
    endpoints: tuple[str, ...]
    connections: dict[str, int]
    accepted: int
    refused: int
    routes: int
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    drops: dict[str, int]
    errors_sent: dict[str, int]
    links: tuple[LinkStatistics, ...]
    per_connection: tuple[ConnectionStatistics, ...] = field(default=(), repr=False)


@dataclass(slots=True)
class _Link:
    config: ClientConfig
    attempts: int = 0
    failures: int = 0
    conn_id: int | None = None
    scope: anyio.CancelScope | None = None


class Node:
    """A node_lite node: routes frames between apps and linked nodes by name.

    Use :func:`open_node` to run one; ``serve`` runs it inside a task group you own.
    """

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        verifier: TokenVerifier | None = None,
        peer_token: TokenProvider | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = cfg = config or NodeConfig()
        if verifier is None and cfg.shared_secret is not None:
            verifier = SharedSecretVerifier(cfg.shared_secret)
        secret = cfg.token_secret or cfg.shared_secret
        if peer_token is None and secret is not None:
            peer_token = SharedSecretProvider(f"node/{cfg.node_id}".replace(":", "_"), secret)
        self.core = NodeCore(cfg.node_id, limits=cfg.limits, verifier=verifier,
                             peer_token=peer_token, rng=rng, acl=cfg.acl)
        self.core.reporter = self.report
        self._ids = itertools.count(1)
        self._outboxes: dict[int, Outbox] = {}
        self._batch = WriteBatch()
        self._tg: TaskGroup | None = None
        self._accept_scope = anyio.CancelScope()
        self._timer_wake: anyio.Event | None = None
        self._links: list[_Link] = []
        self._idle: anyio.Event | None = None
        self._closing = False
        self._busy_poll = BusyPoll(cfg.busy_poll) if cfg.busy_poll > 0 else None
        self.endpoints: list[str] = []
        self.ports: list[int] = []

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def endpoint(self) -> str:
        """``host:port`` of the first listener, as bound (port 0 resolved)."""
        if not self.endpoints:
            raise RuntimeError("the node is not serving")
        return self.endpoints[0]

    @property
    def url(self) -> str:
        """``http://host:port`` a client can connect to (a wildcard host becomes loopback)."""
        host, port, _ = split_endpoint(self.endpoint, "endpoint")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    # -- running ---------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[Node] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, link and route until cancelled or :meth:`aclose` is called.

        :raises ConfigError: when a listener cannot be opened.
        """
        cfg = self.config
        log.info("Runtime started")
        log.info("Starting service: %s", cfg.node_id)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for server in cfg.servers:
                await self._listen(tg, server)
            tg.start_soon(self._timer_loop)
            if self._busy_poll is not None:
                tg.start_soon(self._busy_poll.run)
            if math.isfinite(cfg.limits.write_deadline):
                tg.start_soon(self._write_watchdog)
            for link in cfg.links:
                self.add_link(link)
            for controller in cfg.controller_clients:
                tg.start_soon(self._controller_loop, controller)
            task_status.started(self)
        self._tg = None

    async def _listen(self, tg: TaskGroup, server: ServerConfig) -> None:
        ctx = server.tls.server_context()
        try:
            listener = await anyio.create_tcp_listener(local_host=server.host,
                                                       local_port=server.port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {server.endpoint}: {exc.strerror}") from exc
        for sub in listener.listeners:
            host = sub.extra(SocketAttribute.local_address)[0]
            port = sub.extra(SocketAttribute.local_port)
            shown = server.host if server.host in ("0.0.0.0", "::") else host
            self.endpoints.append(f"{shown}:{port}" if ":" not in shown else f"[{shown}]:{port}")
            self.ports.append(port)
            log.info("starting server %s%s", self.endpoints[-1], " (tls)" if ctx else "")
        # Started means accepting: serve() reports readiness with every task in place.
        await tg.start(self._accept_loop, listener, ctx)

    async def _accept_loop(self, listener: Any, ctx: ssl.SSLContext | None, *,
                           task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with listener:
            with self._accept_scope:
                async with anyio.create_task_group() as tg:
                    for sub in listener.listeners:
                        await tg.start(self._accept_one_listener, sub, ctx)
                    task_status.started()

    async def _accept_one_listener(self, listener: Any, ctx: ssl.SSLContext | None, *,
                                   task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                                   ) -> None:
        assert self._tg is not None
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. too many open files: back off, keep serving
                log.warning("accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            pause_reading(stream)
            self._tg.start_soon(self._accepted, stream, ctx)

    async def _accepted(self, stream: Any, ctx: ssl.SSLContext | None) -> None:
        if ctx is not None:
            try:
                with anyio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                    stream = await TLSStream.wrap(stream, server_side=True, ssl_context=ctx)
            except (TimeoutError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream,
                    OSError) as exc:
                self.core.refused += 1
                log.info("TLS handshake failed: %r", exc)
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(stream)
                return
        await self._run_connection(stream)

    async def connect_local(self) -> ByteStream:
        """Open an in-process connection to this node (no socket).

        The caller speaks the wire protocol on the returned stream, starting with a hello.
        """
        if self._tg is None or self._closing:
            raise anyio.ClosedResourceError
        ours, theirs = memory_stream_pair()
        self._tg.start_soon(self._run_connection, theirs)
        return ours

    async def _run_connection(self, stream: ByteStream, *, link: _Link | None = None) -> None:
        conn_id = next(self._ids)
        limits = self.config.limits
        outbox = Outbox(stream, write_deadline=limits.write_deadline, batch=self._batch)
        self._outboxes[conn_id] = outbox
        if link is not None:
            link.conn_id = conn_id
        self.core.connection_made(conn_id, outbox, time.time(), dial=link is not None)
        self._poke_timer()
        core = self.core
        batch = self._batch
        rate_pause = limits.rate_limited and limits.rate_policy is RatePolicy.PAUSE
        busy_poll = self._busy_poll

        def absorb(data: bytes) -> list[Any] | None:
            """The core's share of a read; None when the connection must end."""
            batch.active = True
            try:
                congested = core.data_received(conn_id, data, time.time())
            except Exception:
                # A bug must cost one connection, never the node.
                log.exception("conn %d: internal error; closing it", conn_id)
                core.close_connection(conn_id, "internal", "internal error")
                return None
            finally:
                batch.active = False
            if busy_poll is not None:
                busy_poll.note()
            if core.timer_poke:
                core.timer_poke = False
                self._poke_timer()
            if core.command_results:
                self._relay_command_results()
            return congested

        # What the callback handed over: the congested consumers, or None to stop.
        handed: list[list[Any] | None] = []

        def take(data: bytes) -> bool:
            # In the transport's callback: route, and send what fits at once; anything
            # that must wait goes to the task below.
            congested = absorb(data)
            touched, core.touched = core.touched, []
            for sink in touched:
                try:
                    sink.flush_now()  # type: ignore[attr-defined]
                except Exception:
                    log.exception("conn %d: flushing a consumer failed", conn_id)
                    sink.wake_writer()  # type: ignore[attr-defined]
            if congested is None or congested or outbox.is_closed:
                handed.append(congested)
                return False
            return True

        # Rate-paced connections keep the task's reads: their pauses leave bytes unread.
        reading = None if rate_pause else CallbackReading(take)
        size = tune_reading(stream, reading)
        direct = reading if reading is not None and reading.attached else None
        try:
            async with anyio.create_task_group() as tg:
                async def write() -> None:
                    await outbox.run()
                    tg.cancel_scope.cancel()

                tg.start_soon(write)
                while not outbox.is_closed:
                    try:
                        data = await stream.receive(size)
                    except (anyio.EndOfStream, anyio.BrokenResourceError,
                            anyio.ClosedResourceError, OSError, ssl.SSLError):
                        break
                    if handed:  # the callback's empty chunk
                        congested = handed.pop()
                    else:
                        if direct is not None:
                            direct.held = True  # the callback queues behind this read
                        congested = absorb(data)
                        touched, core.touched = core.touched, []
                        for sink in touched:
                            # Small batches to an idle, writable consumer go out from
                            # here: one task switch less per hop.
                            try:
                                if sink.can_send_direct():  # type: ignore[attr-defined]
                                    await sink.send_direct()  # type: ignore[attr-defined]
                                else:
                                    sink.wake_writer()  # type: ignore[attr-defined]
                            except Exception:
                                log.exception("conn %d: flushing a consumer failed", conn_id)
                                sink.wake_writer()  # type: ignore[attr-defined]
                    if congested is None:
                        break
                    if congested:
                        core.reading_paused(conn_id, True, time.time())
                        await self._wait_congested(congested)
                        core.reading_paused(conn_id, False, time.time())
                    if rate_pause:
                        pause = core.read_pause(conn_id, time.time())
                        if pause > 0:
                            # Over its rate: leave the bytes in the socket (backpressure).
                            core.reading_paused(conn_id, True, time.time())
                            with anyio.move_on_after(pause):
                                await outbox.wait_finished()
                            core.reading_paused(conn_id, False, time.time())
                    if core.timer_poke:
                        core.timer_poke = False
                        self._poke_timer()
                    if direct is not None:
                        direct.release()
                # The peer is gone or the core closed it: flush what is queued, then stop.
                outbox.close(None, "connection ended")
        finally:
            if direct is not None:
                direct.held = True  # bytes still arriving are not routed any more
            if outbox.failed == "slow_consumer":
                core.drops["slow_consumer"] += 1
                log.warning("conn %d cut: slow consumer (no write progress in %g s)",
                            conn_id, limits.write_deadline)
            core.connection_lost(conn_id)
            if core.command_results:
                self._relay_command_results()
            self._outboxes.pop(conn_id, None)
            if link is not None:
                link.conn_id = None
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)
            if self._idle is not None and not self._outboxes:
                self._idle.set()

    def _relay_command_results(self) -> None:
        results, self.core.command_results = self.core.command_results, []
        for (outbox, rid), res in results:
            outbox.write(encode_frame(CommandResult(request_id=rid, ok=res.ok, error=res.error,
                                                    result=res.result)))

    async def _controller_loop(self, cfg: ClientConfig) -> None:
        """Register with a controller and carry out its commands through local apps."""
        backoff = LINK_BACKOFF_MIN
        while not self._closing:
            try:
                stream = await dial(cfg.host, cfg.port, cfg.ssl_context())
            except (OSError, ssl.SSLError) as exc:
                log.debug("controller %s: connect failed: %s", cfg.endpoint, exc)
                await anyio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, LINK_BACKOFF_MAX)
                continue
            backoff = LINK_BACKOFF_MIN
            outbox = Outbox(stream)
            token = self.core.peer_token.get_token() if self.core.peer_token else ""
            outbox.write(encode_frame(Register(node_id=self.node_id,
                                               endpoints=tuple(self.endpoints), token=token)))
            log.info("registered with controller %s", cfg.endpoint)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(outbox.run)
                    decoder = FrameDecoder()
                    size = tune_reading(stream)
                    while True:
                        try:
                            data = await stream.receive(size)
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            break
                        for frame in decoder.feed(data):
                            msg = decode_message(decode_frame(frame[4:]))
                            if isinstance(msg, Command) and msg.target is not None:
                                if not self.core.command_app(msg.target, msg.op, msg.args,
                                                             (outbox, msg.request_id)):
                                    outbox.write(encode_frame(CommandResult(
                                        request_id=msg.request_id, ok=False,
                                        error="not_here")))
                                self._wake_touched()
                    tg.cancel_scope.cancel()
            except ProtocolError as exc:
                log.warning("controller %s sent a bad frame: %s", cfg.endpoint, exc)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.aclose_forcefully(stream)
            if not self._closing:
                await anyio.sleep(backoff * (0.5 + random.random()))

    def _wake_touched(self) -> None:
        touched, self.core.touched = self.core.touched, []
        for sink in touched:
            sink.wake_writer()  # type: ignore[attr-defined]

    async def _wait_congested(self, congested: list[Any]) -> None:
        """Stop reading the sender until the consumers it fills have drained."""
        deadline = 2 * self.config.limits.write_deadline
        for sink in congested:
            with anyio.move_on_after(deadline):
                await sink.wait_drained()
            if not sink.is_closed and sink.pending_bytes > self.config.limits.max_pending_bytes:
                for conn_id, box in self._outboxes.items():
                    if box is sink:
                        self.core.close_connection(conn_id, ErrorCode.SLOW_CONSUMER,
                                                   "no write progress")

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.core.get_timer()
            self._timer_wake = wake = anyio.Event()
            delay = math.inf if deadline is None else max(0.0, deadline - time.time())
            with anyio.move_on_after(delay):
                await wake.wait()
            self.core.handle_timer(time.time())

    async def _write_watchdog(self) -> None:
        """Cut consumers whose socket has not taken a write for ``write_deadline``."""
        period = max(0.02, self.config.limits.write_deadline / 4)
        while True:
            await anyio.sleep(period)
            now = anyio.current_time()
            for outbox in list(self._outboxes.values()):
                outbox.check_deadline(now)

    def _poke_timer(self) -> None:
        if self._timer_wake is not None:
            self._timer_wake.set()

    # -- links -----------------------------------------------------------------------

    def add_link(self, link: ClientConfig | str) -> None:
        """Dial another node and keep the link up (redialing with backoff) until closed."""
        if self._tg is None:
            raise RuntimeError("the node is not serving")
        cfg = ClientConfig(endpoint=link) if isinstance(link, str) else link
        state = _Link(config=cfg)
        self._links.append(state)
        self._tg.start_soon(self._link_loop, state)

    async def remove_link(self, endpoint: str) -> None:
        """Stop a link added by configuration or :meth:`add_link`."""
        for state in list(self._links):
            if state.config.endpoint == endpoint:
                self._links.remove(state)
                if state.scope is not None:
                    state.scope.cancel()
                return
        raise KeyError(endpoint)

    async def _link_loop(self, state: _Link) -> None:
        cfg = state.config
        ctx = cfg.ssl_context()
        backoff = LINK_BACKOFF_MIN
        with anyio.CancelScope() as scope:
            state.scope = scope
            while not self._closing:
                state.attempts += 1
                try:
                    stream = await dial(cfg.host, cfg.port, ctx)
                except (OSError, ssl.SSLError, anyio.BrokenResourceError) as exc:
                    state.failures += 1
                    log.debug("link to %s: connect failed: %s", cfg.endpoint, exc)
                    await anyio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, LINK_BACKOFF_MAX)
                    continue
                backoff = LINK_BACKOFF_MIN
                log.info("link to %s: connected", cfg.endpoint)
                await self._run_connection(stream, link=state)
                if not self._closing:
                    await anyio.sleep(backoff * (0.5 + random.random()))

    # -- routes and statistics -------------------------------------------------------

    def set_route(self, name: Name | str, conn_id: int) -> None:
        """Route ``name`` over a connection (usually a link) without advertising it."""
        self.core.set_route(Name.parse(name) if isinstance(name, str) else name, conn_id)

    def remove_route(self, name: Name | str, conn_id: int) -> bool:
        """Remove a route made by :meth:`set_route`."""
        return self.core.remove_route(Name.parse(name) if isinstance(name, str) else name,
                                      conn_id)

    def link_connection(self, endpoint: str) -> int | None:
        """The connection id of a link while it is up."""
        for state in self._links:
            if state.config.endpoint == endpoint:
                return state.conn_id
        return None

    def statistics(self, *, per_connection: bool = False) -> NodeStatistics:
        """Counters of the node; ``per_connection`` adds one entry per live connection."""
        core = self.core
        conns = list(core.all_statistics())
        kinds: dict[str, int] = {}
        for c in conns:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        closed = core.closed_totals
        return NodeStatistics(
            node_id=self.node_id, endpoints=tuple(self.endpoints), connections=kinds,
            accepted=core.accepted, refused=core.refused, routes=len(core.table),
            frames_in=closed["frames_in"] + sum(c.frames_in for c in conns),
            frames_out=closed["frames_out"] + sum(c.frames_out for c in conns),
            bytes_in=closed["bytes_in"] + sum(c.bytes_in for c in conns),
            bytes_out=closed["bytes_out"] + sum(c.bytes_out for c in conns),
            drops=dict(core.drops), errors_sent=dict(core.errors_sent),
            links=tuple(
                LinkStatistics(
                    endpoint=s.config.endpoint, connected=s.conn_id is not None and
                    core.connection_kind(s.conn_id) is ConnKind.PEER,
                    peer_node=core.peer_of(s.conn_id) if s.conn_id is not None else None,
                    conn_id=s.conn_id, attempts=s.attempts, failures=s.failures)
                for s in self._links),
            per_connection=tuple(conns) if per_connection else (),
        )

    def report(self) -> dict[str, Any]:
        """The node as ``slim-agents top`` shows it: totals, drops, links, connections
        (counters and queues) and channels with their members. What an app gets
        for a :class:`~node_lite.wire.ReportRequest`; plain msgpack-able data."""
        stats = self.statistics(per_connection=True)
        names = {c.conn_id: c.name for c in stats.per_connection}
        channels: dict[str, list[str]] = {}
        for name, kind, conn in self.core.table.entries():
            if name.id is None and kind in ("local", "static"):
                channels.setdefault(str(name), []).append(
                    str(names.get(conn) or f"conn {conn}"))
        return {
            "node": stats.node_id, "endpoints": list(stats.endpoints),
            "totals": {"frames_in": stats.frames_in, "frames_out": stats.frames_out,
                       "bytes_in": stats.bytes_in, "bytes_out": stats.bytes_out,
                       "accepted": stats.accepted, "refused": stats.refused,
                       "routes": stats.routes},
            "drops": dict(stats.drops), "errors_sent": dict(stats.errors_sent),
            "links": [{"endpoint": link.endpoint, "connected": link.connected,
                       "peer": link.peer_node} for link in stats.links],
            "connections": [{"id": c.conn_id, "kind": c.kind, "name": c.name,
                             "peer": c.peer_node, "subscriptions": c.subscriptions,
                             "frames_in": c.frames_in, "frames_out": c.frames_out,
                             "bytes_in": c.bytes_in, "bytes_out": c.bytes_out,
                             "pending_frames": c.pending_frames,
                             "pending_bytes": c.pending_bytes, "drops": dict(c.drops)}
                            for c in stats.per_connection],
            "channels": channels,
        }

    # -- shutdown --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop accepting, tell every connection the node is shutting down, drain, stop.

        Waits at most ``drain_timeout`` for connections to flush.
        """
        if self._closing:
            return
        self._closing = True
        with anyio.CancelScope(shield=True):
            self._accept_scope.cancel()
            for state in self._links:
                if state.scope is not None:
                    state.scope.cancel()
            for conn_id in list(self._outboxes):
                self.core.close_connection(conn_id, ErrorCode.SHUTTING_DOWN,
                                           "node is shutting down")
            if self._outboxes:
                self._idle = anyio.Event()
                with anyio.move_on_after(self.config.drain_timeout):
                    await self._idle.wait()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()


@asynccontextmanager
async def open_node(config: NodeConfig | None = None, **kwargs: Any) -> AsyncIterator[Node]:
    """Run a node for the duration of the block and yield it.

    With no configuration it listens on ``127.0.0.1`` on a free port;
    ``node.endpoint`` and ``node.url`` give the bound address.

    :raises ConfigError: when the configuration is invalid or a port is taken.
    """
    if config is not None and not isinstance(config, NodeConfig):
        raise ConfigError("config must be a NodeConfig")
    node = Node(config, **kwargs)
    with collapse_excgroups():
        async with anyio.create_task_group() as tg:
            await tg.start(node.serve)
            try:
                yield node
            finally:
                await node.aclose()
                tg.cancel_scope.cancel()
