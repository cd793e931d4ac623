# Agents: an app with decorated handlers and tools, reachable by name.
#
# A tool call is a JSON request on a reliable point-to-point session to the
# target service (one session per peer, reused), answered on the same
# session and matched by call id. Requests and their replies are matched the
# same way, through message metadata, so a reply never lands in a handler
# or the mailbox by mistake. Handlers run with bounded concurrency in the
# agent's task group; a handler's exception goes back to the caller as an
# error result and is logged.
from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import json
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pluggy
from anyio.abc import TaskGroup

from node_lite import (
    ConfigError,
    LimitExceededError,
    Limits,
    Name,
    Node,
    NodeConfig,
    TlsConfig,
    TokenProvider,
    TokenVerifier,
    open_node,
)
from node_lite._util import Wakeup

from ._app import App, open_app
from ._app_core import JoinInfo
from ._config import SessionConfig
from ._errors import SessionClosedError, SessionError
from ._plugins import plugin_manager
from ._reports import Message, MessageContext
from ._session import Session
from ._tools import Tool, ToolError, tool_from_function

log = logging.getLogger("slim_agents.agent")

CALL = "slim-agents/call"
RESULT = "slim-agents/result"
DESCRIBE = "slim-agents/describe"
ERROR = "slim-agents/error"
CALL_ID = "call-id"
# A message that expects a reply carries REQUEST_ID; the reply carries REPLY_TO.
REQUEST_ID = "request-id"
REPLY_TO = "reply-to"
# Concurrent handler and tool runs per agent.
DEFAULT_CONCURRENCY = 16
# Messages kept for read_mailbox when no on_message handler takes them.
DEFAULT_MAILBOX = 1000
# Sessions agents open to call each other: reliable, so a lost call is retried.
CALL_SESSION = SessionConfig(timeout=1.0, max_retries=10)
GROUP_SESSION = SessionConfig.group(timeout=1.0, max_retries=10)

# Routes of received messages that run on the handler pool (see RunningAgent._route).
_JOBS = ("call", "handler")

# The message a handler or tool is answering (trace context for its reply, say).
_incoming: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "slim_agents_incoming", default=None)


def current_message() -> Message | None:
    """The message the running handler or tool call is answering (None elsewhere)."""
    return _incoming.get()


MessageHandler = Callable[[Message, Session], Awaitable[bytes | str | None]]
InviteHandler = Callable[[JoinInfo], "bool | str | Awaitable[bool | str]"]


@dataclass(frozen=True, slots=True)
class AgentCard:
    """What discovery knows about an agent (see :meth:`RunningAgent.discover`).

    ``node`` is "" for an agent on the same node; agents behind other nodes
    are listed without a card (``known`` is False): :meth:`RunningAgent.describe`
    asks them directly.
    """

    name: Name
    node: str = ""
    description: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    known: bool = False

    def summary(self) -> dict[str, Any]:
        """A compact form for a model: name, description, tool names."""
        d: dict[str, Any] = {"name": str(self.name)}
        if self.known:
            d["description"] = self.description
            d["tools"] = [t.get("name") for t in self.tools]
        if self.node:
            d["node"] = self.node
        return d


@dataclass(frozen=True, slots=True)
class Mail:
    """A message waiting in an agent's mailbox; ``id`` names it for :meth:`RunningAgent.reply`."""

    id: int
    message: Message
    session: Session

    @property
    def expects_reply(self) -> bool:
        return REQUEST_ID in self.message.context.metadata

    def to_dict(self) -> dict[str, Any]:
        """The message as a model reads it."""
        ctx = self.message.context
        d: dict[str, Any] = {"id": self.id, "from": str(ctx.source_name),
                             "text": self.message.payload.decode(errors="replace")}
        if self.session.kind.name == "GROUP" and self.session.dst is not None:
            d["group"] = str(self.session.dst)
        if ctx.payload_type and ctx.payload_type != "msg":
            d["type"] = ctx.payload_type
        if self.expects_reply:
            d["expects_reply"] = True
        return d


