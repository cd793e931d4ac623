# The anyio driver of an app: one connection to a node (redialled with
# backoff), a read loop feeding AppCore, a timer task, and the wake-ups of
# whoever waits on sessions, tickets and the send window.
from __future__ import annotations

import enum
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from node_lite import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    Limits,
    Name,
    Node,
    NodeConnection,
    ProtocolError,
    SharedSecretProvider,
    SharedSecretVerifier,
    SlimError,
    TlsConfig,
    TokenProvider,
    TokenVerifier,
    instance_id_for,
    open_connection,
)
from node_lite._limits import DEFAULT_LIMITS
from node_lite._util import Wakeup, collapse_excgroups, current_backend
from node_lite.wire import (
    Command,
    CommandResult,
    DirectoryEntry,
    LookupResult,
    ReportResult,
    encode_frame,
)

from ._app_core import AppCore, InvitePolicy
from ._config import SessionConfig, SessionKind
from ._e2e import SigningIdentity
from ._errors import ParticipantError, SessionError
from ._instrument import Instrument, default_instrument
from ._reports import Ticket
from ._session import FLUSH, FLUSH_ALONE, Handle, Session
from ._session_core import (
    Closed,
    Established,
    InboxReady,
    ModeratorLost,
    RosterChanged,
    SessionCore,
    State,
    TicketDone,
    Unreachable,
    WindowOpen,
)

log = logging.getLogger("slim_agents.app")

# A publish this long after the previous one is sent at once by the caller;
# closer ones are left to the writer, which joins them into one write.
_BURST_GAP = 200e-6
# Frames a corked read loop lets its woken tasks queue before they go out: a
# whole round in one write would leave the peer idle while this side works.
_CORK_MAX = 8
# Reconnect backoff: from 100 ms, doubling, at most 2 s (with jitter), as links do.
RECONNECT_MIN = 0.1
RECONNECT_MAX = 2.0
# How long closing an app waits for its sessions to say goodbye.
CLOSE_GRACE = 2.0
# Sessions announced to this app and not yet taken by listen_for_session().
MAX_LISTEN_QUEUE = 1024
# Longest pause of the read loop for one full session inbox.
INBOX_PAUSE = 1.0


class _Default(enum.Enum):
    DEFAULT = enum.auto()


_DEFAULT = _Default.DEFAULT


def _base_name(name: Name | str) -> Name:
    n = Name.parse(name) if isinstance(name, str) else name
    return n.without_id()


