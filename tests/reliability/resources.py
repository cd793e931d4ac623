"""Leak checks for the reliability matrix: every fault and bad-input test ends with one.

Usage (the node may run in this process or in a child process)::

    async with open_node(config) as node:
        async with resource_check(node):
            ...  # open the scenario's clients here, inject the fault, assert outcomes

On leaving the block (only when the body did not raise) the check

1. waits up to ``settle`` seconds (2 s) for the node's resources to return to
   the snapshot taken on entry, and stay there for three samples 10 ms apart:
   open fds and tasks exactly, RSS within ``rss_slack_mb`` above it
   (shrinking is fine);
2. runs :func:`health_probe` against the node (connect, subscribe, echo);
3. waits again, so that the probe itself left nothing behind.

What is measured:

* in-process :class:`~node_lite.Node`: ``/proc/self/fd``, every task of the
  running event loop (asyncio ``all_tasks()``, or trio's task tree), this
  process's RSS, and the node's live connection count. The whole process is
  measured, so the scenario's own clients must be opened *and closed* inside
  the block (they are part of "nothing leaked");
* :class:`~node_lite.NodeProcess`: ``/proc/<pid>/fd`` and the child's RSS and
  thread count (``/proc/<pid>/task``; it may shrink, as idle worker threads
  exit). The child's event-loop tasks are not visible from outside; every
  node task belongs to a connection or a listener, each of which holds an fd,
  so the exact fd count stands in for them.

:func:`process_check` is the same check for this process alone (no node to
probe): for scenarios that start and stop a node inside the block, or only
run clients. :func:`snapshot` and :func:`wait_for_baseline` are the pieces,
for scenarios that replace the node (crash and restart) in the middle.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import sniffio

from node_lite import (
    Name,
    Node,
    NodeProcess,
    SharedSecretProvider,
    TokenProvider,
    instance_id_for,
    open_connection,
)
from node_lite.wire import Publish, Subscribe, SubscribeAck

__all__ = [
    "ResourceLeakError",
    "ResourceSnapshot",
    "health_probe",
    "process_check",
    "resource_check",
    "snapshot",
    "wait_for_baseline",
]

MiB = 1 << 20
# Placeholder secret for nodes in development mode (tokens are read, not checked).
_DEV_SECRET = "resource-probe-development-mode-secret-0123456789"
_probe_ids = iter(range(1, 1 << 62))
# Consecutive matching samples (10 ms apart) that count as "back to baseline".
_STABLE_SAMPLES = 3


class ResourceLeakError(AssertionError):
    """The node's resources did not return to the baseline in time."""


@dataclass(frozen=True, slots=True)
class ResourceSnapshot:
    """Resources of a node at one moment.

    ``tasks`` and ``connections`` are ``None`` for a node in another process.
    """

    fds: int
    rss: int
    threads: int
    tasks: int | None = None
    connections: int | None = None

    def describe(self) -> str:
        parts = [f"fds={self.fds}", f"rss={self.rss / MiB:.1f}MiB", f"threads={self.threads}"]
        if self.tasks is not None:
            parts.append(f"tasks={self.tasks}")
        if self.connections is not None:
            parts.append(f"connections={self.connections}")
        return " ".join(parts)