class Agent:
    """An agent: a name, tools other agents (and models) can call, and mailbox handlers.

    Decorate functions with :meth:`tool`, :meth:`on_message` and :meth:`on_invite`,
    then run it with :meth:`run` (or :meth:`serve`).
    """

    def __init__(self, name: Name | str, *, description: str = "",
                 concurrency: int = DEFAULT_CONCURRENCY, mailbox: int = DEFAULT_MAILBOX,
                 plugins: pluggy.PluginManager | None = None) -> None:
        self.name = Name.parse(name) if isinstance(name, str) else name
        self.description = description
        self.concurrency = concurrency
        self.mailbox_size = mailbox
        self.plugins = plugins
        self._tools: dict[str, Tool] = {}
        self._on_message: MessageHandler | None = None
        self._on_invite: InviteHandler | None = None
        self._on_start: list[Callable[[RunningAgent], Coroutine[Any, Any, None]]] = []
        #: The running agent while :meth:`run` is active (handlers use it to reach others).
        self.running: RunningAgent | None = None

    # -- decorators ---------------------------------------------------------------------

    def tool(self, func: Callable[..., Any] | None = None, *, name: str | None = None,
             description: str | None = None) -> Any:
        """Offer a typed function as a tool (bare decorator or with arguments)."""
        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            t = f if isinstance(f, Tool) else tool_from_function(f, name=name,
                                                                 description=description)
            self.add_tool(t)
            return f

        return register(func) if func is not None else register

    def add_tool(self, t: Tool) -> None:
        if t.name in self._tools:
            raise ConfigError(f"agent {self.name} already has a tool named {t.name!r}")
        self._tools[t.name] = t

    def on_message(self, func: MessageHandler) -> MessageHandler:
        """Handle messages that are not tool calls.

        The handler gets the message and its session; bytes or a string it
        returns go back to the sender (as the reply when the sender waits for
        one). Without a handler, messages wait in the mailbox (see
        :meth:`RunningAgent.read_mailbox`).
        """
        self._on_message = func
        return func

    def on_start(self, func: Callable[[RunningAgent], Coroutine[Any, Any, None]]
                 ) -> Callable[[RunningAgent], Coroutine[Any, Any, None]]:
        """Run ``func(running_agent)`` as a task once the agent is connected (a loop that
        reads the mailbox, say); it is cancelled when the agent stops."""
        self._on_start.append(func)
        return func

    def on_invite(self, func: InviteHandler) -> InviteHandler:
        """Decide on invitations: return True to accept, False or a reason to decline."""
        self._on_invite = func
        return func

    @property
    def tools(self) -> list[Tool]:
        return list(self._tools.values())

    def card(self) -> dict[str, Any]:
        """What this agent tells others about itself."""
        return {"agent": str(self.name), "description": self.description,
                "tools": [t.to_dict() for t in self.tools]}

    # -- running ------------------------------------------------------------------------

    @asynccontextmanager
    async def run(self, node: Node | str | None = None, *, secret: str | None = None,
                  provider: TokenProvider | None = None, verifier: TokenVerifier | None = None,
                  tls: TlsConfig | None = None, limits: Limits | None = None
                  ) -> AsyncIterator[RunningAgent]:
        """Connect the agent and serve it for the duration of the block.

        :param node: a node of this process, a node URL, or None to start an
            embedded node (handy in notebooks and scripts).
        :param secret: shared secret of the deployment (or ``provider``/``verifier``).
        """
        pm = self.plugins or plugin_manager()
        for extra in pm.hook.slim_tools(agent=self):
            for t in extra or ():
                if t.name not in self._tools:
                    self.add_tool(t)
        async with AsyncExitStack() as stack:
            if node is None:
                node = await stack.enter_async_context(open_node(NodeConfig()))
            if secret is None and provider is None:
                secret = "slim-agents-development-secret-not-for-production"
            running = RunningAgent(self, pm)
            app = await stack.enter_async_context(open_app(
                self.name, node=node, secret=secret, provider=provider, verifier=verifier,
                tls=tls, limits=limits, invite_policy=running._invite_policy,
                instrument=None))  # agents are traced through their hooks
            running._app = app
            await running._announce()
            async with anyio.create_task_group() as tg:
                running._tg = tg
                tg.start_soon(running._accept_sessions)
                for start in self._on_start:
                    tg.start_soon(start, running)
                self.running = running
                try:
                    yield running
                finally:
                    self.running = None
                    tg.cancel_scope.cancel()

    async def serve(self, node: Node | str | None = None, **kwargs: Any) -> None:
        """Run the agent until cancelled (``anyio.run(agent.serve)`` in a script)."""
        async with self.run(node, **kwargs):
            await anyio.sleep_forever()


