"""pytest fixtures for testing SLIM apps and agents, also in parallel fleets (pytest-xdist).

Installed as a ``pytest11`` entry point, so it loads by itself wherever
slim-agents is installed. Async tests need anyio's pytest plugin
(``@pytest.mark.anyio``) and run on asyncio or trio.

Fixtures:

* ``slim_node`` (session): the node of this xdist worker (one per worker), run in
  a background thread; tests reach it over TCP loopback through ``.url``/``.secret``.
* ``slim_test_node`` (function): the node ``slim_app`` and ``slim_agent`` use: the
  worker's node, or a fresh one for a test marked ``@pytest.mark.slim_isolated``.
* ``slim_isolated_node`` (function, async): a fresh node in the test's own event loop.
* ``slim_name`` (function): ``slim_name("alice") -> "org/<ns>/alice"`` with a
  namespace unique to the worker and the test.
* ``slim_app`` / ``slim_agent`` (function, async): factories of connected apps and
  running agents, closed at teardown.
* ``slim_swarm`` (function, async): agents in worker processes on this test's node,
  all stopped at teardown.

Helpers that wait for a state with a deadline: :func:`slim_wait_until`,
:func:`slim_messages`.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from node_lite import Node, NodeConfig, ServerConfig, open_node

from ._agent import Agent, RunningAgent
from ._app import App, open_app
from ._errors import SessionClosedError
from ._plugins import make_plugin_manager
from ._reports import Message
from ._session import Session
from ._swarm import AgentSpec, Swarm, open_swarm

__all__ = [
    "AgentFactory",
    "AppFactory",
    "NameFactory",
    "SlimNode",
    "SlimTimeoutError",
    "SwarmFactory",
    "slim_messages",
    "slim_wait_until",
]

ISOLATED_MARKER = "slim_isolated"
DEFAULT_ORG = "org"
# Seconds a test node waits for connections to flush when it stops; a test's
# apps are gone by then, so this only bounds a misbehaving one.
_DRAIN_TIMEOUT = 2.0
# Hex digits of the test id hash in a namespace (48 bits: collisions are negligible).
_NS_HASH_DIGITS = 12


@dataclass(frozen=True)
class SlimNode:
    """A node for tests: connect with ``open_app(name, node=n.url, secret=n.secret)``."""

    url: str
    secret: str
    worker: str
    isolated: bool = False
    _node: Node | None = field(default=None, repr=False, compare=False)

    @property
    def node(self) -> Node:
        """The :class:`node_lite.Node` itself, for a node in the test's own event loop.

        :raises RuntimeError: for nodes that run in a background thread (use ``url``).
        """
        if self._node is None:
            raise RuntimeError("this node runs in its own thread; connect through .url")
        return self._node


class SlimTimeoutError(AssertionError, TimeoutError):
    """A state a helper waited for did not come in time (a test failure, not an error)."""


class NameFactory:
    """``slim_name("alice")`` -> ``"org/<namespace>/alice"``; the namespace is this test's."""

    def __init__(self, namespace: str, org: str = DEFAULT_ORG) -> None:
        self.org = org
        self.namespace = namespace

    @property
    def prefix(self) -> str:
        """``org/<namespace>/``: what every name of this test starts with."""
        return f"{self.org}/{self.namespace}/"

    def __call__(self, app: str) -> str:
        if not app or any(c in "/:" or c.isspace() for c in app):
            raise ValueError(f"an app name is one component without '/', ':' or spaces: {app!r}")
        return f"{self.prefix}{app}"


class AppFactory(Protocol):
    """``await slim_app("alice", **open_app_options)`` -> a connected :class:`App`."""

    async def __call__(self, name: str, /, **options: Any) -> App: ...


class AgentFactory(Protocol):
    """``await slim_agent(agent_or_app_name, **run_options)`` -> a :class:`RunningAgent`."""

    async def __call__(self, agent: Agent | str, /, **options: Any) -> RunningAgent: ...


# -- waiting with a deadline ------------------------------------------------------------
# These take a timeout (ASYNC109): it is the assertion's deadline, reported in its
# failure message, not a way to cancel the caller.


