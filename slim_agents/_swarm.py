# The multiprocess runtime: many agents across a pool of worker processes.
#
# The parent owns the node (embedded, or a URL), starts one worker per slot
# with `python -m slim_agents._swarm_worker`, sends it its agents as one JSON
# line on stdin and reads JSON lines back (ready, log, failed). Closing a
# worker's stdin asks it to stop; a worker whose parent dies sees the same
# end of file. A worker that dies is started again under the restart policy.
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from node_lite import (
    ConfigError,
    Node,
    NodeConfig,
    ServerConfig,
    SlimError,
    open_node,
    open_node_process,
)
from node_lite._util import BACKENDS, current_backend

log = logging.getLogger("slim_agents.swarm")

# How long a worker may take to stop once asked, before SIGTERM, then SIGKILL.
STOP_GRACE = 5.0
KILL_GRACE = 2.0
# Longest line a worker may write (a log record with a traceback fits).
MAX_LINE = 1 << 20
DEV_SECRET = "slim-agents-swarm-development-secret-not-for-production"


class SwarmError(SlimError):
    """A swarm could not start, or a worker failed beyond its restart policy."""

    code = "swarm"


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One agent of a swarm: a factory, the name to give it, keyword arguments.

    ``factory`` is ``"package.module:function"`` or ``"path/to/file.py:function"``;
    the function is called in the worker as ``function(name, **kwargs)`` and
    returns a :class:`~slim_agents.Agent`. ``kwargs`` must be JSON.
    """

    factory: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ConfigError(f"factory {self.factory!r}: expected 'module:function'")

    @classmethod
    def many(cls, factory: str | Callable[..., Any], name: str, count: int,
             **kwargs: Any) -> list[AgentSpec]:
        """``count`` specs named ``name.format(i=i)`` (``"org/ns/worker-{i}"``)."""
        ref = factory_ref(factory)
        names = [name.format(i=i) for i in range(count)]
        if len(set(names)) != count:
            raise ConfigError(f"name {name!r} must contain {{i}} to give {count} agents names")
        return [cls(ref, n, dict(kwargs)) for n in names]


def factory_ref(factory: str | Callable[..., Any]) -> str:
    """A reference a worker process can import: ``module:qualname`` or ``file.py:qualname``."""
    if isinstance(factory, str):
        return factory
    module, qualname = factory.__module__, factory.__qualname__
    if "<locals>" in qualname:
        raise ConfigError(f"{qualname} is local to a function: a worker cannot import it")
    if module == "__main__":
        path = inspect.getsourcefile(factory)
        if path is None:
            raise ConfigError(f"{qualname} has no source file a worker could load")
        return f"{Path(path).resolve()}:{qualname}"
    return f"{module}:{qualname}"


def load_factory(ref: str) -> Callable[..., Any]:
    """Import the function a reference names (in the worker)."""
    where, _, qualname = ref.rpartition(":")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_swarm_{Path(where).stem}", where)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{ref} is not callable")
    return obj  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Restart a worker that dies, at most ``max_restarts`` times in ``window`` seconds,
    waiting ``backoff`` seconds first (doubling, at most ``max_backoff``)."""

    max_restarts: int = 5
    window: float = 60.0
    backoff: float = 0.1
    max_backoff: float = 5.0


@dataclass(slots=True)
class WorkerState:
    """One worker process of a swarm (see :attr:`Swarm.workers`)."""

    index: int
    specs: list[AgentSpec]
    pid: int | None = None
    ready: set[str] = field(default_factory=set)
    restarts: int = 0
    failed: str | None = None
    process: Process | None = field(default=None, repr=False)
    _restart_times: list[float] = field(default_factory=list, repr=False)