class _Handlers:
    """Runs handler and tool calls on up to ``size`` long-lived tasks, started as
    needed: handing a call to an idle task costs a fraction of starting one per call.

    At most ``backlog`` calls wait for a free task; past that the sessions stop
    being read (see :attr:`full`), so nothing is dropped and memory stays bounded.
    """

    __slots__ = ("_idle", "_room", "backlog", "jobs", "size", "workers")

    def __init__(self, size: int, backlog: int) -> None:
        if size < 1:
            raise ValueError(f"concurrency must be at least 1, not {size}")
        self.size = size
        self.backlog = max(backlog, 1)
        self.jobs: deque[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]] = deque()
        self.workers = 0
        self._idle: list[anyio.Event] = []
        self._room = Wakeup()

    @property
    def full(self) -> bool:
        return len(self.jobs) >= self.backlog

    async def wait_room(self) -> None:
        while self.full:
            await self._room.wait()

    def submit(self, tg: TaskGroup, func: Callable[..., Awaitable[None]], *args: Any) -> None:
        self.jobs.append((func, args))
        if self._idle:
            self._idle.pop().set()  # the most recently idle task: its stack is warm
        elif self.workers < self.size:
            self.workers += 1
            tg.start_soon(self._work)

    async def _work(self) -> None:
        jobs = self.jobs
        try:
            while True:
                if not jobs:
                    idle = anyio.Event()
                    self._idle.append(idle)
                    try:
                        await idle.wait()
                    finally:
                        if not idle.is_set():  # cancelled while idle
                            self._idle.remove(idle)
                    continue
                func, args = jobs.popleft()
                if self._room.waiting:
                    self._room.fire()
                token = _incoming.set(None)
                try:
                    await func(*args)
                finally:
                    _incoming.reset(token)
        finally:
            self.workers -= 1


class _Waiter:
    __slots__ = ("closed", "event", "got", "want")

    def __init__(self, want: int) -> None:
        self.event = anyio.Event()
        self.got: list[Message] = []
        self.want = want
        self.closed: str | None = None  # why the session ended before the answers came