class App:
    """A SLIM application: a name, an identity, a connection to a node, and its sessions.

    Use :func:`open_app`; the app lives for the duration of its ``async with`` block.
    """

    def __init__(self, name: Name | str, provider: TokenProvider,
                 verifier: TokenVerifier | None, *, node: Node | str,
                 tls: TlsConfig | None = None, limits: Limits | None = None,
                 invite_policy: InvitePolicy | None = None, reconnect: bool = True,
                 accept_commands: bool = True, rng: random.Random | None = None,
                 signing_identity: SigningIdentity | None = None,
                 instrument: Instrument | None = None) -> None:
        base = _base_name(name)
        #: Told about publishes, deliveries and session operations (tracing); None: off.
        self.instrument = instrument
        self.provider = provider
        self.name = base.with_id(instance_id_for(provider.subject))
        self.limits = limits or DEFAULT_LIMITS
        self.core = AppCore(self.name, provider, verifier, rng=rng, limits=self.limits,
                            invite_policy=invite_policy, signing=signing_identity)
        self._target = node
        self._tls = tls
        self._reconnect = reconnect
        self._accept_commands = accept_commands
        self._conn: NodeConnection | None = None
        self._tg: TaskGroup | None = None
        self._sessions: dict[int, Session] = {}
        self._listen: deque[Session] = deque()
        self._listen_wakeup = Wakeup()
        self._timer_wake: anyio.Event | None = None
        self._timer_at = math.inf
        self._connected = anyio.Event()
        self._offline = anyio.Event()
        self._closing = False
        self._deferred = False
        # Set while the read loop lets the tasks its batch woke run: their
        # publishes queue behind the batch's acks and leave in one write.
        self._corked = False
        self._last_publish = 0.0
        self.connects = 0
        self.offline_drops = 0
        self._node_requests: dict[int, tuple[anyio.Event, list[LookupResult | ReportResult]]] = {}

    # -- identity -----------------------------------------------------------------------

    @property
    def id(self) -> int:
        assert self.name.id is not None
        return self.name.id

    @property
    def id_str(self) -> str:
        """``org/ns/app/<decimal id>``, as upstream prints it."""
        return str(self.name)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- running ------------------------------------------------------------------------

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._connection_loop)
            tg.start_soon(self._timer_loop)
            task_status.started()

    async def _connection_loop(self, *, task_status: TaskStatus[None]) -> None:
        backoff = RECONNECT_MIN
        first = True
        while not self._closing:
            try:
                async with open_connection(self._target, name=self.name,
                                           token=self.provider.get_token(), tls=self._tls,
                                           limits=self.limits) as conn:
                    self.connects += 1
                    backoff = RECONNECT_MIN
                    for frame in self.core.resubscribe():
                        conn.outbox.write(frame)
                    self._conn = conn
                    self._offline = anyio.Event()
                    self._connected.set()
                    if first:
                        first = False
                        task_status.started()
                    else:
                        log.info("%s: reconnected", self.name)
                    self._pump()
                    await self._read_loop(conn)
            except (ConnectError, AuthenticationError) as exc:
                if first:
                    raise
                log.info("%s: reconnect failed: %s", self.name, exc)
            finally:
                self._conn = None
                self._connected = anyio.Event()
                self._offline.set()
                self._abandon_goodbyes()
            if self._closing or not self._reconnect:
                return
            await anyio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, RECONNECT_MAX)

    def _abandon_goodbyes(self) -> None:
        """Sessions closing when the connection drops close here: nobody can be told."""
        closing = [w for w in self._sessions.values() if w._core.state is State.CLOSING]
        if closing:
            now = time.time()
            for wrapper in closing:
                wrapper._core._finish_close("closed", now)
            self._pump()

    async def _read_loop(self, conn: NodeConnection) -> None:
        core = self.core
        shuffled = current_backend() == "trio"  # runs a batch of ready tasks in either order
        # What the read callback handed over (see _take): None, the cork; or an
        # exception met there, dealt with here as if this task had met it.
        handed: list[Exception | None] = []
        direct = conn.read_in_callback(partial(self._take, conn, handed))
        try:
            while True:
                if direct is not None and conn.caught_up:
                    direct.release()
                try:
                    envelopes = await conn.receive_envelopes()
                except anyio.EndOfStream:
                    return
                except ProtocolError as exc:
                    self._framing_lost(exc)
                    return
                if direct is not None:
                    direct.held = True  # the callback queues behind this batch
                if handed:
                    # The callback's empty chunk: it did the batch up to what must
                    # wait. The tasks that batch woke ran before this one (asyncio
                    # runs ready callbacks in order), as the cork below waits for.
                    failure = handed.pop()
                    if isinstance(failure, ProtocolError):
                        self._framing_lost(failure)
                        return
                    if failure is not None:
                        raise failure
                    self._corked = False
                elif envelopes or conn.bad_frames:
                    self._absorb(conn, envelopes)
                    if self._must_cork():
                        # Let the tasks this batch woke run first: a reply they send
                        # carries the acks, and all of them leave in one write (one
                        # wake-up at the peer).
                        self._corked = True
                        try:
                            await anyio.lowlevel.checkpoint()
                            if core.acks_due and shuffled:
                                # trio may have run this task before the ones it woke.
                                await anyio.lowlevel.checkpoint()
                        finally:
                            self._corked = False
                else:
                    continue
                self._hand_out()
                await self._flush()
                for full in core.take_congested():
                    # Backpressure: stop reading until the application drains this
                    # session (the node then slows the senders down). Not when its
                    # publisher waits for acks (they come through this loop), and
                    # not for long: a stuck consumer must not stall other sessions.
                    wrapper = self._sessions.get(full.sid)
                    if wrapper is not None and not wrapper._window_wakeup.waiting:
                        core.count("inbox_pauses")
                        with anyio.move_on_after(INBOX_PAUSE):
                            await wrapper._wait_inbox_room()
        finally:
            if direct is not None:
                direct.held = True  # bytes still arriving are not for this loop
            self._corked = False

    def _take(self, conn: NodeConnection, handed: list[Exception | None],
              data: bytes) -> bool:
        """The read loop's work on ``data``, inside the transport's callback (asyncio).

        What must wait (the cork, a congested session) or fails is handed to the
        read loop: returns False after queueing it in ``handed``.
        """
        core = self.core
        try:
            self._absorb(conn, conn.decode(data))
            if self._must_cork():
                self._corked = True
                handed.append(None)
                return False
            self._hand_out()
            if self._deferred:
                self._deferred = False
                conn.outbox.flush_now()
            if core.any_congested:
                handed.append(None)
                return False
            return True
        except Exception as exc:
            handed.append(exc)
            return False

    def _framing_lost(self, exc: ProtocolError) -> None:
        # A length prefix past the limit: the frames after it cannot be found, so
        # this connection ends (the app reconnects; reliable sessions resend).
        self.core.count(f"read_error:{type(exc).__name__}")
        log.warning("%s: the node sent bytes that are not frames (%s); reconnecting",
                    self.name, exc)

    def _absorb(self, conn: NodeConnection, envelopes: list[dict[str, Any]]) -> None:
        core = self.core
        if conn.bad_frames:
            for kind, n in conn.bad_frames.items():
                core.count(f"read_error:{kind}", n)
            conn.bad_frames.clear()
        if envelopes:
            core.receive(envelopes, time.time(), ack=False)
            self._pump(defer=True)

    def _must_cork(self) -> bool:
        core = self.core
        return bool(self._deferred or core.acks_due) and core.pending_sessions == 0

    def _hand_out(self) -> None:
        """What a batch leaves once the tasks it woke had their turn: acks (as frames,
        deferred), answers from the node to their waiters, controller commands to tasks."""
        core = self.core
        if core.acks_due:
            core.flush(time.time())
            self._pump(defer=True)
        if core.node_answers:
            answers, core.node_answers = core.node_answers, []
            for answer in answers:
                waiter = self._node_requests.get(answer.request_id)
                if waiter is not None:
                    waiter[1].append(answer)
                    waiter[0].set()
        if core.commands:
            commands, core.commands = core.commands, []
            for command in commands:
                assert self._tg is not None
                self._tg.start_soon(self._run_command, command)

    async def _timer_loop(self) -> None:
        core = self.core
        while True:
            deadline = core.get_timer()
            self._timer_at = math.inf if deadline is None else deadline
            self._timer_wake = wake = anyio.Event()
            delay = math.inf if deadline is None else max(0.0, deadline - time.time())
            with anyio.move_on_after(delay):
                await wake.wait()
            now = time.time()
            if deadline is not None and now >= deadline:
                core.handle_timer(now)
                self._pump(defer=True)
                await self._flush()

    # -- pumping output and events --------------------------------------------------------

    def _now(self) -> float:
        return time.time()

    def _after(self, session: SessionCore, *, defer: bool = False,
               soonest: float | None = None) -> None:
        core = self.core
        core.operate(session, soonest)
        if core._events or core._ready:
            self._pump(defer=defer)
        else:
            self._send_frames(defer=defer)
            deadline = core.get_timer()
            if deadline is not None and deadline < self._timer_at and \
                    self._timer_wake is not None:
                self._timer_wake.set()

    def _published(self, session: SessionCore, soonest: float) -> int:
        """Send what a publish of ``session`` queued, as the traffic around it suits.

        Returns what the caller does next: ``0``, nothing (the writer has it);
        ``FLUSH``, await :meth:`_flush`; ``FLUSH_ALONE``, await it and return (it
        was a checkpoint). Not a coroutine: most publishes await nothing here.
        """
        now = time.monotonic()  # a C call; anyio.current_time looks up the backend first
        burst = now - self._last_publish <= _BURST_GAP
        self._last_publish = now
        if self._corked:
            # Woken by the read loop's batch: it sends this with the rest, or
            # this sends a full share now so the peer can start on it.
            self._after(session, defer=True, soonest=soonest)
            conn = self._conn
            return FLUSH if conn is not None and conn.outbox.pending_frames >= _CORK_MAX else 0
        if not burst:
            # Not part of a burst (request/reply): send from here, one task switch less.
            self._after(session, defer=True, soonest=soonest)
            return FLUSH_ALONE
        self._after(session, soonest=soonest)  # the writer joins the burst into one write
        return 0

    def _send_frames(self, *, defer: bool = False) -> None:
        frames = self.core.take_frames()
        if frames:
            conn = self._conn
            if conn is not None and not conn.outbox.is_closed:
                data = frames[0] if len(frames) == 1 else b"".join(frames)
                if defer:
                    conn.write_deferred(data)
                    self._deferred = True
                else:
                    conn.outbox.write(data)
            else:
                self.offline_drops += len(frames)

    def _wake_writer(self) -> None:
        if self._deferred:
            self._deferred = False
            conn = self._conn
            if conn is not None:
                conn.outbox.wake_writer()

    async def _flush(self) -> None:
        """Send deferred frames (see NodeConnection.flush)."""
        if self._deferred:
            self._deferred = False
            conn = self._conn
            if conn is not None:
                await conn.flush()

    def _pump(self, *, defer: bool = False) -> None:
        core = self.core
        self._send_frames(defer=defer)
        for event in core.dispatch_events():
            if type(event) is TicketDone:
                waiter = event.ticket.waiter
                if waiter is not None:
                    event.ticket.waiter = None
                    waiter.set()
            elif type(event) is InboxReady:
                wrapper = self._sessions.get(event.session.sid)
                if wrapper is not None:
                    wrapper._wake_inbox()
            elif type(event) is Established:
                self._on_established(event.session)
            elif type(event) is Closed:
                wrapper = self._sessions.get(event.session.sid)
                if wrapper is not None:
                    wrapper._wake_inbox()
                    wrapper._window_wakeup.fire()
                    wrapper._roster_wakeup.fire()
                    wrapper._room_wakeup.fire()
                    wrapper._lost_wakeup.fire()
            elif type(event) is WindowOpen:
                wrapper = self._sessions.get(event.session.sid)
                if wrapper is not None:
                    wrapper._window_wakeup.fire()
            elif type(event) is RosterChanged:
                wrapper = self._sessions.get(event.session.sid)
                if wrapper is not None:
                    wrapper._roster_wakeup.fire()
            elif type(event) is ModeratorLost:
                wrapper = self._sessions.get(event.session.sid)
                if wrapper is not None:
                    wrapper._lost_wakeup.fire()
            elif type(event) is Unreachable:
                wrapper = self._sessions.get(event.session.sid)
                if wrapper is not None:
                    wrapper._peer_unreachable()
        deadline = core.get_timer()
        if deadline is not None and deadline < self._timer_at and self._timer_wake is not None:
            self._timer_wake.set()

    def _wrap(self, core: SessionCore) -> Session:
        wrapper = self._sessions.get(core.sid)
        if wrapper is None or wrapper._core is not core:
            wrapper = self._sessions[core.sid] = Session(self, core)
        return wrapper

    def _on_established(self, core: SessionCore) -> None:
        wrapper = self._wrap(core)
        if core.initiator:
            return
        if len(self._listen) >= MAX_LISTEN_QUEUE:
            log.warning("%s: listen queue full; closing session %d", self.name, core.sid)
            core.close(time.time())
            return
        self._listen.append(wrapper)
        self._listen_wakeup.fire()

    async def _wait_writable(self) -> None:
        conn = self._conn
        if conn is not None and conn.outbox.pending_bytes >= self.limits.max_pending_bytes:
            await conn.outbox.wait_drained()

    # -- management commands (the controller flow) -----------------------------------------

    async def _run_command(self, cmd: Command) -> None:
        """Carry out a controller operation as moderator and answer it."""
        try:
            if not self._accept_commands:
                raise SessionError("this app does not accept management commands")
            result = await self._command(cmd.op, cmd.args)
            reply = CommandResult(request_id=cmd.request_id, result=result)
        except (SlimError, ValueError) as exc:
            reply = CommandResult(request_id=cmd.request_id, ok=False, error=str(exc))
        conn = self._conn
        if conn is not None and not conn.outbox.is_closed:
            conn.outbox.write(encode_frame(reply))

    async def _command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        channel = Name.parse(str(args.get("channel", "")))
        if op == "create_channel":
            config = SessionConfig.group(timeout=1.0, max_retries=10,
                                         mls_enabled=args.get("mls") is True)
            session, handle = await self.start_session(channel, config)
            await handle
            session._managed = True
            self._listen.append(session)  # announced like a session we were invited to
            self._listen_wakeup.fire()
            return {"channel": str(channel)}
        session = self._moderated(channel)
        if op == "add_participant":
            added = await session.invite(str(args.get("participant", "")))
            return {"name": str(added)}
        if op == "remove_participant":
            target = Name.parse(str(args.get("participant", "")))
            if target.id is None:
                matches = [p for p in session.participants if p.without_id() == target]
                if not matches:
                    raise ParticipantError(f"participant not found in group: {target}")
                target = matches[0]
            await session.remove(target)
            return {"name": str(target)}
        if op == "delete_channel":
            await session.close()
            return {}
        raise SessionError(f"unknown operation {op!r}")

    def _moderated(self, channel: Name) -> Session:
        for wrapper in self._sessions.values():
            if not wrapper.is_closed and wrapper.is_moderator and wrapper.dst == channel:
                return wrapper
        raise SessionError(f"channel {channel} not found")

    # -- sessions -----------------------------------------------------------------------

    async def create_session(self, destination: Name | str,
                             config: SessionConfig | None = None) -> Session:
        """Create a session and wait until it is established.

        For a point-to-point session ``destination`` is a service (``org/ns/app``;
        one instance is discovered and the session stays with it) or a full
        name. For a group it is the channel; members join with :meth:`Session.invite`.

        :raises NoRouteError: when nobody serves ``destination``.
        :raises SessionRejectedError: when the peer refuses (identity, policy).
        :raises SessionTimeoutError: when the peer does not answer.
        """
        inst = self.instrument
        if inst is None:
            session, handle = await self.start_session(destination, config)
            await handle
            return session
        with inst.operation("slim session setup", {"slim.app": str(self.name),
                                                   "messaging.destination.name": str(destination)}):
            session, handle = await self.start_session(destination, config)
            await handle
        return session

    async def start_session(self, destination: Name | str, config: SessionConfig | None = None
                            ) -> tuple[Session, Handle[Any]]:
        """Create a session; return it at once with a handle that completes when established."""
        dest = Name.parse(destination) if isinstance(destination, str) else destination
        config = config or SessionConfig()
        if config.kind is SessionKind.GROUP and dest.id is not None:
            raise ConfigError("a group channel is a name without an instance id")
        core, ticket = self.core.create_session(dest, config, time.time())
        wrapper = self._wrap(core)
        self._pump()
        return wrapper, Handle(self, ticket)

    async def listen_for_session(self) -> Session:
        """Wait for a session another app created with this one (bound it with a cancel scope)."""
        while not self._listen:
            await self._listen_wakeup.wait()
        await anyio.lowlevel.checkpoint_if_cancelled()
        self.core.session_listened()
        return self._listen.popleft()

    async def delete_session(self, session: Session) -> None:
        """Close a session (see :meth:`Session.close`)."""
        await session.close()

    @property
    def sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if not s.is_closed]

    # -- routing ------------------------------------------------------------------------

    async def subscribe(self, name: Name | str) -> None:
        """Receive frames addressed to ``name`` (kept across reconnects)."""
        self.core.subscribe(Name.parse(name) if isinstance(name, str) else name)
        self._pump()
        await anyio.lowlevel.checkpoint()

    async def unsubscribe(self, name: Name | str) -> None:
        self.core.unsubscribe(Name.parse(name) if isinstance(name, str) else name)
        self._pump()
        await anyio.lowlevel.checkpoint()

    async def set_route(self, name: Name | str) -> None:
        """Accepted for compatibility: node_lite routes to names automatically."""
        if isinstance(name, str):
            Name.parse(name)
        await anyio.lowlevel.checkpoint()

    async def remove_route(self, name: Name | str) -> None:
        """Accepted for compatibility (see :meth:`set_route`)."""
        await self.set_route(name)

    # -- the node's directory -------------------------------------------------------------

    async def announce(self, card: bytes) -> None:
        """Publish this app's card in the node's directory (replaces the previous one).

        :raises LimitExceededError: when the card is larger than 64 KiB.
        """
        self.core.announce(card)
        self._pump()
        await anyio.lowlevel.checkpoint()

    async def lookup(self, prefix: str = "", *, limit: int = 256) -> list[DirectoryEntry]:
        """Who the node can reach: apps whose name starts with ``prefix`` ("org/ns", ...).

        Apps on this node come with the card they announced; apps behind
        linked nodes come without (``card`` is None). Asked again after a
        reconnect; bound the wait with a cancel scope.
        """
        parts = tuple(p for p in prefix.split("/") if p)
        if len(parts) > 3:
            raise ValueError(f"a lookup prefix has at most three components: {prefix!r}")
        answer = await self._ask_node(lambda: self.core.lookup(parts, limit))
        assert isinstance(answer, LookupResult)
        return list(answer.entries)

    async def node_report(self) -> dict[str, Any]:
        """The node's report of itself: totals, drops, links, connections, channels
        (see :meth:`node_lite.Node.report`). Bound the wait with a cancel scope."""
        answer = await self._ask_node(self.core.request_report)
        assert isinstance(answer, ReportResult)
        return answer.report

    async def _ask_node(self, send: Callable[[], int]) -> LookupResult | ReportResult:
        """Send a request to the node and wait for its answer (again after a reconnect)."""
        while True:
            await self.wait_connected()
            offline = self._offline
            event = anyio.Event()
            box: list[LookupResult | ReportResult] = []
            rid = send()
            self._node_requests[rid] = (event, box)
            try:
                self._pump()
                await _either(event, offline)
            finally:
                del self._node_requests[rid]
            if box:
                return box[0]

    async def wait_connected(self) -> None:
        """Return once connected to the node (after a reconnect, for instance)."""
        while self._conn is None:
            await self._connected.wait()

    def statistics(self) -> dict[str, Any]:
        stats = self.core.statistics()
        stats.update(connects=self.connects, connected=self.connected,
                     offline_drops=self.offline_drops,
                     pending_bytes=self._conn.pending_bytes if self._conn else 0)
        return stats

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every session (telling the others, briefly), then disconnect."""
        if self._closing:
            return
        with anyio.CancelScope(shield=True):
            tickets: list[Ticket] = []
            now = time.time()
            if self.connected:
                for wrapper in list(self._sessions.values()):
                    if not wrapper.is_closed:
                        tickets.append(wrapper._core.close(now))
                self._pump()
            if tickets:
                with anyio.move_on_after(CLOSE_GRACE):
                    async with anyio.create_task_group() as tg:
                        async def goodbyes() -> None:
                            for ticket in tickets:
                                try:
                                    await Handle[Any](self, ticket)
                                except SlimError:
                                    pass  # the peer is gone or refused: closing anyway
                            tg.cancel_scope.cancel()

                        async def connection_lost() -> None:
                            await self._offline.wait()
                            tg.cancel_scope.cancel()

                        tg.start_soon(goodbyes)
                        tg.start_soon(connection_lost)
            # Whatever could not say goodbye (offline, or no answer) ends here.
            for wrapper in list(self._sessions.values()):
                if not wrapper.is_closed:
                    wrapper._core._finish_close("app closed", time.time())
            self._pump()
            self._closing = True
            conn = self._conn
            if conn is not None:
                with anyio.move_on_after(1.0):
                    await conn.aclose()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()


_OWN_SCHEMES = ("http", "https", "tcp")


def _foreign_scheme(url: str) -> bool:
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() not in _OWN_SCHEMES


def _backend_for(url: str) -> Any:
    """The backend a plugin offers for ``url`` (through the ``slim_backend`` hook)."""
    from ._plugins import PluginError, plugin_manager

    backend = plugin_manager().hook.slim_backend(url=url)
    if backend is None:
        raise PluginError(f"no installed plugin serves {url!r}; for upstream SLIM install "
                          "the upstream extra (pip install 'slim-agents[upstream]')")
    return backend


async def _either(a: anyio.Event, b: anyio.Event) -> None:
    """Return once ``a`` or ``b`` is set."""
    async with anyio.create_task_group() as tg:
        async def watch(e: anyio.Event) -> None:
            await e.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(watch, a)
        tg.start_soon(watch, b)


def _identity(name: Name, secret: str | None, provider: TokenProvider | None,
              verifier: TokenVerifier | None,
              signing: SigningIdentity) -> tuple[TokenProvider, TokenVerifier | None]:
    if provider is None:
        if secret is None:
            raise ConfigError("give secret=... or provider=... (and verifier=...)")
        # The token carries the signing key, so end-to-end credentials bind to it.
        provider = SharedSecretProvider(f"{name.org}/{name.ns}/{name.app}", secret,
                                        claims=signing.pubkey_claim())
        if verifier is None:
            # Tokens ride on many control messages: duplicates are caught by message id.
            verifier = SharedSecretVerifier(secret, replay_cache=0)
    return provider, verifier


@asynccontextmanager
async def open_app(
    name: Name | str,
    *,
    node: Node | str,
    secret: str | None = None,
    provider: TokenProvider | None = None,
    verifier: TokenVerifier | None = None,
    tls: TlsConfig | None = None,
    limits: Limits | None = None,
    invite_policy: InvitePolicy | None = None,
    reconnect: bool = True,
    accept_commands: bool = True,
    signing_identity: SigningIdentity | None = None,
    instrument: Instrument | _Default | None = _DEFAULT,
) -> AsyncIterator[App]:
    """Connect an app to a node for the duration of the block.

    :param name: ``org/ns/app``; the instance id comes from the identity.
    :param node: a :class:`node_lite.Node` of this process (in-memory
        connection) or a URL such as ``http://127.0.0.1:46357``.
    :param secret: shared secret for the identity token and for checking peers;
        or pass ``provider`` and ``verifier`` (JWT and others).
    :param invite_policy: decides on invitations (return True, or a reason to decline).
    :param accept_commands: carry out channel operations sent by a controller
        through the node (as the tutorial's participants do).
    :param signing_identity: the Ed25519 key of end-to-end encrypted sessions
        (a new one by default). With ``secret`` the token binds it by a claim;
        a JWT binds it when its claims include ``signing_identity.pubkey_claim()``
        (or a ``cnf`` key), else peers trust it on first use.
    :param instrument: what records the app's sessions for tracing (default: the
        one :func:`slim_agents.enable_tracing` set, if any; None: none).
    :raises ConnectError: when the node cannot be reached.
    :raises AuthenticationError: when the node refuses the identity.
    """
    if isinstance(node, str) and _foreign_scheme(node):
        # Another network (upstream SLIM, say): a backend plugin provides the app.
        backend = _backend_for(node)
        async with backend.open_app(name, node=node, secret=secret, provider=provider,
                                    verifier=verifier, tls=tls, limits=limits,
                                    invite_policy=invite_policy) as foreign:
            yield foreign
        return
    base = _base_name(name)
    signing = signing_identity or SigningIdentity.generate()
    provider, verifier = _identity(base, secret, provider, verifier, signing)
    app = App(base, provider, verifier, node=node, tls=tls, limits=limits,
              invite_policy=invite_policy, reconnect=reconnect,
              accept_commands=accept_commands, signing_identity=signing,
              instrument=default_instrument() if instrument is _DEFAULT else instrument)
    with collapse_excgroups():
        async with anyio.create_task_group() as tg:
            await tg.start(app._run)
            try:
                yield app
            finally:
                await app.aclose()
                tg.cancel_scope.cancel()
