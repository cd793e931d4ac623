"""Upstream SLIM through ``slim-bindings``: slim-agents apps, sessions and agents on an
upstream SLIM network, chosen by the node URL's scheme ``slim://host:port`` (an
upstream node listening at ``http://host:port``)::

    async with open_app("org/ns/alice", node="slim://127.0.0.1:46357", secret=s) as app:
        session = await app.create_session("org/ns/bob", SessionConfig(timeout=1, max_retries=5))

    async with agent.run("slim://127.0.0.1:46357", secret=s) as running: ...

Install with ``pip install 'slim-agents[upstream]'``. Each app gets its own upstream
``Service`` (its own data plane and connection, as a separate process would); the
Rust runtime and its tracing are process-wide, set up once (log level from
``SLIM_UPSTREAM_LOG``, default ``off``). :func:`open_upstream_server` runs an upstream
node in this process (tests, benchmarks).

Event loops: UniFFI's async calls are asyncio futures of the running loop, so on
asyncio they are awaited directly; on trio they run on a private asyncio loop in a
daemon thread (one thread hop per call). Both are supported.

What differs from node_lite (each is tested in ``tests/upstream``):

* Instance ids: upstream's are UUID strings fixed by the identity (random per app).
  ``Name.id`` is a 63-bit hash of it, mapped back through a per-process table, so a
  full name only resolves once this process has seen it (``NoRouteError`` otherwise).
* Delivery reports: upstream's completion is all or nothing. A reliable publish
  reports the recipients of the roster at publish time as delivered, or all of them
  as failed (``DeliveryError``, ``DeliveryTimeoutError`` for exhausted retries).
  A reliable publish to a peer that went away *succeeds* after its retries (observed
  on 3.3.8). ``message_id`` is a local counter. A group with no other member reports
  at once (upstream would never complete it).
* No route: upstream drops what it cannot route, so a session or an invite to nobody
  fails after its retries with :class:`UnreachableError` (a ``NoRouteError`` and a
  ``SessionTimeoutError``), not at once.
* Discovery: upstream has no directory. ``announce`` keeps the card locally,
  ``lookup`` raises :class:`DirectoryUnsupportedError` (code ``unsupported``), which
  ``RunningAgent.discover`` and the ``discover_agents`` tool pass on.
* Invitations: upstream joins before asking. ``invite_policy`` runs on arrival and a
  declined session is left at once (reason ``declined (...)``): the inviter sees the
  invite succeed, then the member leave. ``invite`` returns the member's full name,
  or the name it was given when the member has left again before it could be read.
* Close reasons: ``closed`` (this side), ``closed by peer`` (point-to-point), and
  ``closed by moderator`` for a member whose group closed *or* who was removed
  (upstream tells them apart to nobody). Upstream ends a group when its last member
  leaves: the moderator's session closes with ``last member left`` (node_lite keeps it).
* Rosters come from upstream. ``watch_roster``/``wait_participants`` wake on this
  app's invites and removals, on members leaving (upstream tells the moderator), on
  a roster notice a slim-agents moderator sends to members (a message of type
  ``slim-agents/roster``, which other upstream apps see), when an unknown member
  speaks, and when ``participants`` is read.
* The moderator of a group is told to members by session metadata a slim-agents
  moderator adds (``slim-agents-moderator``); under another upstream moderator it
  is None. Upstream's own metadata keys (``slim-payload-sig``, ...) are hidden.
* Encryption: ``mls_enabled`` turns on upstream MLS; ``session.encryption`` is None
  and ``rotate_keys`` raises ``SessionError`` (upstream rotates keys itself).
* Speed: every call crosses UniFFI (a Rust future polled from Python), which costs
  some 100-200 us; expect a few thousand messages/s per session (bench/backends.py).
* Not available: management commands, ``on_unreachable`` signals (the callbacks never
  run; a session's closure still ends waits), TLS settings (``tls=`` raises
  ``ConfigError``), ``limits``, and identities other than a shared ``secret``.
"""

from __future__ import annotations

# UniFFI's async methods create asyncio futures on the running loop (and a thread's
# loop for trio callers): this module bridges that loop, hence the asyncio import.
import asyncio
import datetime
import hashlib
import itertools
import logging
import os
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import slim_bindings as sb
from anyio.abc import TaskGroup, TaskStatus

from node_lite import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    LimitExceededError,
    Name,
    NoRouteError,
    SharedSecretProvider,
    SlimError,
)
from node_lite._util import Wakeup, collapse_excgroups
from slim_agents import (
    DeliveryError,
    DeliveryReport,
    DeliveryTimeoutError,
    JoinInfo,
    Message,
    MessageContext,
    NotModeratorError,
    ParticipantError,
    SessionClosedError,
    SessionConfig,
    SessionError,
    SessionKind,
    SessionTimeoutError,
)

__all__ = [
    "DirectoryUnsupportedError",
    "UnreachableError",
    "UpstreamApp",
    "UpstreamBackend",
    "UpstreamHandle",
    "UpstreamServer",
    "UpstreamSession",
    "backend",
    "open_upstream_server",
]

log = logging.getLogger("slim_agents.upstream")
T = TypeVar("T")
R = TypeVar("R")
InvitePolicy = Callable[[JoinInfo], "bool | str"]

SCHEMES = ("slim",)
LOG_ENV = "SLIM_UPSTREAM_LOG"
# Upstream retries a dead endpoint forever; the first connection gives up after this.
CONNECT_TIMEOUT = 10.0
# How long closing waits for the others to acknowledge.
CLOSE_GRACE = 2.0
# Sessions joined and not yet taken by listen_for_session().
MAX_LISTEN_QUEUE = 1024
# Upstream instance ids this process remembers (for full names given back to it).
MAX_KNOWN_IDS = 65_536
MAX_CARD_SIZE = 64 * 1024
# Free-port attempts of an in-process server (another process may take the port).
BIND_ATTEMPTS = 5