class Swarm:
    """Agents running in worker processes, supervised (see :func:`open_swarm`)."""

    def __init__(self, url: str, secret: str, names: list[str], workers: list[WorkerState],
                 backend: str, restart: RestartPolicy, log_level: int,
                 on_progress: Callable[[int, int], None] | None) -> None:
        self.url = url
        self.secret = secret
        self.workers = workers
        self.backend = backend
        self.restart = restart
        self.log_level = log_level
        self.on_progress = on_progress
        self._names = names
        self._changed = anyio.Event()
        self._stopping = False
        self._tg: TaskGroup | None = None

    @property
    def names(self) -> list[str]:
        """The agents' names, in the order of the specs."""
        return self._names

    @property
    def ready_count(self) -> int:
        return sum(len(w.ready) for w in self.workers)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def _wake(self) -> None:
        e, self._changed = self._changed, anyio.Event()
        e.set()

    async def wait_ready(self) -> None:
        """Return once every agent is connected (again, after a restart).

        :raises SwarmError: when a worker failed beyond its restart policy.
        """
        total = len(self.names)
        while True:
            failed = [w for w in self.workers if w.failed]
            if failed:
                raise SwarmError(f"worker {failed[0].index} failed: {failed[0].failed}")
            if self.ready_count == total:
                return
            await self._changed.wait()

    # -- supervision ---------------------------------------------------------------------

    async def _supervise(self, worker: WorkerState) -> None:
        backoff = self.restart.backoff
        while not self._stopping:
            started = time.monotonic()
            code = await self._run_worker(worker)
            worker.ready.clear()
            worker.pid = None
            self._wake()
            if self._stopping:
                return
            now = time.monotonic()
            worker._restart_times = [t for t in worker._restart_times
                                     if now - t < self.restart.window]
            if len(worker._restart_times) >= self.restart.max_restarts:
                worker.failed = f"exited with {code}, {len(worker._restart_times)} restarts " \
                                f"in {self.restart.window:g} s"
                log.error("swarm worker %d %s; not restarting", worker.index, worker.failed)
                self._wake()
                return
            if now - started > self.restart.window:
                backoff = self.restart.backoff  # it ran well for a while: start over
            log.warning("swarm worker %d (%d agents) exited with %s; restarting in %.1f s",
                        worker.index, len(worker.specs), code, backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self.restart.max_backoff)
            worker._restart_times.append(time.monotonic())
            worker.restarts += 1

    async def _run_worker(self, worker: WorkerState) -> int | None:
        config = {"url": self.url, "secret": self.secret, "backend": self.backend,
                  "log_level": self.log_level, "restart": {
                      "backoff": self.restart.backoff, "max_backoff": self.restart.max_backoff},
                  "agents": [{"factory": s.factory, "name": s.name, "kwargs": dict(s.kwargs)}
                             for s in worker.specs]}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = await anyio.open_process(
            [sys.executable, "-m", "slim_agents._swarm_worker"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)  # Ctrl-C reaches the parent only: it stops the workers
        worker.process = process
        worker.pid = process.pid
        assert process.stdin is not None
        try:
            await process.stdin.send(json.dumps(config).encode() + b"\n")
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_events, worker, process)
                tg.start_soon(self._read_stderr, worker, process)
                code = await process.wait()
            return code
        finally:
            worker.process = None
            with anyio.CancelScope(shield=True):
                await _stop_process(process)

    async def _read_events(self, worker: WorkerState, process: Process) -> None:
        assert process.stdout is not None
        async for line in _lines(process.stdout):
            try:
                event = json.loads(line)
                kind = event["ev"]
            except (ValueError, KeyError, TypeError):
                log.info("[worker %d] %s", worker.index, line.decode(errors="replace"))
                continue
            agent = event.get("agent", "?")
            if kind == "ready":
                worker.ready.add(agent)
                if self.on_progress is not None:
                    self.on_progress(self.ready_count, len(self.names))
                self._wake()
            elif kind == "down":
                worker.ready.discard(agent)
                self._wake()
            elif kind == "log":
                level = event.get("level", logging.INFO)
                logging.getLogger(f"slim_agents.swarm.{agent}").log(
                    level if isinstance(level, int) else logging.INFO, "[%s] %s", agent,
                    event.get("msg", ""))

    async def _read_stderr(self, worker: WorkerState, process: Process) -> None:
        assert process.stderr is not None
        async for line in _lines(process.stderr):
            log.warning("[worker %d] %s", worker.index, line.decode(errors="replace"))

    async def aclose(self) -> None:
        """Stop every worker: ask, then SIGTERM, then SIGKILL; nothing is left running."""
        self._stopping = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for w in self.workers:
                    if w.process is not None:
                        tg.start_soon(_stop_process, w.process)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()


async def _lines(stream: Any) -> AsyncIterator[bytes]:
    buffered = BufferedByteReceiveStream(stream)
    while True:
        try:
            line = await buffered.receive_until(b"\n", MAX_LINE)
        except anyio.IncompleteRead:  # the end, maybe after an unterminated line
            if buffered.buffer:
                yield bytes(buffered.buffer)
            return
        except anyio.DelimiterNotFound:
            line = await buffered.receive(MAX_LINE)  # an overlong line goes in pieces
        if line:
            yield line