def _describe(predicate: Callable[..., object]) -> str:
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    return f"{name} (pass message= to say what)" if "<lambda>" in name else name


async def slim_wait_until(predicate: Callable[[], bool | Awaitable[bool]], *,
                          timeout: float = 5.0,  # noqa: ASYNC109
                          message: str | None = None) -> None:
    """Wait until ``predicate()`` (sync or async) is true.

    Polls with a short, growing interval (state changes on the other side of a
    socket have no event to wait on here).

    :raises SlimTimeoutError: after ``timeout`` seconds, naming what was awaited.
    """
    __tracebackhide__ = True  # the failure points at the test's line, not here
    what = message or _describe(predicate)
    interval = 0.001
    with anyio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(interval)
            interval = min(interval * 2, 0.05)
    raise SlimTimeoutError(f"timed out after {timeout:g} s waiting for {what}")


async def slim_messages(session: Session, n: int, *,
                        timeout: float = 5.0) -> list[Message]:  # noqa: ASYNC109
    """The next ``n`` messages of ``session``, received within ``timeout`` seconds.

    :raises SlimTimeoutError: when fewer arrive in time (the message shows those that did).
    :raises AssertionError: when the session closes first.
    """
    __tracebackhide__ = True
    got: list[Message] = []
    with anyio.move_on_after(timeout):
        while len(got) < n:
            try:
                got.append(await session.get_message())
            except SessionClosedError as exc:
                raise AssertionError(f"session {session.id} closed after {len(got)} of {n} "
                                     f"messages: {exc}") from exc
        return got
    shown = [m.payload[:40] for m in got[:5]]
    raise SlimTimeoutError(
        f"timed out after {timeout:g} s waiting for {n} message{'s' * (n != 1)} on session "
        f"{session.id}: got {len(got)}{f' {shown}' if got else ''}")


# -- nodes ------------------------------------------------------------------------------


def _worker(config: pytest.Config) -> str:
    # xdist gives each worker process an id through workerinput; the env var
    # could be inherited from an outer run, so it is not trusted.
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput else "main"


def _node_config(worker: str, secret: str) -> NodeConfig:
    return NodeConfig(node_id=f"slim/test-{worker}", shared_secret=secret,
                      servers=(ServerConfig(endpoint="127.0.0.1:0"),),
                      drain_timeout=_DRAIN_TIMEOUT)


@contextmanager
def _node_in_thread(worker: str, *, isolated: bool) -> Iterator[SlimNode]:
    # The node gets its own event loop in a thread, so it outlives any one test's
    # loop and serves tests on any backend; entering returns once it listens.
    secret = secrets.token_urlsafe(32)
    with start_blocking_portal() as portal, \
            portal.wrap_async_context_manager(open_node(_node_config(worker, secret))) as node:
        yield SlimNode(url=node.url, secret=secret, worker=worker, isolated=isolated)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{ISOLATED_MARKER}: give this test's slim_app and slim_agent a fresh node "
        "instead of the worker's shared one")


@pytest.fixture(scope="session")
def slim_node(request: pytest.FixtureRequest) -> Iterator[SlimNode]:
    """The node of this xdist worker (or of the run, without xdist), in a background thread.

    Tests share it; :func:`slim_name` keeps their names apart.
    """
    with _node_in_thread(_worker(request.config), isolated=False) as node:
        yield node


@pytest.fixture
def slim_test_node(request: pytest.FixtureRequest) -> Iterator[SlimNode]:
    """The node of this test's apps and agents: the worker's ``slim_node``, or a fresh
    node (in a background thread) when the test is marked ``@pytest.mark.slim_isolated``."""
    if request.node.get_closest_marker(ISOLATED_MARKER) is None:
        yield request.getfixturevalue("slim_node")
        return
    with _node_in_thread(_worker(request.config), isolated=True) as node:
        yield node