ROSTER_TYPE = "slim-agents/roster"
MODERATOR_KEY = "slim-agents-moderator"
DIRECT_KEY = "slim-agents-direct"
# Metadata keys upstream adds on its own (or this module does): not shown to apps.
_HIDDEN = frozenset({"slim-payload-sig", "slim-peer-subject", MODERATOR_KEY, DIRECT_KEY})
_NO_ID = "NULL_COMPONENT"
# What upstream raises: its typed errors, and InternalError for a Rust panic.
_ERRORS = (sb.SlimError, sb.InternalError)


# -- errors ----------------------------------------------------------------------------


class UnreachableError(NoRouteError, SessionTimeoutError):
    """Nobody answered: no app serves the name, or it did not respond in time.

    Upstream drops messages it cannot route, so both look the same.
    """

    def __init__(self, destination: object, detail: str, *,
                 session_id: int | None = None) -> None:
        Exception.__init__(self, f"no answer from {destination} ({detail})")
        self.code = "no_route"
        self.message = detail
        self.data: dict[str, Any] = {}
        self.destination = destination
        self.session_id = session_id


class DirectoryUnsupportedError(SlimError):
    """Upstream SLIM has no directory: ``lookup`` (and agent discovery) is not available."""

    code = "unsupported"


def _text(exc: BaseException) -> str:
    return str(getattr(exc, "message", "") or exc or type(exc).__name__)


def _session_error(exc: BaseException, *, session_id: int | None,
                   destination: object = None) -> SlimError:
    """The slim-agents error for an upstream session error."""
    text = _text(exc)
    low = text.lower()
    if "retries exhausted" in low or "failed to add participant" in low:
        return UnreachableError(destination, text.splitlines()[0], session_id=session_id)
    if "already in group" in low or "not in group" in low:
        return ParticipantError(text, session_id=session_id)
    if "only initiator" in low or "only the initiator" in low:
        return NotModeratorError(text, session_id=session_id)
    if "closed" in low or "dropped" in low or "disconnected" in low:
        return SessionClosedError(session_id, "closed")
    if type(exc).__name__ == "Timeout" or "timeout" in low:
        return SessionTimeoutError(text, session_id=session_id)
    return SessionError(f"upstream: {text}", session_id=session_id)


# -- the runtime, names and the event-loop bridge -------------------------------------

_init_lock = threading.Lock()


def _ensure_runtime() -> None:
    """Start upstream's process-wide runtime once (tracing level from SLIM_UPSTREAM_LOG)."""
    with _init_lock:
        if sb.is_initialized():
            return
        tracing = sb.new_tracing_config()
        tracing.log_level = os.environ.get(LOG_ENV, "off")
        sb.initialize_with_configs(runtime_config=sb.new_runtime_config(),
                                   tracing_config=tracing,
                                   service_config=[sb.new_service_config()])


