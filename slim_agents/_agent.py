# Agents: an app with decorated handlers and tools, reachable by name.
#
# A tool call is a JSON request on a reliable point-to-point session to the
# target service (one session per peer, reused), answered on the same
# session and matched by call id. Handlers run with bounded concurrency in
# the agent's task group; a handler's exception goes back to the caller as
# an error result and is logged.
from __future__ import annotations

import inspect
import itertools
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pluggy
from anyio.abc import TaskGroup

from node_lite import (
    ConfigError,
    Limits,
    Name,
    Node,
    NodeConfig,
    TlsConfig,
    TokenProvider,
    TokenVerifier,
    open_node,
)

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
CALL_ID = "call-id"
# Concurrent handler and tool runs per agent.
DEFAULT_CONCURRENCY = 16
# Messages kept for read_mailbox when no on_message handler takes them.
DEFAULT_MAILBOX = 1000
# Sessions agents open to call each other: reliable, so a lost call is retried.
CALL_SESSION = SessionConfig(timeout=1.0, max_retries=10)

MessageHandler = Callable[[Message, Session], Awaitable[bytes | str | None]]
InviteHandler = Callable[[JoinInfo], "bool | str | Awaitable[bool | str]"]


@dataclass(frozen=True, slots=True)
class RemoteTool:
    """A tool offered by another agent (see :meth:`RunningAgent.remote_tools`)."""

    agent: Name
    spec: Mapping[str, Any]


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
        returns go back to the sender. Without a handler, messages wait in
        the mailbox (see :meth:`RunningAgent.read_mailbox`).
        """
        self._on_message = func
        return func

    def on_invite(self, func: InviteHandler) -> InviteHandler:
        """Decide on invitations: return True to accept, False or a reason to decline."""
        self._on_invite = func
        return func

    @property
    def tools(self) -> list[Tool]:
        return list(self._tools.values())

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
                self.add_tool(t)
        async with AsyncExitStack() as stack:
            if node is None:
                node = await stack.enter_async_context(open_node(NodeConfig()))
            if secret is None and provider is None:
                secret = "slim-agents-development-secret-not-for-production"
            running = RunningAgent(self, pm)
            app = await stack.enter_async_context(open_app(
                self.name, node=node, secret=secret, provider=provider, verifier=verifier,
                tls=tls, limits=limits, invite_policy=running._invite_policy))
            running._app = app
            async with anyio.create_task_group() as tg:
                running._tg = tg
                tg.start_soon(running._accept_sessions)
                try:
                    yield running
                finally:
                    tg.cancel_scope.cancel()

    async def serve(self, node: Node | str | None = None, **kwargs: Any) -> None:
        """Run the agent until cancelled (``anyio.run(agent.serve)`` in a script)."""
        async with self.run(node, **kwargs):
            await anyio.sleep_forever()


class RunningAgent:
    """A connected agent: serves its tools and handlers, and calls other agents."""

    def __init__(self, agent: Agent, pm: pluggy.PluginManager) -> None:
        self.agent = agent
        self.plugins = pm
        self._app: App | None = None
        self._tg: TaskGroup | None = None
        self._limiter = anyio.CapacityLimiter(agent.concurrency)
        self._peers: dict[Name, Session] = {}
        self._peer_locks: dict[Name, anyio.Lock] = {}
        self._calls: dict[str, tuple[anyio.Event, list[Message]]] = {}
        self._ids = itertools.count(1)
        self._mailbox: deque[Message] = deque(maxlen=agent.mailbox_size)
        self._mail_event: anyio.Event | None = None
        self._invite_verdicts: dict[int, bool | str] = {}
        self.handled = 0
        self.failures = 0

    @property
    def app(self) -> App:
        assert self._app is not None, "the agent is not running"
        return self._app

    @property
    def name(self) -> Name:
        return self.app.name

    # -- serving ------------------------------------------------------------------------

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
            self._notify(session, "established")
            self._tg.start_soon(self._serve_session, session)

    def _notify(self, session: Session, event: str) -> None:
        try:
            self.plugins.hook.slim_session_event(agent=self.agent, session=session, event=event)
        except Exception:
            log.exception("%s: a slim_session_event hook failed", self.agent.name)

    async def _serve_session(self, session: Session) -> None:
        assert self._tg is not None
        try:
            while True:
                try:
                    msg = await session.get_message()
                except SessionClosedError:
                    return
                except SessionError as exc:  # a lost or undecryptable message
                    log.warning("%s: %s", self.agent.name, exc)
                    continue
                for replaced in self.plugins.hook.slim_after_receive(
                        agent=self.agent, session=session, message=msg):
                    if replaced is not None:
                        msg = replaced
                pt = msg.context.payload_type
                if pt == RESULT:
                    self._deliver_result(msg)
                elif pt in (CALL, DESCRIBE):
                    self._tg.start_soon(self._run_call, session, msg)
                else:
                    self._tg.start_soon(self._run_message, session, msg)
        finally:
            self._notify(session, "closed")

    async def _run_call(self, session: Session, msg: Message) -> None:
        call_id = msg.context.metadata.get(CALL_ID, "")
        async with self._limiter:
            try:
                if msg.context.payload_type == DESCRIBE:
                    result: Any = {"agent": str(self.name),
                                   "description": self.agent.description,
                                   "tools": [t.to_dict() for t in self.agent.tools]}
                else:
                    request = json.loads(msg.payload)
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
            data = json.dumps(body, default=_jsonable).encode()
        except (TypeError, ValueError) as exc:
            data = json.dumps({"ok": False, **ToolError(
                f"the result is not JSON: {exc}", code="bad_result").to_result()}).encode()
        try:
            await session.publish_to(msg.context, data, payload_type=RESULT,
                                     metadata={CALL_ID: call_id})
        except SessionClosedError:
            pass

    async def _run_message(self, session: Session, msg: Message) -> None:
        handler = self.agent._on_message
        if handler is None:
            self._mailbox.append(msg)
            e, self._mail_event = self._mail_event, None
            if e is not None:
                e.set()
            return
        async with self._limiter:
            try:
                reply = await handler(msg, session)
                self.handled += 1
            except Exception as exc:
                log.exception("%s: message handler failed", self.agent.name)
                self.failures += 1
                reply = json.dumps(ToolError(f"{type(exc).__name__}: {exc}",
                                             code="handler_failed").to_result())
                payload_type: str | None = "slim-agents/error"
            else:
                payload_type = None
        if reply is not None:
            data = reply.encode() if isinstance(reply, str) else reply
            try:
                await session.publish_to(msg.context, data, payload_type=payload_type)
            except SessionClosedError:
                pass

    def _deliver_result(self, msg: Message) -> None:
        waiter = self._calls.get(msg.context.metadata.get(CALL_ID, ""))
        if waiter is not None:
            waiter[1].append(msg)
            waiter[0].set()

    # -- calling others -----------------------------------------------------------------

    async def session_with(self, target: Name | str) -> Session:
        """The (reused) reliable point-to-point session to ``target``."""
        name = Name.parse(target) if isinstance(target, str) else target
        lock = self._peer_locks.setdefault(name, anyio.Lock())
        async with lock:
            session = self._peers.get(name)
            if session is None or session.is_closed:
                session = await self.app.create_session(name, CALL_SESSION)
                self._peers[name] = session
                assert self._tg is not None
                self._tg.start_soon(self._serve_session, session)
            return session

    async def _exchange(self, target: Name | str, payload_type: str, body: bytes) -> Any:
        session = await self.session_with(target)
        call_id = f"{self.name}#{next(self._ids)}"
        event = anyio.Event()
        box: list[Message] = []
        self._calls[call_id] = (event, box)
        try:
            await session.publish(body, payload_type=payload_type,
                                  metadata={CALL_ID: call_id})
            await event.wait()
        finally:
            del self._calls[call_id]
        reply = json.loads(box[0].payload)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ToolError(err.get("message", "the call failed"),
                            code=err.get("code", "failed"), tool=err.get("tool"))
        return reply.get("result")

    async def call(self, target: Name | str, tool_name: str, /, **arguments: Any) -> Any:
        """Call a tool of another agent by name and return its result.

        Bound the wait with a cancel scope.

        :raises ToolError: carrying the remote error (``not_found``, ``bad_arguments``,
            ``failed``, ...).
        :raises NoRouteError: when no agent serves ``target``.
        """
        body = json.dumps({"tool": tool_name, "args": arguments}, default=_jsonable).encode()
        return await self._exchange(target, CALL, body)

    async def describe(self, target: Name | str) -> dict[str, Any]:
        """What another agent offers: its description and its tools' specs."""
        result: dict[str, Any] = await self._exchange(target, DESCRIBE, b"{}")
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
        await session.publish(payload.encode() if isinstance(payload, str) else payload)

    async def request(self, target: Name | str, payload: bytes | str) -> Message:
        """Send a message and wait for the next message the target sends back."""
        session = await self.session_with(target)
        await session.publish(payload.encode() if isinstance(payload, str) else payload)
        return await self._next_mail_from(session)

    async def _next_mail_from(self, session: Session) -> Message:
        while True:
            for msg in list(self._mailbox):
                if msg.context.session_id == session.id:
                    self._mailbox.remove(msg)
                    return msg
            if self._mail_event is None:
                self._mail_event = anyio.Event()
            await self._mail_event.wait()

    async def read_mailbox(self, limit: int = 100) -> list[Message]:
        """Take up to ``limit`` waiting messages (those no handler took)."""
        out: list[Message] = []
        while self._mailbox and len(out) < limit:
            out.append(self._mailbox.popleft())
        await anyio.lowlevel.checkpoint()
        return out

    async def wait_mailbox(self) -> Message:
        """Wait for the next mailbox message (bound it with a cancel scope)."""
        while not self._mailbox:
            if self._mail_event is None:
                self._mail_event = anyio.Event()
            await self._mail_event.wait()
        return self._mailbox.popleft()


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
    if hasattr(value, "_asdict"):
        return value._asdict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