async def _stop_process(process: Process) -> None:
    if process.returncode is not None:
        return
    if process.stdin is not None:
        try:
            await process.stdin.aclose()  # the worker's signal to stop
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
    for grace, sig in ((STOP_GRACE, signal.SIGTERM), (KILL_GRACE, signal.SIGKILL)):
        with anyio.move_on_after(grace):
            await process.wait()
            return
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            return
    with anyio.move_on_after(KILL_GRACE):
        await process.wait()


@asynccontextmanager
async def open_swarm(specs: Sequence[AgentSpec], *, node: Node | str | None = None,
                     processes: int | None = None, secret: str | None = None,
                     restart: RestartPolicy | None = None, log_level: int = logging.WARNING,
                     on_progress: Callable[[int, int], None] | None = None,
                     backend: str | None = None) -> AsyncIterator[Swarm]:
    """Run ``specs`` across ``processes`` worker processes until the block ends.

    Returns once every agent is connected. ``node`` is a node of this
    process (it needs a TCP server), a node URL, ``"subprocess"`` to start a
    node process for the swarm, or None to start one in this process on
    127.0.0.1 port 0. Workers run on ``backend`` (asyncio, uvloop or trio;
    default: the caller's).

    :raises SwarmError: when the agents cannot all start.
    """
    if not specs:
        raise ConfigError("a swarm needs at least one agent")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError("agent names in a swarm must be unique")
    n = max(1, min(processes or min(4, os.cpu_count() or 1), len(specs)))
    workers = [WorkerState(i, list(specs[i::n])) for i in range(n)]
    if backend is None:
        backend = current_backend()
    elif backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    async with AsyncExitStack() as stack:
        if node is None:
            secret = secret or DEV_SECRET
            node = await stack.enter_async_context(open_node(NodeConfig(
                shared_secret=secret, servers=(ServerConfig(endpoint="127.0.0.1:0"),))))
        elif node == "subprocess":
            secret = secret or DEV_SECRET
            process = await stack.enter_async_context(open_node_process(
                ("--endpoint", "127.0.0.1:0", "--shared-secret", secret,
                 "--log-level", "warn")))
            node = process.url
        url = node if isinstance(node, str) else _tcp_url(node)
        swarm = Swarm(url, secret or DEV_SECRET, names, workers, backend,
                      restart or RestartPolicy(), log_level, on_progress)
        async with anyio.create_task_group() as tg:
            swarm._tg = tg
            for w in workers:
                tg.start_soon(swarm._supervise, w)
            try:
                await swarm.wait_ready()
                yield swarm
            finally:
                await swarm.aclose()


def _tcp_url(node: Node) -> str:
    if not node.ports:
        raise ConfigError("the swarm's workers reach the node over TCP: give it a server")
    return node.url


# -- the `slim-agents swarm` command ----------------------------------------------------------


def add_swarm_arguments(parser: Any) -> None:
    parser.add_argument("factory", help="module:function (or file.py:function) making an Agent "
                        "from a name")
    parser.add_argument("--count", type=int, default=4, help="how many agents (default 4)")
    parser.add_argument("--name", default="org/ns/agent-{i}",
                        help="name template with {i} (default org/ns/agent-{i})")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes (default: min(4, CPUs))")
    parser.add_argument("--node", default=None, help="node URL (default: start one here)")
    parser.add_argument("--secret", default=None, help="shared secret of the node")
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="event loop of the workers (default: this command's, asyncio)")


async def run_swarm(args: Any) -> int:
    """Run a swarm until Ctrl-C or SIGTERM, showing progress while it starts."""
    specs = AgentSpec.many(args.factory, args.name, args.count)
    started = time.monotonic()

    def progress(ready: int, total: int) -> None:
        print(f"\rconnected {ready}/{total}", end="" if ready < total else "\n",
              file=sys.stderr, flush=True)

    async with open_swarm(specs, node=args.node, processes=args.processes, secret=args.secret,
                          on_progress=progress, backend=args.backend) as swarm:
        print(json.dumps({"ready": len(swarm.names), "seconds": round(
            time.monotonic() - started, 3), "url": swarm.url, "pids": swarm.pids}), flush=True)
        await anyio.sleep_forever()
    return 0