@pytest.fixture
async def slim_isolated_node(request: pytest.FixtureRequest) -> AsyncIterator[SlimNode]:
    """A fresh node in the test's own event loop; ``.node`` is the :class:`Node` itself."""
    worker = _worker(request.config)
    secret = secrets.token_urlsafe(32)
    async with open_node(_node_config(worker, secret)) as node:
        yield SlimNode(url=node.url, secret=secret, worker=worker, isolated=True, _node=node)


# -- names, apps and agents ---------------------------------------------------------------


@pytest.fixture
def slim_name(request: pytest.FixtureRequest) -> NameFactory:
    """Names in a namespace of this worker and test: ``slim_name("bob") -> "org/<ns>/bob"``.

    Tests sharing a node never reach each other's apps; ``slim_name.prefix`` is the
    common prefix (for discovery).
    """
    digest = hashlib.blake2b(request.node.nodeid.encode(), digest_size=16).hexdigest()
    return NameFactory(f"{_worker(request.config)}-{digest[:_NS_HASH_DIGITS]}")


def _full_name(names: NameFactory, name: str) -> str:
    return name if "/" in name else names(name)


@pytest.fixture
async def slim_app(slim_test_node: SlimNode, slim_name: NameFactory) -> AsyncIterator[AppFactory]:
    """``app = await slim_app("alice")``: an app connected to this test's node as
    ``slim_name("alice")`` (a name with ``/`` is used as given); ``open_app`` options
    pass through. Closed at teardown."""
    async with AsyncExitStack() as stack:
        async def connect(name: str, /, **options: Any) -> App:
            options.setdefault("secret", slim_test_node.secret)
            return await stack.enter_async_context(
                open_app(_full_name(slim_name, name), node=slim_test_node.url, **options))

        yield connect


@pytest.fixture
async def slim_agent(slim_test_node: SlimNode, slim_name: NameFactory
                     ) -> AsyncIterator[AgentFactory]:
    """``running = await slim_agent(agent)``: runs an :class:`Agent` on this test's node
    until teardown; ``await slim_agent("user")`` runs a new tool-less agent named
    ``slim_name("user")`` (to call others). ``Agent.run`` options pass through.

    An agent without ``plugins=`` runs with no installed plugins loaded, so a test
    does not depend on which framework adapters happen to be installed.
    """
    async with AsyncExitStack() as stack:
        async def run(agent: Agent | str, /, **options: Any) -> RunningAgent:
            if isinstance(agent, str):
                agent = Agent(_full_name(slim_name, agent))
            options.setdefault("secret", slim_test_node.secret)
            own = agent.plugins
            if own is None:
                agent.plugins = make_plugin_manager(allow=False)
            try:
                # Agent.run reads the plugins as it starts; the caller's agent is left as it was.
                return await stack.enter_async_context(agent.run(slim_test_node.url, **options))
            finally:
                agent.plugins = own

        yield run


# -- swarms -------------------------------------------------------------------------------


class SwarmFactory(Protocol):
    """``swarm = await slim_swarm(factory, count, processes=2)`` -> a running :class:`Swarm`."""

    async def __call__(self, factory: str | Callable[..., Agent], count: int, /, *,
                       name: str = "agent-{i}", processes: int | None = None,
                       **kwargs: Any) -> Swarm: ...


@pytest.fixture
async def slim_swarm(slim_test_node: SlimNode, slim_name: NameFactory
                     ) -> AsyncIterator[SwarmFactory]:
    """``swarm = await slim_swarm(make_agent, 8, processes=2)``: ``count`` agents made by
    ``make_agent(name, **kwargs)`` (a module-level function, or ``"module:function"``)
    in worker processes connected to this test's node, named ``slim_name("agent-{i}")``.
    Returns once every agent is connected; every process is stopped at teardown."""
    async with AsyncExitStack() as stack:
        async def start(factory: str | Callable[..., Agent], count: int, /, *,
                        name: str = "agent-{i}", processes: int | None = None,
                        **kwargs: Any) -> Swarm:
            specs = AgentSpec.many(factory, _full_name(slim_name, name), count, **kwargs)
            return await stack.enter_async_context(open_swarm(
                specs, node=slim_test_node.url, secret=slim_test_node.secret,
                processes=processes))

        yield start