class RunningAgent:
    """A connected agent: serves its tools and handlers, and calls other agents."""

    def __init__(self, agent: Agent, pm: pluggy.PluginManager) -> None:
        self.agent = agent
        self.plugins = pm
        self._app: App | None = None
        self._tg: TaskGroup | None = None
        self._handlers = _Handlers(agent.concurrency, agent.mailbox_size)
        self._peers: dict[Name, Session] = {}
        self._peer_locks: dict[Name, anyio.Lock] = {}
        self._groups: dict[Name, Session] = {}
        self._waiters: dict[str, _Waiter] = {}
        # Waiters by the session their answers come on: they fail when it closes.
        self._session_waiters: dict[Session, set[str]] = {}
        self._ids = itertools.count(1)
        self._mail_ids = itertools.count(1)
        # Bounded: when full, the sessions stop being read (backpressure), nothing is dropped.
        self._mailbox: deque[Mail] = deque()
        self._room_wakeup = Wakeup()
        # Recent mail by id, so that a model can reply after reading it.
        self._recent: OrderedDict[int, Mail] = OrderedDict()
        self._mail_wakeup = Wakeup()
        self.handled = 0
        self.failures = 0

    @property
    def app(self) -> App:
        assert self._app is not None, "the agent is not running"
        return self._app

    @property
    def name(self) -> Name:
        return self.app.name

    @functools.cached_property
    def _call_prefix(self) -> str:
        return f"{self.name}#"  # call ids: this prefix and a counter

    # -- serving ------------------------------------------------------------------------

    async def _announce(self) -> None:
        card = self.agent.card()
        card["agent"] = str(self.name)
        data = json.dumps(card).encode()
        try:
            await self.app.announce(data)
        except LimitExceededError:
            # Too many or too large schemas: announce the names; describe() has the rest.
            card["tools"] = [{"name": t["name"], "description": t["description"][:200]}
                             for t in card["tools"]]
            await self.app.announce(json.dumps(card).encode()[:60_000])

    def _invite_policy(self, info: JoinInfo) -> bool | str:
        verdict = self.plugins.hook.slim_invite_policy(agent=self.agent, info=info)
        if verdict is not None:
            return verdict if isinstance(verdict, str) else bool(verdict)
        handler = self.agent._on_invite
        if handler is None:
            return True
        result = handler(info)
        if inspect.isawaitable(result):
            raise ConfigError("on_invite handlers are synchronous (they decide at once)")
        return result if isinstance(result, str) else bool(result)

    async def _accept_sessions(self) -> None:
        assert self._tg is not None
        while True:
            session = await self.app.listen_for_session()
            if session.kind.name == "GROUP" and session.dst is not None:
                self._groups[session.dst] = session
            self._tg.start_soon(self._serve_session, session)

    def _notify(self, session: Session, event: str) -> None:
        try:
            self.plugins.hook.slim_session_event(agent=self.agent, session=session, event=event)
        except Exception:
            log.exception("%s: a slim_session_event hook failed", self.agent.name)

    async def _watch_roster(self, session: Session) -> None:
        async for added, removed in session.watch_roster():
            try:
                self.plugins.hook.slim_membership_event(agent=self.agent, session=session,
                                                        added=added, removed=removed)
            except Exception:
                log.exception("%s: a slim_membership_event hook failed", self.agent.name)

    async def _serve_session(self, session: Session) -> None:
        assert self._tg is not None
        self._notify(session, "established")
        try:
            async with anyio.create_task_group() as watch:
                if session.kind.name == "GROUP":
                    watch.start_soon(self._watch_roster, session)
                await self._receive_loop(session)
                watch.cancel_scope.cancel()
        finally:
            if session.dst is not None and self._groups.get(session.dst) is session:
                del self._groups[session.dst]
            self._fail_waiters(session, session.close_reason or "closed")
            self._session_waiters.pop(session, None)
            self._notify(session, "closed")

    async def _receive_loop(self, session: Session) -> None:
        assert self._tg is not None
        session._on_inbox = functools.partial(self._take_at_once, session)
        try:
            while True:
                try:
                    msg = await session.get_message()
                except SessionClosedError:
                    return
                except SessionError as exc:  # a lost or undecryptable message
                    log.warning("%s: %s", self.agent.name, exc)
                    continue
                route = self._route(msg)
                if route in _JOBS:
                    await self._handlers.wait_room()
                mail = self._dispatch(session, msg, route)
                if mail is not None:
                    # Straight into the mailbox, in arrival order; wait while it is full.
                    while len(self._mailbox) >= self.agent.mailbox_size:
                        if not self._room_wakeup.waiting:
                            log.warning("%s: the mailbox is full (%d); reading pauses until "
                                        "read_mailbox or wait_mailbox takes some",
                                        self.agent.name, self.agent.mailbox_size)
                        await self._room_wakeup.wait()
                    self._post(Mail(next(self._mail_ids), mail, session))
        finally:
            session._on_inbox = None

    def _take_at_once(self, session: Session) -> None:
        # Runs in the app's read loop as messages arrive: results wake their callers
        # and calls start without a task switch through the receive loop.
        try:
            session._drain(functools.partial(self._consume, session))
        except Exception:
            log.exception("%s: dispatching a message failed", self.agent.name)

    def _consume(self, session: Session, msg: Message) -> bool:
        route = self._route(msg)
        if route == "mail":
            if len(self._mailbox) >= self.agent.mailbox_size:
                return False  # the receive loop waits for room
        elif route in _JOBS and self._handlers.full:
            return False
        mail = self._dispatch(session, msg, route)
        if mail is not None:
            self._post(Mail(next(self._mail_ids), mail, session))
        return True

    def _route(self, msg: Message) -> str:
        """Where ``msg`` goes: an answer to a waiter ("result", "reply"), a tool call
        or the message handler (the jobs), or the mailbox ("mail")."""
        ctx = msg.context
        pt = ctx.payload_type
        if pt == RESULT:
            return "result"
        if REPLY_TO in ctx.metadata:
            return "reply"
        if pt in (CALL, DESCRIBE):
            return "call"
        return "mail" if self.agent._on_message is None else "handler"

    def _dispatch(self, session: Session, msg: Message, route: str) -> Message | None:
        """Route a received message (``route`` is ``_route(msg)``); a message
        returned belongs in the mailbox."""
        assert self._tg is not None
        after = self.plugins.hook.slim_after_receive
        if after.get_hookimpls():
            for replaced in after(agent=self.agent, session=session, message=msg):
                if replaced is not None:
                    msg = replaced
                    route = self._route(msg)
        meta = msg.context.metadata
        if route == "result":
            self._deliver(meta.get(CALL_ID, ""), msg)
        elif route == "reply":
            self._deliver(meta[REPLY_TO], msg)
        elif route == "call":
            self._handlers.submit(self._tg, self._run_call, session, msg)
        elif route == "mail":
            return msg
        else:
            self._handlers.submit(self._tg, self._run_message, session, msg)
        return None

    async def _run_call(self, session: Session, msg: Message) -> None:
        _incoming.set(msg)  # seen by hooks and the tool; the worker resets it
        call_id = msg.context.metadata.get(CALL_ID, "")
        try:
            if msg.context.payload_type == DESCRIBE:
                result: Any = self.agent.card()
                result["agent"] = str(self.name)
            else:
                request = _loads(msg.payload)
                name = request.get("tool") if isinstance(request, dict) else None
                t = self.agent._tools.get(name) if isinstance(name, str) else None
                if t is None:
                    raise ToolError(f"{self.name} has no tool {name!r}", code="not_found",
                                    tool=str(name))
                result = await t(request.get("args") or {})
            body = {"ok": True, "result": result}
            self.handled += 1
        except ToolError as exc:
            body = {"ok": False, **exc.to_result()}
            self.failures += 1
        except ValueError as exc:  # bad JSON from the caller
            body = {"ok": False, **ToolError(f"bad request: {exc}",
                                             code="bad_request").to_result()}
            self.failures += 1
        except Exception as exc:
            log.exception("%s: tool call failed", self.agent.name)
            body = {"ok": False, **ToolError(f"{type(exc).__name__}: {exc}",
                                             code="failed").to_result()}
            self.failures += 1
        try:
            data = _dumps(body).encode()
        except (TypeError, ValueError) as exc:
            data = json.dumps({"ok": False, **ToolError(
                f"the result is not JSON: {exc}", code="bad_result").to_result()}).encode()
        try:
            await self._send(session, data, payload_type=RESULT, metadata={CALL_ID: call_id},
                             to=msg.context)
        except SessionClosedError:
            pass

    async def _run_message(self, session: Session, msg: Message) -> None:
        _incoming.set(msg)
        handler = self.agent._on_message
        if handler is None:
            self._post(Mail(next(self._mail_ids), msg, session))
            return
        try:
            reply = await handler(msg, session)
            self.handled += 1
        except Exception as exc:
            log.exception("%s: message handler failed", self.agent.name)
            self.failures += 1
            reply = json.dumps(ToolError(f"{type(exc).__name__}: {exc}",
                                         code="handler_failed").to_result())
            payload_type: str | None = ERROR
        else:
            payload_type = None
        if reply is not None:
            data = reply.encode() if isinstance(reply, str) else reply
            meta = {}
            if REQUEST_ID in msg.context.metadata:
                meta[REPLY_TO] = msg.context.metadata[REQUEST_ID]
            try:
                await self._send(session, data, payload_type=payload_type, metadata=meta,
                                 to=msg.context)
            except SessionClosedError:
                pass

    def _post(self, mail: Mail) -> None:
        self._mailbox.append(mail)
        self._recent[mail.id] = mail
        while len(self._recent) > self.agent.mailbox_size:
            self._recent.popitem(last=False)
        self._mail_wakeup.fire()

    def _deliver(self, key: str, msg: Message) -> None:
        waiter = self._waiters.get(key)
        if waiter is None:
            log.debug("%s: a late reply (%s) is dropped", self.agent.name, key)
            return
        waiter.got.append(msg)
        if len(waiter.got) >= waiter.want:
            waiter.event.set()

    async def _send(self, session: Session, payload: bytes, *, payload_type: str | None = None,
                    metadata: dict[str, str] | None = None,
                    to: MessageContext | Name | None = None) -> None:
        hook = self.plugins.hook.slim_before_send
        impls = hook.get_hookimpls()
        meta = metadata
        if impls:
            meta = dict(metadata or {})  # plugins may add to it
            # Each plugin sees the payload the previous one produced.
            args: dict[str, Any] = {"agent": self.agent, "session": session,
                                    "payload": payload, "metadata": meta}
            for impl in reversed(impls):
                replaced = impl.function(**{k: args[k] for k in impl.argnames})
                if replaced is not None:
                    if not isinstance(replaced, bytes):
                        raise TypeError(f"slim_before_send of {impl.plugin_name} returned "
                                        f"{type(replaced).__name__}, not bytes")
                    payload = replaced
                    args["payload"] = replaced
        if to is None:
            await session.publish(payload, payload_type=payload_type, metadata=meta or None)
        else:
            await session.publish_to(to, payload, payload_type=payload_type,
                                     metadata=meta or None)

    # -- point to point -----------------------------------------------------------------

    async def session_with(self, target: Name | str) -> Session:
        """The (reused) reliable point-to-point session to ``target``."""
        name = _parse_name(target) if isinstance(target, str) else target
        session = self._peers.get(name)
        if session is not None and not session.is_closed:
            return session  # the common case: no lock, no checkpoint
        lock = self._peer_locks.setdefault(name, anyio.Lock())
        async with lock:
            session = self._peers.get(name)
            if session is None or session.is_closed:
                session = await self.app.create_session(name, CALL_SESSION)
                self._peers[name] = session
                session.on_unreachable(functools.partial(self._fail_waiters, session,
                                                         "unreachable"))
                assert self._tg is not None
                self._tg.start_soon(self._serve_session, session)
            return session

    def _fail_waiters(self, session: Session, why: str) -> None:
        for call_id in self._session_waiters.get(session, ()):
            waiter = self._waiters.get(call_id)
            if waiter is not None and not waiter.event.is_set():
                waiter.closed = why
                waiter.event.set()

    def _expect(self, session: Session, want: int) -> tuple[str, _Waiter]:
        call_id = f"{self._call_prefix}{next(self._ids)}"
        waiter = _Waiter(want)
        self._waiters[call_id] = waiter
        self._session_waiters.setdefault(session, set()).add(call_id)
        return call_id, waiter

    def _forget(self, session: Session, call_id: str) -> None:
        del self._waiters[call_id]
        ids = self._session_waiters.get(session)
        if ids is not None:
            ids.discard(call_id)

    async def _ask(self, target: Name | str, payload: bytes, *,
                   payload_type: str | None = None, key: str = REQUEST_ID) -> Message:
        """Send on the session to ``target`` and wait for the correlated answer.

        When the session ends first (the peer restarted and forgot it), the
        question is asked once more on a new session.
        """
        for attempt in (1, 2):
            session = await self.session_with(target)
            call_id, waiter = self._expect(session, 1)
            try:
                await self._send(session, payload, payload_type=payload_type,
                                 metadata={key: call_id})
                await waiter.event.wait()
            except SessionClosedError:
                if attempt == 2:
                    raise
                continue
            finally:
                self._forget(session, call_id)
            if waiter.got:
                return waiter.got[0]
            if attempt == 2:
                raise SessionClosedError(session.id, waiter.closed or "closed")
            self._drop_peer(session)
        raise AssertionError("unreachable")

    def _drop_peer(self, session: Session) -> None:
        """Forget a session whose peer is gone; the next ask opens a new one."""
        for name, s in list(self._peers.items()):
            if s is session:
                del self._peers[name]
        if not session.is_closed and self._tg is not None:
            self._tg.start_soon(_close_quietly, session)

    async def _exchange(self, target: Name | str, payload_type: str, body: bytes) -> Any:
        answer = await self._ask(target, body, payload_type=payload_type, key=CALL_ID)
        try:
            reply = _loads(answer.payload)
        except ValueError as exc:
            raise ToolError(f"{target}: the reply is not JSON: {exc}", code="bad_reply") from None
        if not isinstance(reply, dict):
            raise ToolError(f"{target}: the reply is not a JSON object", code="bad_reply")
        if not reply.get("ok"):
            err = reply.get("error")
            if not isinstance(err, dict):
                err = {}
            raise ToolError(err.get("message", "the call failed"),
                            code=err.get("code", "failed"), tool=err.get("tool"))
        return reply.get("result")

    async def call(self, target: Name | str, tool_name: str, /, **arguments: Any) -> Any:
        """Call a tool of another agent by name and return its result.

        Bound the wait with a cancel scope.

        :raises ToolError: carrying the remote error (``not_found``, ``bad_arguments``,
            ``failed``, ...), or ``bad_reply`` when the answer is not a JSON object.
        :raises NoRouteError: when no agent serves ``target``.
        """
        body = _dumps({"tool": tool_name, "args": arguments}).encode()
        return await self._exchange(target, CALL, body)

    async def describe(self, target: Name | str) -> dict[str, Any]:
        """What another agent offers: its description and its tools' specs."""
        result = await self._exchange(target, DESCRIBE, b"{}")
        if not isinstance(result, dict):
            raise ToolError(f"{target}: the description is not a JSON object", code="bad_reply")
        return result

    async def remote_tools(self, target: Name | str) -> list[Tool]:
        """Another agent's tools as local :class:`Tool` objects that call it."""
        info = await self.describe(target)
        tools = []
        for spec in info.get("tools", []):
            tools.append(Tool(name=spec["name"], description=spec["description"],
                              parameters=spec["parameters"],
                              func=_remote_call(self, target, spec["name"])))
        return tools

    async def send(self, target: Name | str, payload: bytes | str) -> None:
        """Send a message to another agent's mailbox (no reply expected)."""
        session = await self.session_with(target)
        await self._send(session, _bytes(payload))

    async def request(self, target: Name | str, payload: bytes | str) -> Message:
        """Send a message and wait for the reply (its handler's return value, or a
        :meth:`reply` to it). Bound the wait with a cancel scope."""
        return await self._ask(target, _bytes(payload))

    async def reply(self, to: Mail | int, payload: bytes | str) -> None:
        """Answer a mailbox message (see :meth:`read_mailbox`).

        :raises ToolError: ``not_found`` when the message is unknown or too old.
        """
        mail = to if isinstance(to, Mail) else self._recent.get(to)
        if mail is None:
            raise ToolError(f"no recent message with id {to}", code="not_found")
        meta = {}
        if REQUEST_ID in mail.message.context.metadata:
            meta[REPLY_TO] = mail.message.context.metadata[REQUEST_ID]
        token = _incoming.set(mail.message)
        try:
            await self._send(mail.session, _bytes(payload), metadata=meta,
                             to=mail.message.context)
        finally:
            _incoming.reset(token)

    # -- groups -------------------------------------------------------------------------

    def group(self, channel: Name | str) -> Session:
        """The group session this agent has on ``channel``.

        :raises ToolError: ``not_member`` when it has none.
        """
        name = Name.parse(channel) if isinstance(channel, str) else channel
        session = self._groups.get(name)
        if session is None or session.is_closed:
            raise ToolError(f"{self.name} is not in group {name}", code="not_member")
        return session

    @property
    def groups(self) -> list[Name]:
        return [n for n, s in self._groups.items() if not s.is_closed]

    async def create_group(self, channel: Name | str, members: list[str] | None = None
                           ) -> Session:
        """Create a group on ``channel`` with this agent as moderator and invite ``members``.

        Returns once every member has joined.
        """
        name = Name.parse(channel) if isinstance(channel, str) else channel
        if name in self._groups and not self._groups[name].is_closed:
            raise ToolError(f"{self.name} already has a group on {name}", code="exists")
        session, handle = await self.app.start_session(name, GROUP_SESSION)
        await handle
        self._groups[name] = session
        assert self._tg is not None
        self._tg.start_soon(self._serve_session, session)
        for member in members or ():
            await session.invite(member)
        return session

    async def invite(self, channel: Name | str, member: Name | str) -> Name:
        """Invite ``member`` to a group this agent moderates; returns its full name."""
        return await self.group(channel).invite(member)

    async def remove(self, channel: Name | str, member: Name | str) -> None:
        """Remove ``member`` from a group this agent moderates."""
        session = self.group(channel)
        target = Name.parse(member) if isinstance(member, str) else member
        if target.id is None:
            matches = [p for p in session.participants if p.without_id() == target]
            if not matches:
                raise ToolError(f"{target} is not in group {channel}", code="not_found")
            target = matches[0]
        await session.remove(target)

    async def leave(self, channel: Name | str) -> None:
        """Leave a group (a moderator leaving closes it for everyone)."""
        await self.group(channel).close()

    async def broadcast(self, channel: Name | str, payload: bytes | str) -> None:
        """Send a message to every member of a group."""
        await self._send(self.group(channel), _bytes(payload))

    async def gather(self, channel: Name | str, payload: bytes | str, *,
                     count: int | None = None) -> AsyncIterator[Message]:
        """Send a request to a group and yield the replies as they come.

        Ends after ``count`` replies (every other member by default); bound
        it with a cancel scope to keep what came in time::

            with anyio.move_on_after(5):
                async for reply in agent.gather(channel, "ready?"):
                    replies.append(reply)
        """
        session = self.group(channel)
        want = count if count is not None else max(len(session.participants) - 1, 1)
        call_id, waiter = self._expect(session, want)
        try:
            await self._send(session, _bytes(payload), metadata={REQUEST_ID: call_id})
            given = 0
            while given < want:
                while given == len(waiter.got):
                    if waiter.closed is not None:
                        return
                    waiter.event = anyio.Event()
                    waiter.want = given + 1
                    await waiter.event.wait()
                given += 1
                yield waiter.got[given - 1]
        finally:
            self._forget(session, call_id)

    # -- discovery ----------------------------------------------------------------------

    async def discover(self, prefix: str = "") -> list[AgentCard]:
        """Agents the node can reach whose names start with ``prefix`` (this one excluded)."""
        out = []
        for entry in await self.app.lookup(prefix):
            if entry.name == self.name:
                continue
            card = AgentCard(entry.name, entry.node)
            if entry.card is not None:
                try:
                    info = _loads(entry.card)
                    card = AgentCard(entry.name, entry.node, str(info.get("description", "")),
                                     list(info.get("tools", [])), True)
                except (ValueError, AttributeError, TypeError):
                    pass  # an app that is not an agent: listed by name
            out.append(card)
        return out

    # -- mailbox ------------------------------------------------------------------------

    async def read_mailbox(self, limit: int = 100) -> list[Mail]:
        """Take up to ``limit`` waiting messages (those no handler took), oldest first."""
        out: list[Mail] = []
        while self._mailbox and len(out) < limit:
            out.append(self._mailbox.popleft())
        self._room_wakeup.fire()
        await anyio.lowlevel.checkpoint()
        return out

    async def wait_mailbox(self) -> Mail:
        """Wait for the next mailbox message (bound it with a cancel scope)."""
        while not self._mailbox:
            await self._mail_wakeup.wait()
        mail = self._mailbox.popleft()
        self._room_wakeup.fire()
        return mail

    def messaging_tools(self) -> list[Tool]:
        """This agent's messaging as tools a model can call (send, request, groups, ...)."""
        from ._messaging import messaging_tools

        return messaging_tools(self)