def _rss(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _count(path: str) -> int:
    return len(os.listdir(path))


def _task_count() -> int:
    """Tasks of the running event loop (call from inside it)."""
    if sniffio.current_async_library() == "trio":
        import trio

        def walk(task: trio.lowlevel.Task) -> int:
            return 1 + sum(walk(child) for nursery in task.child_nurseries
                           for child in nursery.child_tasks)

        root = trio.lowlevel.current_root_task()
        assert root is not None, "not inside trio.run"
        return walk(root)
    import asyncio

    return len(asyncio.all_tasks())


def snapshot(node: Node | NodeProcess | None) -> ResourceSnapshot:
    """Measure a node now (in-process or ``None``: this process; call from its event loop)."""
    if isinstance(node, NodeProcess):
        pid = node.process.pid
        return ResourceSnapshot(fds=_count(f"/proc/{pid}/fd"), rss=_rss(pid),
                                threads=_count(f"/proc/{pid}/task"))
    return ResourceSnapshot(
        fds=_count("/proc/self/fd"), rss=_rss("self"), threads=_count("/proc/self/task"),
        tasks=_task_count(),
        connections=None if node is None else sum(node.statistics().connections.values()),
    )


def _differences(now: ResourceSnapshot, base: ResourceSnapshot, slack: int) -> list[str]:
    out = []
    if now.fds != base.fds:
        out.append(f"fds {base.fds} -> {now.fds}")
    if now.tasks != base.tasks:
        out.append(f"tasks {base.tasks} -> {now.tasks}")
    if now.connections != base.connections:
        out.append(f"connections {base.connections} -> {now.connections}")
    if base.tasks is None and now.threads > base.threads:
        out.append(f"threads {base.threads} -> {now.threads}")
    if now.rss > base.rss + slack:
        out.append(f"rss +{(now.rss - base.rss) / MiB:.1f} MiB (slack {slack / MiB:g} MiB)")
    return out


async def wait_for_baseline(node: Node | NodeProcess | None, baseline: ResourceSnapshot, *,
                            rss_slack_mb: float = 5, timeout: float = 2.0) -> ResourceSnapshot:
    """Poll until the node's resources match ``baseline`` (see the module docstring).

    :raises ResourceLeakError: naming what differs after ``timeout`` seconds.
    """
    slack = int(rss_slack_mb * MiB)
    deadline = time.monotonic() + timeout
    collected = False
    matched = 0
    while True:
        now = snapshot(node)
        diff = _differences(now, baseline, slack)
        if not diff:
            # Hold for a few samples: a socket the node has not accepted yet
            # (or a task not yet spawned) must not slip through.
            matched += 1
            if matched >= _STABLE_SAMPLES:
                return now
            await anyio.sleep(0.01)
            continue
        matched = 0
        if diff[0].startswith("rss") and len(diff) == 1 and not collected:
            gc.collect()  # free garbage cycles once before judging memory
            collected = True
            continue
        if time.monotonic() > deadline:
            raise ResourceLeakError(
                f"node resources did not return to baseline within {timeout:g} s: "
                f"{'; '.join(diff)} (baseline {baseline.describe()}, now {now.describe()})")
        await anyio.sleep(0.02)


async def _steady_snapshot(node: Node | NodeProcess | None) -> ResourceSnapshot:
    """A baseline taken once fds and tasks stop changing (tasks just spawned settle)."""
    gc.collect()
    last = snapshot(node)
    for _ in range(25):
        await anyio.sleep(0.01)
        now = snapshot(node)
        if (now.fds, now.tasks, now.connections) == (last.fds, last.tasks, last.connections):
            return now
        last = now
    return last


def _secret_of(node: Node | NodeProcess) -> str | None:
    if isinstance(node, Node):
        return node.config.shared_secret
    args = list(node.args)
    for i, arg in enumerate(args):
        if arg == "--shared-secret" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--shared-secret="):
            return arg.split("=", 1)[1]
    return None


async def health_probe(url: str, secret: str | None = None, *,
                       provider: TokenProvider | None = None, timeout: float = 5.0) -> None:
    """Prove a node serves a fresh client: connect, subscribe, echo.

    Two connections as ``probe/health/<unique>``: the first subscribes to a
    channel in its own namespace (allowed by the default subscribe ACL), the
    second publishes to it, the first echoes the payload back by unicast.

    :param secret: the node's shared secret (``None`` for a development-mode node).
    :param provider: makes the tokens instead (for nodes that verify JWTs); its
        subject must be allowed the names ``probe/health/<app>/<H(subject)>``.
    :raises AssertionError: when any step fails or takes over ``timeout`` seconds.
    """
    tag = f"probe-{os.getpid()}-{next(_probe_ids)}"

    def ident(role: str) -> tuple[str, Name]:
        p = provider or SharedSecretProvider(f"probe/health/{tag}-{role}",
                                             secret or _DEV_SECRET)
        return p.get_token(), Name("probe", "health", f"{tag}-{role}",
                                   instance_id_for(p.subject))

    chan = Name("probe", "health", f"{tag}-chan")
    payload = tag.encode()
    try:
        with anyio.fail_after(timeout):
            tok_a, name_a = ident("a")
            tok_b, name_b = ident("b")
            async with open_connection(url, name=name_a, token=tok_a) as a, \
                    open_connection(url, name=name_b, token=tok_b) as b:
                await a.send(Subscribe(name=chan, request_id=1))
                while True:
                    ack = await a.receive()
                    if isinstance(ack, SubscribeAck):
                        break
                assert ack.ok, f"probe subscribe refused: {ack.code} {ack.message}"
                await b.send(Publish(source=name_b, destination=chan, fanout=2,
                                     payload=payload))
                while True:
                    got = await a.receive()
                    if isinstance(got, Publish):
                        break
                assert got.payload == payload and got.source == name_b, got
                await a.send(Publish(source=name_a, destination=name_b, payload=payload[::-1]))
                while True:
                    echo = await b.receive()
                    if isinstance(echo, Publish):
                        break
                assert echo.payload == payload[::-1], echo
    except TimeoutError:
        raise AssertionError(f"health probe of {url} took over {timeout:g} s") from None
    except Exception as exc:
        if isinstance(exc, AssertionError):
            raise
        raise AssertionError(f"health probe of {url} failed: {exc!r}") from exc


@asynccontextmanager
async def resource_check(
    node: Node | NodeProcess,
    *,
    rss_slack_mb: float = 5,
    settle: float = 2.0,
    probe: bool = True,
    secret: str | None = None,
    provider: TokenProvider | None = None,
) -> AsyncIterator[ResourceSnapshot]:
    """Snapshot ``node`` on entry; on a clean exit assert nothing leaked and it still serves.

    Yields the baseline snapshot. See the module docstring for what is measured.

    :param rss_slack_mb: RSS growth tolerated above the baseline.
    :param settle: seconds allowed for the resources to come back.
    :param probe: run :func:`health_probe` (off for a node the test stopped).
    :param secret: for the probe; by default the node's ``shared_secret`` (in-process)
        or its ``--shared-secret`` argument (subprocess).
    :param provider: for the probe, instead of a secret (JWT nodes).
    :raises ResourceLeakError: when resources stay above the baseline.
    """
    baseline = await _steady_snapshot(node)
    yield baseline
    await wait_for_baseline(node, baseline, rss_slack_mb=rss_slack_mb, timeout=settle)
    if probe:
        await health_probe(node.url, secret if secret is not None else _secret_of(node),
                           provider=provider)
        await wait_for_baseline(node, baseline, rss_slack_mb=rss_slack_mb, timeout=settle)


@asynccontextmanager
async def process_check(*, rss_slack_mb: float = 5,
                        settle: float = 2.0) -> AsyncIterator[ResourceSnapshot]:
    """:func:`resource_check` for this process alone, without a node to probe.

    For scenarios that start *and stop* a node (or only run clients) inside
    the block: fds and tasks of this process must come back exactly, RSS
    within ``rss_slack_mb``.
    """
    baseline = await _steady_snapshot(None)
    yield baseline
    await wait_for_baseline(None, baseline, rss_slack_mb=rss_slack_mb, timeout=settle)