def _short_id(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big") >> 1


class _Names:
    """Names both ways; remembers upstream ids (bounded, least recently used out)."""

    def __init__(self, limit: int = MAX_KNOWN_IDS) -> None:
        self._ids: OrderedDict[int, str] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def ours(self, name: sb.Name) -> Name:
        org, ns, app = name.components()
        uid = name.id()
        if not uid or uid == _NO_ID:
            return Name(org, ns, app)
        short = _short_id(uid)
        with self._lock:
            self._ids[short] = uid
            self._ids.move_to_end(short)
            while len(self._ids) > self._limit:
                self._ids.popitem(last=False)
        return Name(org, ns, app, short)

    def theirs(self, name: Name) -> sb.Name:
        if name.id is None:
            return sb.Name(name.org, name.ns, name.app)
        with self._lock:
            uid = self._ids.get(name.id)
        if uid is None:
            raise NoRouteError(name, f"{name}: instance id not known here (upstream ids "
                                     "come from sessions of this process)")
        return sb.Name.new_with_id(name.org, name.ns, name.app, uid)


names = _Names()
# Upstream service names (letters, digits and dashes): one per app or server.
_service_ids = itertools.count(1)


class _LoopThread:
    """A private asyncio loop in a daemon thread: trio callers' UniFFI calls run there."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="slim-upstream-asyncio",
                                 daemon=True).start()
                cls._loop = loop
            return cls._loop


def _native() -> bool:
    """Whether the current event loop is asyncio (UniFFI futures can be awaited directly)."""
    return isinstance(anyio.lowlevel.current_token().native_token, asyncio.AbstractEventLoop)


async def _ffi(native: bool, call: Callable[[], Awaitable[T]]) -> T:
    """Await an async UniFFI call from the current event loop (cancellable)."""
    if native:
        return await call()
    token: Any = anyio.lowlevel.current_token().native_token
    done = anyio.Event()

    async def run() -> T:
        return await call()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except Exception:  # the caller's event loop has ended: nobody waits
            pass

    future = asyncio.run_coroutine_threadsafe(run(), _LoopThread.get())
    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()  # cancels the task on the loop thread, which drops the Rust future
        raise
    return future.result()


def _duration(seconds: float | None) -> datetime.timedelta | None:
    return None if seconds is None else datetime.timedelta(seconds=seconds)


def _visible(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k not in _HIDDEN}


# -- handles ---------------------------------------------------------------------------


class UpstreamHandle(Generic[R]):
    """Completion of an operation, as :class:`slim_agents.Handle`: ``await handle``.

    Awaitable any number of times; :attr:`done` tells without waiting. A handle
    made with ``start`` calls it (once) when first awaited: upstream's completion
    can be waited on only once, so one task of the app waits for everyone.
    """

    __slots__ = ("_done", "_error", "_resolved", "_result", "_start")

    def __init__(self, start: Callable[[UpstreamHandle[R]], None] | None = None) -> None:
        self._start = start
        self._resolved = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = Wakeup()

    @classmethod
    def of(cls, value: R) -> UpstreamHandle[R]:
        handle = cls()
        handle._resolve(value)
        return handle

    @property
    def done(self) -> bool:
        return self._resolved

    def result(self) -> R:
        """The result of a finished operation (raises its error; ``RuntimeError`` if pending)."""
        if not self._resolved:
            raise RuntimeError("the operation has not finished")
        if self._error is not None:
            raise self._error
        result: R = self._result
        return result

    async def wait(self) -> R:
        """Wait for the operation to finish (cancellable; the operation goes on)."""
        if not self._resolved:
            start, self._start = self._start, None
            if start is not None:
                start(self)
            while not self._resolved:
                await self._done.wait()
        else:
            await anyio.lowlevel.checkpoint()
        return self.result()

    def __await__(self) -> Any:
        return self.wait().__await__()

    def _resolve(self, value: Any) -> None:
        if not self._resolved:
            self._resolved, self._result = True, value
            self._done.fire()

    def _fail(self, error: BaseException) -> None:
        if not self._resolved:
            self._resolved, self._error = True, error
            self._done.fire()

    def __repr__(self) -> str:
        state = "pending" if not self._resolved else ("failed" if self._error else "done")
        return f"<UpstreamHandle {state}>"


# -- sessions --------------------------------------------------------------------------


def _config_of(up: sb.Session) -> SessionConfig:
    """Our view of the configuration of a session another app created."""
    c = up.config()
    group = c.session_type == sb.SessionType.GROUP
    timeout = c.interval.total_seconds() if c.interval is not None else None
    retries = c.max_retries
    return SessionConfig(kind=SessionKind.GROUP if group else SessionKind.POINT_TO_POINT,
                         timeout=timeout if timeout and retries is not None else None,
                         max_retries=retries if timeout else None,
                         mls_enabled=c.mls_settings is not None,
                         metadata=_visible(c.metadata))


class UpstreamSession:
    """A session on the upstream network with :class:`slim_agents.Session`'s surface."""

    def __init__(self, app: UpstreamApp, up: sb.Session, config: SessionConfig, *,
                 initiator: bool, destination: Name | None = None) -> None:
        self._app = app
        self._up = up
        self._config = config
        self._initiator = initiator
        self.id: int = up.session_id()
        self.kind = config.kind
        self._group = config.kind is SessionKind.GROUP
        raw_meta = up.metadata()
        self._metadata = MappingProxyType(_visible(raw_meta))
        dest = destination if destination is not None else names.ours(up.destination())
        self._channel = dest.without_id() if self._group else None
        self._peer = None if self._group else dest
        self._moderator: Name | None = app.name if initiator else None
        if not initiator and self._group and raw_meta.get(MODERATOR_KEY):
            try:
                self._moderator = self._parse_upstream(raw_meta[MODERATOR_KEY])
            except (ValueError, *_ERRORS):
                log.debug("session %d: unreadable moderator %r", self.id,
                          raw_meta[MODERATOR_KEY])
        self._roster: list[Name] = [app.name] if initiator else []
        self._roster_wakeup = Wakeup()
        self._closed = anyio.Event()
        self._close_reason: str | None = None
        self._closing = False
        self._someone_left = False
        self._left: deque[Name] = deque(maxlen=64)  # members seen leaving (full names)
        # Bounded: a full inbox stops the pump (upstream then holds the messages).
        self._inbox: deque[Message] = deque()
        self._inbox_wakeup = Wakeup()
        self._room_wakeup = Wakeup()
        self._unreachable: set[Callable[[], None]] = set()
        self._mids = itertools.count(1)
        self._rx_ids = itertools.count(1)
        self.published = 0
        self.received = 0

    @staticmethod
    def _parse_upstream(text: str) -> Name:
        org, ns, app, uid = text.split("/")
        return names.ours(sb.Name.new_with_id(org, ns, app, uid))

    # -- properties ----------------------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        return self._config

    @property
    def src(self) -> Name:
        """This app's full name."""
        return self._app.name

    @property
    def dst(self) -> Name | None:
        """The peer's full name (point-to-point) or the channel (group)."""
        return self._channel if self._group else self._peer

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._metadata

    @property
    def participants(self) -> list[Name]:
        """Every member, this app included (the moderator first); read from upstream."""
        return list(self._refresh_roster())

    @property
    def moderator(self) -> Name | None:
        return self._moderator

    @property
    def is_moderator(self) -> bool:
        return self._moderator == self._app.name

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def encryption(self) -> None:
        """None: upstream keeps its MLS state to itself."""
        return None

    @property
    def upstream(self) -> sb.Session:
        """The ``slim_bindings.Session`` underneath."""
        return self._up

    # -- sending -------------------------------------------------------------------------

    async def publish(self, payload: bytes, *, payload_type: str | None = None,
                      metadata: Mapping[str, str] | None = None
                      ) -> UpstreamHandle[DeliveryReport]:
        """Send to the peer, or to every other member of a group (see :meth:`Session.publish`).

        :raises SessionClosedError: if the session is closed.
        """
        return await self._publish(payload, payload_type, metadata, None)

    async def publish_to(self, target: MessageContext | Name, payload: bytes, *,
                         payload_type: str | None = None,
                         metadata: Mapping[str, str] | None = None
                         ) -> UpstreamHandle[DeliveryReport]:
        """Send to one member (a reply to a received message's source, or a name).

        In a point-to-point session this is :meth:`publish`.
        """
        return await self._publish(payload, payload_type, metadata, target)

    def _recipients(self, to: Name | None) -> tuple[Name, ...]:
        if to is not None:
            return (to,)
        if not self._group:
            return (self._peer,) if self._peer is not None and self._peer.id is not None else ()
        me = self._app.name
        return tuple(n for n in self._roster if n != me)

    async def _publish(self, payload: bytes, payload_type: str | None,
                       metadata: Mapping[str, str] | None,
                       target: MessageContext | Name | None
                       ) -> UpstreamHandle[DeliveryReport]:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        self._check_open()
        meta = dict(metadata) if metadata else None
        data = bytes(payload)
        app = self._app
        to: Name | None = None
        if target is not None and self._group:
            to = target.source_name if isinstance(target, MessageContext) else target
            if to not in self._roster and to not in self._refresh_roster():
                raise ParticipantError(f"{to} is not another member of this session",
                                       session_id=self.id)
            if to == app.name:
                raise ParticipantError("publish_to names this app itself", session_id=self.id)
            connection = target.input_connection if isinstance(target, MessageContext) else 0
            ctx = sb.MessageContext(source_name=names.theirs(to), destination_name=None,
                                    payload_type="", metadata={},
                                    input_connection=connection, identity="")
            meta = {**(meta or {}), DIRECT_KEY: "1"}
            direct_meta = meta

            def call() -> Awaitable[sb.CompletionHandle]:
                return self._up.publish_to_async(ctx, data, payload_type, direct_meta)
        else:
            plain_meta = meta

            def call() -> Awaitable[sb.CompletionHandle]:
                return self._up.publish_async(data, payload_type, plain_meta)
        recipients = self._recipients(to)
        mid = next(self._mids)
        try:
            completion = await _ffi(app._native, call)
        except _ERRORS as exc:
            raise self._error(exc) from exc
        self.published += 1
        if not self._config.reliable:
            return UpstreamHandle.of(DeliveryReport(mid, recipients, reliable=False))
        if not recipients:
            return UpstreamHandle.of(DeliveryReport(mid, (), reliable=True))

        def start(handle: UpstreamHandle[DeliveryReport]) -> None:
            app._spawn(self._settle, handle, completion, mid, recipients)

        return UpstreamHandle(start)

    async def _settle(self, handle: UpstreamHandle[DeliveryReport],
                      completion: sb.CompletionHandle, mid: int,
                      recipients: tuple[Name, ...]) -> None:
        try:
            await _ffi(self._app._native, completion.wait_async)
        except _ERRORS as exc:
            mapped = self._error(exc)
            if isinstance(mapped, SessionClosedError):
                handle._fail(mapped)
                return
            why = _text(exc).splitlines()[0]
            report = DeliveryReport(mid, (), {n: why for n in recipients}, True)
            timed_out = isinstance(mapped, SessionTimeoutError)
            handle._fail(DeliveryTimeoutError(report) if timed_out else DeliveryError(report))
        else:
            handle._resolve(DeliveryReport(mid, recipients, reliable=True))
        finally:
            handle._fail(SessionClosedError(self.id, self._close_reason or "app closed"))

    # -- receiving -----------------------------------------------------------------------

    async def get_message(self) -> Message:
        """The next message (bound the wait with a cancel scope).

        :raises SessionClosedError: once the session is closed and no message is left.
        """
        inbox = self._inbox
        while not inbox:
            self._check_open()
            await self._inbox_wakeup.wait()
        msg = inbox.popleft()
        if self._room_wakeup.waiting and len(inbox) <= self._config.max_inbox // 2:
            self._room_wakeup.fire()
        return msg

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.get_message()
            except SessionClosedError:
                return

    async def _pump(self) -> None:
        """Move upstream's messages into the bounded inbox until the session closes."""
        app = self._app
        up = self._up
        reason = "app closed"
        try:
            while True:
                try:
                    rm = await _ffi(app._native, lambda: up.get_message_async(None))
                except _ERRORS as exc:
                    text = _text(exc)
                    if "participant disconnected" in text:
                        # A member left (or the peer: the next call says closed).
                        self._someone_left = True
                        try:
                            self._left.append(self._parse_upstream(text.rsplit(" ", 1)[-1]))
                        except (ValueError, *_ERRORS):
                            pass
                        self._refresh_roster()
                        continue
                    reason = self._reason(exc)
                    return
                ctx = rm.context
                if ctx.payload_type == ROSTER_TYPE:
                    self._refresh_roster()
                    continue
                try:
                    source = names.ours(ctx.source_name)
                except ValueError:  # a name slim-agents cannot represent ("/" inside, ...)
                    log.warning("session %d: dropped a message from %s", self.id,
                                ctx.source_name)
                    continue
                if source not in self._roster:
                    self._refresh_roster()
                meta = ctx.metadata
                direct = DIRECT_KEY in meta
                dest = self._channel if self._group else app.name
                msg = Message(MessageContext(
                    source_name=source, destination_name=dest,
                    payload_type=ctx.payload_type, metadata=_visible(meta),
                    session_id=self.id, message_id=next(self._rx_ids),
                    identity=ctx.identity, input_connection=ctx.input_connection,
                    direct=direct), rm.payload)
                self.received += 1
                while len(self._inbox) >= self._config.max_inbox:
                    await self._room_wakeup.wait()
                self._inbox.append(msg)
                self._inbox_wakeup.fire()
        finally:
            self._finish(reason)

    def _reason(self, exc: BaseException) -> str:
        if self._closing:
            return "closed"
        if not self._group:
            return "closed by peer"
        if not self._initiator:
            return "closed by moderator"
        # Upstream ends a group when its last member leaves.
        return "last member left" if self._someone_left else f"upstream: {_text(exc)}"

    # -- membership ----------------------------------------------------------------------

    def _refresh_roster(self) -> list[Name]:
        """Read the members from upstream; wake roster watchers on a change."""
        if self._closed.is_set():
            return self._roster
        try:
            infos = self._up.participants_list()
        except _ERRORS:
            return self._roster
        me = self._app.name
        now = []
        for info in infos:
            try:
                now.append(names.ours(info.name))
            except ValueError:
                log.debug("session %d: unrepresentable member %s", self.id, info.name)
        if me not in now:
            now.append(me)
        if not self._group:
            peers = [n for n in now if n != me]
            if peers:
                self._peer = peers[0]
                if not self._initiator:
                    self._moderator = peers[0]
        kept = [n for n in self._roster if n in now]
        roster = kept + [n for n in now if n not in kept]
        mod = self._moderator
        if mod is not None and mod in roster:
            roster.remove(mod)
            roster.insert(0, mod)
        if roster != self._roster:
            self._roster = roster
            self._roster_wakeup.fire()
        return roster

    def _notify_roster(self) -> None:
        """Tell slim-agents members that the roster changed (they read it from upstream)."""
        self._app._spawn(self._send_notice)

    async def _send_notice(self) -> None:
        try:
            await _ffi(self._app._native,
                       lambda: self._up.publish_async(b"", ROSTER_TYPE, None))
        except _ERRORS:
            pass  # closed meanwhile: nobody to tell

    def _check_moderator(self) -> None:
        self._check_open()
        if not self._group or not self.is_moderator:
            raise NotModeratorError("only the moderator of a group may change its members",
                                    session_id=self.id)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise SessionClosedError(self.id, self._close_reason or "closed")

    def start_invite(self, name: Name | str) -> UpstreamHandle[Name]:
        """Begin adding a participant; the handle completes as :meth:`invite` returns."""
        return self._app._run_handle(self.invite(name))

    def start_remove(self, name: Name | str) -> UpstreamHandle[None]:
        """Begin removing a participant; the handle completes once it has left."""
        return self._app._run_handle(self.remove(name))

    def start_close(self) -> UpstreamHandle[None]:
        """Begin closing; the handle completes once the others were told."""
        return self._app._run_handle(self.close())

    async def invite(self, name: Name | str) -> Name:
        """Add a participant (moderator only); returns its full name once every member has it.

        :raises NotModeratorError, ParticipantError, UnreachableError: when it cannot.
        """
        target = Name.parse(name) if isinstance(name, str) else name
        self._check_moderator()
        if target.same_service(self._app.name) and target.id in (None, self._app.name.id):
            raise ParticipantError("an app cannot invite itself", session_id=self.id)
        before = set(self._refresh_roster())
        if target in before:
            raise ParticipantError(f"{target} is already a member", session_id=self.id)
        up_target = names.theirs(target)
        app = self._app
        try:
            completion = await _ffi(app._native, lambda: self._up.invite_async(up_target))
            await _ffi(app._native, completion.wait_async)
        except _ERRORS as exc:
            raise self._error(exc, destination=target) from exc
        roster = self._refresh_roster()
        self._notify_roster()
        added = [n for n in roster if n not in before and n.same_service(target)
                 and (target.id is None or n == target)]
        if added:
            return added[0]
        # Gone again already (it declined, say): its full name, if it was seen leaving.
        known = [n for n in (*roster, *reversed(self._left)) if n.same_service(target)
                 and (target.id is None or n == target)]
        return known[0] if known else target

    async def remove(self, name: Name | str) -> None:
        """Remove a participant (moderator only); returns once it has left.

        :raises ParticipantError: when it is not a member.
        """
        target = Name.parse(name) if isinstance(name, str) else name
        self._check_moderator()
        roster = self._refresh_roster()
        matches = [n for n in roster if n == target
                   or (target.id is None and n.same_service(target))]
        if not matches or matches[0] == self._app.name:
            raise ParticipantError(f"{target} is not another member of this group",
                                   session_id=self.id)
        up_target = names.theirs(matches[0])
        app = self._app
        try:
            completion = await _ffi(app._native, lambda: self._up.remove_async(up_target))
            await _ffi(app._native, completion.wait_async)
        except _ERRORS as exc:
            raise self._error(exc, destination=target) from exc
        self._refresh_roster()
        self._notify_roster()

    async def close(self) -> None:
        """Close the session; members (or the peer) are told. Closing twice is harmless."""
        if self._closed.is_set() or self._closing:
            await self._closed.wait()
            return
        self._closing = True
        await self._leave()

    async def _leave(self) -> None:
        app = self._app
        try:
            with anyio.move_on_after(CLOSE_GRACE, shield=True):
                completion = await _ffi(app._native, self._up.close_async)
                await _ffi(app._native, completion.wait_async)
        except _ERRORS:
            pass  # already gone upstream
        self._finish("closed")

    async def rotate_keys(self, *, suspect: bool = False) -> None:
        """Not available: upstream renews its MLS keys itself."""
        await anyio.lowlevel.checkpoint()
        raise SessionError("upstream SLIM renews MLS keys itself (no rotate_keys)",
                           session_id=self.id)

    async def wait_closed(self) -> str:
        """Wait until the session is closed (by anyone); returns the reason."""
        await self._closed.wait()
        return self._close_reason or "closed"

    async def wait_participants(self, count: int) -> list[Name]:
        """Wait until the roster has at least ``count`` members."""
        while len(self._refresh_roster()) < count:
            self._check_open()
            await self._roster_wakeup.wait()
        return list(self._roster)

    async def watch_roster(self) -> AsyncIterator[tuple[list[Name], list[Name]]]:
        """Yield ``(added, removed)`` each time the roster changes, until the session closes."""
        seen = list(self._roster)
        while not self._closed.is_set():
            await self._roster_wakeup.wait()
            now = list(self._roster)
            added = [n for n in now if n not in seen]
            removed = [n for n in seen if n not in now]
            seen = now
            if added or removed:
                yield added, removed

    def on_unreachable(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Accepted for compatibility: upstream gives no such signal, so it never runs."""
        self._unreachable.add(callback)
        return lambda: self._unreachable.discard(callback)

    # -- state ---------------------------------------------------------------------------

    def _error(self, exc: BaseException, destination: object = None) -> SlimError:
        mapped = _session_error(exc, session_id=self.id, destination=destination)
        if isinstance(mapped, SessionClosedError):
            return SessionClosedError(self.id, self._close_reason or "closed")
        return mapped

    def _finish(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_reason = self._close_reason or reason
        self._closed.set()
        self._inbox_wakeup.fire()
        self._roster_wakeup.fire()
        self._app._forget(self)

    def statistics(self) -> dict[str, Any]:
        return {"id": self.id, "state": "closed" if self.is_closed else "established",
                "members": len(self._roster), "published": self.published,
                "received": self.received,
                "inbox": len(self._inbox),
                "dropped": 0, "retransmissions": 0, "acks_pending": 0,
                "duplicates": 0}

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<UpstreamSession {self.id} {self.kind.value} {state} dst={self.dst}>"


async def _close_quietly(up: sb.Session, native: bool) -> None:
    with anyio.move_on_after(CLOSE_GRACE):
        try:
            completion = await _ffi(native, up.close_async)
            await _ffi(native, completion.wait_async)
        except _ERRORS:
            pass


# -- apps ------------------------------------------------------------------------------


class UpstreamApp:
    """An app on the upstream network with :class:`slim_agents.App`'s surface.

    Use :func:`slim_agents.open_app` with a ``slim://`` node URL.
    """

    def __init__(self, name: Name, service: sb.Service, up: sb.App, connection: int, *,
                 endpoint: str, native: bool, invite_policy: InvitePolicy | None) -> None:
        self.name = name
        self.endpoint = endpoint
        self.service = service
        self.upstream = up
        self.connection = connection
        self._native = native
        self._invite_policy = invite_policy
        self._tg: TaskGroup | None = None
        self._sessions: dict[int, UpstreamSession] = {}
        self._joined_send, self._joined = anyio.create_memory_object_stream[UpstreamSession](
            MAX_LISTEN_QUEUE)
        self._card: bytes | None = None
        self._closing = False
        self.connects = 1

    @property
    def id(self) -> int:
        assert self.name.id is not None
        return self.name.id

    @property
    def id_str(self) -> str:
        return str(self.name)

    @property
    def upstream_id(self) -> str:
        """The instance id as upstream prints it (a UUID)."""
        return self.upstream.id()

    @property
    def connected(self) -> bool:
        return not self._closing

    @property
    def card(self) -> bytes | None:
        """The card given to :meth:`announce` (kept here: upstream has no directory)."""
        return self._card

    # -- running -------------------------------------------------------------------------

    async def _run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._accept)
            task_status.started()

    def _spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        if self._tg is None or self._closing:
            raise SessionClosedError(None, "app closed")
        self._tg.start_soon(func, *args)

    def _run_handle(self, op: Awaitable[T]) -> UpstreamHandle[T]:
        handle: UpstreamHandle[T] = UpstreamHandle()

        async def drive() -> None:
            try:
                handle._resolve(await op)
            except SlimError as exc:
                handle._fail(exc)
            finally:
                handle._fail(SessionClosedError(None, "app closed"))

        try:
            self._spawn(drive)
        except SessionClosedError:
            if isinstance(op, Coroutine):
                op.close()
            raise
        return handle

    def _forget(self, session: UpstreamSession) -> None:
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def _adopt(self, session: UpstreamSession) -> None:
        self._sessions[session.id] = session
        self._spawn(session._pump)

    async def _accept(self) -> None:
        """Take the sessions others create with this app (upstream has joined them already)."""
        while True:
            try:
                up = await _ffi(self._native,
                                lambda: self.upstream.listen_for_session_async(None))
            except _ERRORS as exc:
                if not self._closing:
                    log.warning("%s: upstream stopped announcing sessions: %s", self.name,
                                _text(exc))
                return
            try:
                session = UpstreamSession(self, up, _config_of(up), initiator=False)
            except (ValueError, *_ERRORS) as exc:  # a name or setting we cannot represent
                log.warning("%s: refused a session: %s", self.name, _text(exc))
                self._spawn(_close_quietly, up, self._native)
                continue
            self._adopt(session)
            session._refresh_roster()
            verdict = self._decide(session)
            if verdict is not True:
                log.info("%s: leaving session %d (%s)", self.name, session.id, verdict)
                session._close_reason = f"declined ({verdict})"
                session._closing = True  # not listed from now on
                self._spawn(session._leave)
                continue
            try:
                self._joined_send.send_nowait(session)
            except anyio.WouldBlock:
                log.warning("%s: listen queue full; leaving session %d", self.name, session.id)
                self._spawn(session.close)

    def _decide(self, session: UpstreamSession) -> bool | str:
        policy = self._invite_policy
        if policy is None:
            return True
        info = JoinInfo(moderator=session.moderator or session.dst or self.name,
                        moderator_subject="", session_id=session.id, kind=session.kind,
                        channel=session.dst if session.kind is SessionKind.GROUP else None,
                        metadata=dict(session.metadata),
                        mls_enabled=session.config.mls_enabled)
        try:
            verdict = policy(info)
        except Exception as exc:
            log.exception("%s: the invite policy failed", self.name)
            return f"policy failed: {exc}"
        return verdict if isinstance(verdict, str) else bool(verdict) or "declined"

    # -- sessions ------------------------------------------------------------------------

    async def create_session(self, destination: Name | str,
                             config: SessionConfig | None = None) -> UpstreamSession:
        """Create a session and wait until it is established.

        :raises UnreachableError: when nobody answers (upstream cannot tell "no route").
        """
        session, handle = await self.start_session(destination, config)
        await handle
        return session

    async def start_session(self, destination: Name | str, config: SessionConfig | None = None
                            ) -> tuple[UpstreamSession, UpstreamHandle[UpstreamSession]]:
        """Create a session; return it at once with a handle that completes when established."""
        dest = Name.parse(destination) if isinstance(destination, str) else destination
        config = config or SessionConfig()
        group = config.kind is SessionKind.GROUP
        if group and dest.id is not None:
            raise ConfigError("a group channel is a name without an instance id")
        metadata = dict(config.metadata)
        if group:
            metadata[MODERATOR_KEY] = f"{self.name.org}/{self.name.ns}/{self.name.app}/" \
                                      f"{self.upstream_id}"
        mls = sb.MlsSettings(header_integrity_validation_percent=100,
                             max_seen_control_message_ids_size=None) \
            if config.mls_enabled else None
        up_config = sb.SessionConfig(
            session_type=sb.SessionType.GROUP if group else sb.SessionType.POINT_TO_POINT,
            max_retries=config.max_retries if config.reliable else None,
            interval=_duration(config.timeout) if config.reliable else None,
            metadata=metadata, mls_settings=mls)
        up_dest = names.theirs(dest)
        try:
            made = await _ffi(self._native,
                              lambda: self.upstream.create_session_async(up_config, up_dest))
        except _ERRORS as exc:
            raise _session_error(exc, session_id=None, destination=dest) from exc
        session = UpstreamSession(self, made.session, config, initiator=True, destination=dest)
        self._adopt(session)
        handle: UpstreamHandle[UpstreamSession] = UpstreamHandle()
        self._spawn(self._establish, session, made.completion, handle, dest)
        return session, handle

    async def _establish(self, session: UpstreamSession, completion: sb.CompletionHandle,
                         handle: UpstreamHandle[UpstreamSession], dest: Name) -> None:
        try:
            await _ffi(self._native, completion.wait_async)
        except _ERRORS as exc:
            handle._fail(_session_error(exc, session_id=session.id, destination=dest))
            session._finish("handshake failed")
        else:
            session._refresh_roster()
            handle._resolve(session)
        finally:
            handle._fail(SessionClosedError(session.id, "app closed"))

    async def listen_for_session(self) -> UpstreamSession:
        """Wait for a session another app created with this one (bound it with a cancel scope)."""
        return await self._joined.receive()

    async def delete_session(self, session: UpstreamSession) -> None:
        """Close a session (see :meth:`UpstreamSession.close`)."""
        await session.close()

    @property
    def sessions(self) -> list[UpstreamSession]:
        return [s for s in self._sessions.values() if not s.is_closed and not s._closing]

    # -- routing -------------------------------------------------------------------------

    async def subscribe(self, name: Name | str) -> None:
        """Receive messages addressed to ``name`` too."""
        up = names.theirs(Name.parse(name) if isinstance(name, str) else name)
        await _ffi(self._native, lambda: self.upstream.subscribe_async(up, self.connection))

    async def unsubscribe(self, name: Name | str) -> None:
        up = names.theirs(Name.parse(name) if isinstance(name, str) else name)
        await _ffi(self._native, lambda: self.upstream.unsubscribe_async(up, self.connection))

    async def set_route(self, name: Name | str) -> None:
        """Send what is addressed to ``name`` through the node (the default already does)."""
        up = names.theirs(Name.parse(name) if isinstance(name, str) else name)
        await _ffi(self._native, lambda: self.upstream.set_route_async(up, self.connection))

    async def remove_route(self, name: Name | str) -> None:
        up = names.theirs(Name.parse(name) if isinstance(name, str) else name)
        await _ffi(self._native, lambda: self.upstream.remove_route_async(up, self.connection))

    # -- no directory --------------------------------------------------------------------

    async def announce(self, card: bytes) -> None:
        """Keep this app's card here (upstream has no directory to publish it in).

        :raises LimitExceededError: when the card is larger than 64 KiB, as node_lite.
        """
        if len(card) > MAX_CARD_SIZE:
            raise LimitExceededError("card", MAX_CARD_SIZE, len(card))
        self._card = bytes(card)
        await anyio.lowlevel.checkpoint()

    async def lookup(self, prefix: str = "", *, limit: int = 256) -> list[Any]:
        """Not available on upstream SLIM.

        :raises DirectoryUnsupportedError: always.
        """
        await anyio.lowlevel.checkpoint()
        raise DirectoryUnsupportedError(
            "upstream SLIM has no directory: lookup and agent discovery are not available; "
            "address agents by name")

    async def wait_connected(self) -> None:
        """Return at once: upstream keeps (and redials) the connection itself."""
        await anyio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, Any]:
        return {"backend": "upstream", "endpoint": self.endpoint,
                "upstream_id": self.upstream_id, "sessions": len(self.sessions),
                "connects": self.connects, "connected": self.connected,
                "offline_drops": 0, "pending_bytes": 0}

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close every session (telling the others, briefly), then leave the network."""
        if self._closing:
            return
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLOSE_GRACE):
                async with anyio.create_task_group() as tg:
                    for session in self.sessions:
                        tg.start_soon(session.close)
            self._closing = True
            for session in list(self._sessions.values()):
                session._finish("app closed")
            self._joined_send.close()
            self._joined.close()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            try:
                await _ffi(self._native, self.service.shutdown_async)
            except _ERRORS as exc:
                log.debug("%s: upstream shutdown: %s", self.name, _text(exc))

    def __repr__(self) -> str:
        return f"<UpstreamApp {self.name} at {self.endpoint}>"


# -- the backend -----------------------------------------------------------------------


def _endpoint(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not sep or scheme.lower() not in SCHEMES or not colon or not host \
            or not port.isdigit():
        raise ConfigError(f"an upstream node URL has the form slim://host:port, got {url!r}")
    return f"http://{host}:{port}"


class UpstreamBackend:
    """The ``slim_backend`` of ``slim://`` URLs: apps on an upstream SLIM node."""

    schemes = SCHEMES

    def serves(self, url: str) -> bool:
        scheme, sep, _ = url.partition("://")
        return bool(sep) and scheme.lower() in SCHEMES

    @asynccontextmanager
    async def open_app(self, name: Name | str, *, node: str, secret: str | None = None,
                       provider: Any = None, verifier: Any = None, tls: Any = None,
                       limits: Any = None, invite_policy: InvitePolicy | None = None
                       ) -> AsyncIterator[UpstreamApp]:
        """Connect an app to the upstream node at ``node`` for the duration of the block.

        :raises ConfigError: without ``secret``, or with ``tls``.
        :raises ConnectError: when the node cannot be reached.
        """
        base = (Name.parse(name) if isinstance(name, str) else name).without_id()
        endpoint = _endpoint(node)
        if secret is None and isinstance(provider, SharedSecretProvider):
            secret = provider.shared_secret
        if secret is None:
            raise ConfigError("the upstream backend takes a shared secret (secret=...); "
                              "token providers are not mapped to upstream identities")
        if tls is not None and not getattr(tls, "insecure", False):
            raise ConfigError("TLS settings are not supported by the upstream backend "
                              "(plain connections only)")
        _ensure_runtime()
        native = _native()
        service = sb.Service(f"slim-agents-app-{next(_service_ids)}")
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                connection = await _ffi(native, lambda: service.connect_async(
                    sb.new_insecure_client_config(endpoint)))
        except TimeoutError:
            raise ConnectError(f"{node}: no connection within {CONNECT_TIMEOUT:g} s") from None
        except _ERRORS as exc:
            raise ConnectError(f"{node}: {_text(exc).splitlines()[-1].strip(' ->')}") \
                from exc
        try:
            # The async variant needs a Tokio context it does not have (it panics).
            up = service.create_app_with_secret(
                sb.Name(base.org, base.ns, base.app), secret)
            full = up.name()
            await _ffi(native, lambda: up.subscribe_async(full, connection))
            await _ffi(native, lambda: up.set_default_gateway_async(connection))
        except _ERRORS as exc:
            await _ffi(native, service.shutdown_async)
            raise AuthenticationError("the upstream identity was refused",
                                      detail=_text(exc)) from exc
        app = UpstreamApp(names.ours(full), service, up, connection, endpoint=endpoint,
                          native=native, invite_policy=invite_policy)
        with collapse_excgroups():
            async with anyio.create_task_group() as tg:
                await tg.start(app._run)
                try:
                    yield app
                finally:
                    await app.aclose()
                    tg.cancel_scope.cancel()


_backend: UpstreamBackend | None = None


def backend() -> UpstreamBackend:
    """The backend object (one per process)."""
    global _backend
    if _backend is None:
        _backend = UpstreamBackend()
    return _backend


# -- an upstream node in this process ---------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class UpstreamServer:
    """An upstream SLIM node served by this process (its own ``slim_bindings.Service``).

    Upstream cannot tell which port the OS chose, so ``port=0`` picks a free one by
    binding a socket first (and tries again if another process takes it meanwhile).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._service: sb.Service | None = None

    @property
    def url(self) -> str:
        """The node URL apps connect to (``slim://host:port``)."""
        return f"slim://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> UpstreamServer:
        _ensure_runtime()
        service = sb.Service(f"slim-agents-server-{next(_service_ids)}")
        fixed = self.port != 0
        for attempt in range(1 if fixed else BIND_ATTEMPTS):
            port = self.port if fixed else _free_port(self.host)
            try:
                service.run_server(sb.new_insecure_server_config(f"{self.host}:{port}"))
            except _ERRORS as exc:
                if fixed or attempt == BIND_ATTEMPTS - 1:
                    raise ConnectError(f"cannot serve on {self.host}:{port}: "
                                       f"{_text(exc).splitlines()[-1].strip(' ->')}") from exc
                continue
            self.port = port
            self._service = service
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        service, self._service = self._service, None
        if service is not None:
            try:
                service.stop_server(self.endpoint)
            finally:
                service.shutdown()

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@asynccontextmanager
async def open_upstream_server(host: str = "127.0.0.1", port: int = 0
                               ) -> AsyncIterator[UpstreamServer]:
    """Serve an upstream SLIM node from this process for the duration of the block."""
    server = UpstreamServer(host, port).start()
    try:
        yield server
    finally:
        server.stop()
        await anyio.lowlevel.checkpoint()