async def _close_quietly(session: Session) -> None:
    with anyio.move_on_after(5):
        try:
            await session.close()
        except SessionError:
            pass


def _bytes(payload: bytes | str) -> bytes:
    return payload.encode() if isinstance(payload, str) else payload


def _remote_call(agent: RunningAgent, target: Name | str, name: str
                 ) -> Callable[..., Awaitable[Any]]:
    async def call(**arguments: Any) -> Any:
        return await agent.call(target, name, **arguments)

    return call


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, Name):
        return str(value)
    if isinstance(value, MessageContext):
        return {"source": str(value.source_name), "session": value.session_id}
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "_asdict"):
        return value._asdict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Targets are mostly the same few texts: parse each once.
_parse_name = functools.lru_cache(maxsize=1024)(Name.parse)
# Built once: json.dumps with ``default=`` builds an encoder on every call.
_dumps = json.JSONEncoder(default=_jsonable).encode
_decode = json.JSONDecoder().decode


def _loads(payload: bytes) -> Any:
    """JSON from a peer; :class:`ValueError` for anything that is not (bad UTF-8 too)."""
    # Decoding first skips json.loads' byte-encoding sniffing.
    try:
        return _decode(payload.decode())
    except RecursionError:  # the decoder's own limit, hit by a peer nesting deeply
        raise ValueError("JSON nested too deeply") from None
