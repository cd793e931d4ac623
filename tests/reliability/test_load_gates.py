"""Load gates of the reliability anchors (section 3.5): G-load-CI, G-group-CI, G-2node-CI.

Opt-in: skipped unless ``-m`` names ``load`` (``pytest -m load``); ``.ci/run`` runs
them after the default suite, alone, so the figures describe a quiet box.
``SLIM_LOAD_SECONDS`` sets each gate's duration (default 60; 3 for a smoke run).

Nodes run in their own processes (``open_node_process``); the apps share the
test's event loop, on asyncio only (the trio path is covered by the functional
tests; a gate measures one configuration). Sends are paced on a fixed schedule
and latency counts from the scheduled slot, so a late sender shows up as latency
instead of hiding it. Figures go to ``record_property`` and to stdout.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from anyio.abc import Process

from node_lite import NodeProcess, NoRouteError, open_node_process
from slim_agents import (
    App,
    DecryptError,
    DeliveryError,
    Handle,
    MessageLostError,
    Session,
    SessionClosedError,
    SessionConfig,
    open_app,
)
from tests.helpers import SECRET, unique
from tests.reliability.matrix import gated

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20
SECONDS = float(os.environ.get("SLIM_LOAD_SECONDS", "60"))

pytestmark = [pytest.mark.load, pytest.mark.anyio, pytest.mark.timeout(2 * SECONDS + 120)]
_gate = gated("load")
SIZE = 256
# Sequence number and scheduled send time (perf_counter: the apps share one process).
HEAD = struct.Struct(">Id")
PAD = bytes(SIZE - HEAD.size)
RELIABLE = {"timeout": 1.0, "max_retries": 10}
NODE_ARGS = ("--endpoint", "127.0.0.1:0", "--shared-secret", SECRET, "--log-level", "warn")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- measuring --------------------------------------------------------------------------


def rss(node: NodeProcess) -> int:
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Stream:
    """What one receiver got from one sender: order, duplicates, latency."""

    expected: int
    seen: bytearray = field(init=False)
    next: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    latencies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen = bytearray(self.expected)

    def take(self, payload: bytes, now: float) -> None:
        seq, due = HEAD.unpack_from(payload)
        if self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.delivered += 1
        if seq != self.next:
            self.out_of_order += 1
        self.next = max(self.next, seq + 1)
        self.latencies.append(now - due)


@dataclass
class Receiver:
    """Drains one session, sorting messages by sender."""

    streams: dict[str, Stream]
    expected: int
    lost: int = 0
    decrypt_errors: int = 0
    other_errors: list[BaseException] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)

    @property
    def delivered(self) -> int:
        return sum(s.delivered for s in self.streams.values())

    async def run(self, session: Session) -> None:
        while True:
            try:
                msg = await session.get_message()
            except MessageLostError:
                self.lost += 1
                continue
            except DecryptError:
                self.decrypt_errors += 1
                continue
            except SessionClosedError:
                return
            stream = self.streams.get(str(msg.context.source_name.without_id()))
            if stream is None:
                self.other_errors.append(AssertionError(f"from {msg.context.source_name}"))
                continue
            stream.take(msg.payload, time.perf_counter())
            if self.delivered >= self.expected:
                self.done.set()


def box_ticks() -> list[int]:
    """The machine's CPU time by state (the ``cpu`` line of /proc/stat)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def steal_pct(before: list[int], after: list[int]) -> float:
    """Share of the box's CPU time the hypervisor gave to other guests (``steal``)."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return 100 * delta[7] / max(1, sum(delta[:8]))


def cpu_seconds(node: NodeProcess) -> float:
    fields = Path(f"/proc/{node.process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Usage:
    """Peak RSS of node processes (sampled every 200 ms while traffic runs), and the
    CPU share of the nodes and of this process (the apps) over the run."""

    def __init__(self, *nodes: NodeProcess) -> None:
        self.nodes = nodes
        self.base = [rss(n) for n in nodes]
        self.peak = list(self.base)
        self.t0 = time.perf_counter()
        self.cpu0 = [cpu_seconds(n) for n in nodes]
        self.apps0 = time.process_time()
        self.box0 = box_ticks()

    def cpu(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out = {"apps_cpu_pct": 100 * (time.process_time() - self.apps0) / wall,
               "steal_pct": steal_pct(self.box0, box_ticks())}
        for i, (n, c0) in enumerate(zip(self.nodes, self.cpu0, strict=True)):
            out[f"node{i if len(self.nodes) > 1 else ''}_cpu_pct"] = \
                100 * (cpu_seconds(n) - c0) / wall
        return out

    async def run(self) -> None:
        while True:
            await anyio.sleep(0.2)
            self.sample()

    def sample(self) -> list[int]:
        now = [rss(n) for n in self.nodes]
        self.peak = [max(a, b) for a, b in zip(self.peak, now, strict=True)]
        return now

    def growth_mb(self) -> float:
        return max((p - b) / MB for p, b in zip(self.peak, self.base, strict=True))


async def paced(rate: float, seconds: float, send: Callable[[int, float], Awaitable[None]],
                *, start: float | None = None) -> float:
    """Call ``send(i, due)`` on a fixed schedule from ``start`` (default now); return
    the worst lag behind it (s)."""
    start = time.perf_counter() if start is None else start
    worst = 0.0
    for i in range(round(rate * seconds)):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        else:
            worst = max(worst, -delay)
        await send(i, due)
    return worst


class Outcomes:
    """Awaits publish handles in order as they come, so only those in flight stay alive
    (60 000 kept handles would slow this process's garbage collector)."""

    def __init__(self, capacity: int) -> None:
        self.queue, self._pending = anyio.create_memory_object_stream[Handle[Any]](capacity)
        self.acked = self.failed = 0
        self.done = anyio.Event()

    async def run(self) -> None:
        async with self._pending:
            async for handle in self._pending:
                try:
                    await handle
                    self.acked += 1
                except DeliveryError:
                    self.failed += 1
        self.done.set()

    async def finish(self, timeout: float) -> tuple[int, int]:
        """(acknowledged, failed) once every handle has resolved."""
        self.queue.close()
        with anyio.fail_after(timeout):
            await self.done.wait()
        return self.acked, self.failed


def report(record: Callable[[str, object], None], gate: str, **figures: object) -> None:
    # the box's 5-minute load average: context for latencies on shared cores
    figures["load_avg_5min"] = float(Path("/proc/loadavg").read_text().split()[1])
    for k, v in figures.items():
        record(k, round(v, 2) if isinstance(v, float) else v)
    shown = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in figures.items())
    print(f"\n{gate} ({SECONDS:g} s): {shown}")


# -- set-up -----------------------------------------------------------------------------


async def apps(stack: AsyncExitStack, url: str, *names: str) -> list[App]:
    return [await stack.enter_async_context(open_app(f"org/ns/{n}", node=url, secret=SECRET))
            for n in names]


async def p2p(sender: App, receiver: App, target: str, config: SessionConfig
              ) -> tuple[Session, Session]:
    """A session from ``sender`` to ``target``; retried while the route propagates."""
    with anyio.fail_after(20):
        while True:
            try:
                session = await sender.create_session(target, config)
                break
            except NoRouteError:
                await anyio.sleep(0.05)  # a remote subscription is still on its way
        return session, await receiver.listen_for_session()


async def stream_load(sender: Session, receiver: Session, rate: float
                      ) -> tuple[Stream, Receiver, tuple[int, int], float]:
    """Paced reliable traffic: what arrived, (acked, failed) and the sender's lag."""
    n = round(rate * SECONDS)
    stream = Stream(n)
    rx = Receiver({str(sender.src.without_id()): stream}, n)
    out = Outcomes(n)

    async def send(i: int, due: float) -> None:
        out.queue.send_nowait(await sender.publish(HEAD.pack(i, due) + PAD))

    async with anyio.create_task_group() as tg:
        tg.start_soon(rx.run, receiver)
        tg.start_soon(out.run)
        lag = await paced(rate, SECONDS, send)
        with anyio.move_on_after(30):
            await rx.done.wait()
        results = await out.finish(30)
        tg.cancel_scope.cancel()
    return stream, rx, results, lag


# -- G-load-CI --------------------------------------------------------------------------


@pytest.mark.matrix("G-load-CI")
@pytest.mark.parametrize("e2e", [False, True], ids=["plain", "e2e"])
async def test_g_load_ci_reliable_p2p_1000_per_second(
        e2e: bool, record_property: Callable[[str, object], None]) -> None:
    rate = 1000.0
    n = round(rate * SECONDS)

    async def measure() -> float:
        async with open_node_process(NODE_ARGS) as node, AsyncExitStack() as stack:
            names = unique("load-tx"), unique("load-rx")
            tx, rx_app = await apps(stack, node.url, *names)
            session, incoming = await p2p(tx, rx_app, f"org/ns/{names[1]}",
                                          SessionConfig(mls_enabled=e2e, **RELIABLE))
            sampler = Usage(node)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler.run)
                stream, rx, (acked, failed), lag = await stream_load(session, incoming, rate)
                cpu = sampler.cpu()
                sampler.sample()
                tg.cancel_scope.cancel()
        p99 = percentile(stream.latencies, 99) * 1000
        report(record_property, f"G-load-CI[{'e2e' if e2e else 'plain'}]",
               sent=n, expected=n, delivered=stream.delivered, duplicates=stream.duplicates,
               lost=n - stream.delivered, out_of_order=stream.out_of_order, acked=acked,
               failed=failed, p50_ms=percentile(stream.latencies, 50) * 1000, p99_ms=p99,
               max_ms=max(stream.latencies, default=math.nan) * 1000,
               sender_lag_ms=lag * 1000, node_rss_growth_mb=sampler.growth_mb(), **cpu)
        assert stream.delivered == n and acked == n, (stream.delivered, acked, n)
        assert stream.duplicates == 0 and stream.out_of_order == 0 and rx.lost == 0
        assert not rx.other_errors and rx.decrypt_errors == 0
        assert sampler.growth_mb() <= 20, f"node RSS grew {sampler.growth_mb():.1f} MB > 20 MB"
        return p99

    await latency_gate(measure, 50)


def latency_enforced() -> bool:
    """Whether a p99 figure says something about this code: not on a box with a load
    average above 1.5 per CPU (other jobs here), unless ``SLIM_LOAD_STRICT=1``.
    (Steal time is reported, not used: here it ran 2-15 % in runs with p99 under 10 ms.)"""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 1.5 * cpus and os.environ.get("SLIM_LOAD_STRICT") != "1":
        print(f"p99 reported, not enforced: load average {load:.1f} on {cpus} CPUs")
        return False
    return True


async def latency_gate(measure: Callable[[], Awaitable[float]], limit: float) -> None:
    """The p99 gate. ``measure`` runs the load once, reports its figures, asserts what
    every run must meet (no loss, no duplicates, order) and returns its p99 in ms.

    A run that misses ``limit`` is measured once more and the second run decides (not
    under ``SLIM_LOAD_STRICT=1``). A host's burst can slow this shared box for a minute
    (seen once in CI: p50 3.0 ms against the usual 0.7-1.0, p99 206 ms, while the apps
    used 60 % of a CPU as in good runs); a slower code path misses twice."""
    p99 = await measure()
    if p99 <= limit or not latency_enforced():
        return
    if os.environ.get("SLIM_LOAD_STRICT") != "1":
        print(f"p99 {p99:.1f} ms > {limit:g} ms: measuring once more")
        p99 = await measure()
        if p99 <= limit or not latency_enforced():
            return
    raise AssertionError(f"p99 {p99:.1f} ms > {limit:g} ms "
                         f"(load average {os.getloadavg()[0]:.1f})")


# -- G-group-CI -------------------------------------------------------------------------
# Ten members in two processes (this one, with the moderator, and a helper), as members
# are separate programs in practice: one event loop for all ten would measure that loop.

MEMBERS, PER_MEMBER = 10, 50.0
GROUP_CONFIG = SessionConfig.group(mls_enabled=True, **RELIABLE)


async def run_members(sessions: list[Session], mine: list[int], names: list[str],
                      start: float) -> dict[str, Any]:
    """Members ``mine`` (indices in ``names``) send on schedule from ``start`` and read
    everything the others send; returns their figures."""
    n = round(PER_MEMBER * SECONDS)
    receivers = [Receiver({f"org/ns/{o}": Stream(n) for o in names if o != names[k]},
                          n * (len(names) - 1)) for k in mine]
    outs = [Outcomes(n) for _ in mine]
    lags: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()

    async def sender(j: int, k: int) -> None:
        async def send(i: int, due: float) -> None:
            outs[j].queue.send_nowait(await sessions[j].publish(HEAD.pack(i, due) + PAD))

        lags.append(await paced(PER_MEMBER, SECONDS, send,
                                start=start + k / (PER_MEMBER * len(names))))

    async with anyio.create_task_group() as tg:
        for r, session, out in zip(receivers, sessions, outs, strict=True):
            tg.start_soon(r.run, session)
            tg.start_soon(out.run)
        async with anyio.create_task_group() as senders:
            for j, k in enumerate(mine):
                senders.start_soon(sender, j, k)
        with anyio.move_on_after(30):
            for r in receivers:
                await r.done.wait()
        results = [await out.finish(30) for out in outs]
        tg.cancel_scope.cancel()
    streams = [s for r in receivers for s in r.streams.values()]
    return {
        "delivered": sum(s.delivered for s in streams),
        "duplicates": sum(s.duplicates for s in streams),
        "out_of_order": sum(s.out_of_order for s in streams),
        "decrypt_errors": sum(r.decrypt_errors for r in receivers),
        "lost": sum(r.lost for r in receivers),
        "other_errors": sum(len(r.other_errors) for r in receivers),
        "acked": sum(a for a, _ in results), "failed": sum(f for _, f in results),
        "lag": max(lags), "latencies": [round(x, 6) for s in streams for x in s.latencies],
        "cpu_pct": 100 * (time.process_time() - cpu0) / (time.perf_counter() - wall0),
    }


def group_member_process() -> None:
    """Entry point of G-group-CI's helper process (argv[1]: JSON url, names, mine)."""
    args = json.loads(sys.argv[1])
    anyio.run(_group_members, args["url"], args["names"], args["mine"])


async def _group_members(url: str, names: list[str], mine: list[int]) -> None:
    async with AsyncExitStack() as stack:
        mine_apps = await apps(stack, url, *(names[k] for k in mine))
        print("ready", flush=True)
        sessions = [await a.listen_for_session() for a in mine_apps]
        for s in sessions:
            await s.wait_participants(len(names))
        print("joined", flush=True)
        start = float((await anyio.to_thread.run_sync(sys.stdin.readline)).split()[1])
        result = await run_members(sessions, mine, names, start)
        print(json.dumps(result), flush=True)


async def stop(process: Process) -> None:
    """Reap a helper: it exits once done; killed if it does not within 10 s."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
        await process.aclose()


class Lines:
    """Lines from a child's stdout."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            self.buffer += await self.stream.receive()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


@pytest.mark.matrix("G-group-CI")
async def test_g_group_ci_encrypted_group_of_ten_500_per_second(
        record_property: Callable[[str, object], None]) -> None:
    async def measure() -> float:
        n = round(PER_MEMBER * SECONDS)
        chan = f"org/ns/{unique('load-chan')}"
        names = [unique(f"load-m{i}") for i in range(MEMBERS)]
        here, there = list(range(MEMBERS // 2)), list(range(MEMBERS // 2, MEMBERS))
        async with open_node_process(NODE_ARGS) as node, AsyncExitStack() as stack:
            helper = await anyio.open_process(
                [sys.executable, "-c", "from tests.reliability.test_load_gates import "
                 "group_member_process as main; main()",
                 json.dumps({"url": node.url, "names": names, "mine": there})],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, cwd=ROOT)
            stack.push_async_callback(stop, helper)
            lines = Lines(helper)
            ours = await apps(stack, node.url, *(names[k] for k in here))
            with anyio.fail_after(60):
                assert await lines.next() == "ready"
                moderator = await ours[0].create_session(chan, GROUP_CONFIG)
                sessions = [moderator]
                for k in range(1, MEMBERS):
                    await moderator.invite(f"org/ns/{names[k]}")
                    if k in here:
                        sessions.append(await ours[k].listen_for_session())
                for s in sessions:
                    await s.wait_participants(MEMBERS)
                assert await lines.next() == "joined"
            keys = {s.encryption.authenticator for s in sessions}  # type: ignore[union-attr]
            assert len(keys) == 1
            sampler = Usage(node)
            start = time.perf_counter() + 0.5  # CLOCK_MONOTONIC: one clock for both processes
            assert helper.stdin is not None
            await helper.stdin.send(f"go {start!r}\n".encode())
            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler.run)
                local = await run_members(sessions, here, names, start)
                with anyio.fail_after(60):
                    remote = json.loads(await lines.next())
                cpu = sampler.cpu()
                tg.cancel_scope.cancel()
        parts = (local, remote)
        latencies = local["latencies"] + remote["latencies"]
        expected = n * MEMBERS * (MEMBERS - 1)
        total = {k: sum(p[k] for p in parts) for k in (
            "delivered", "duplicates", "out_of_order", "decrypt_errors", "lost", "other_errors",
            "acked", "failed")}
        p99 = percentile(latencies, 99) * 1000
        report(record_property, "G-group-CI", sent=n * MEMBERS, expected=expected,
               delivered=total["delivered"], duplicates=total["duplicates"],
               lost=expected - total["delivered"], lost_reported=total["lost"],
               out_of_order=total["out_of_order"], decrypt_errors=total["decrypt_errors"],
               acked=total["acked"], failed=total["failed"],
               p50_ms=percentile(latencies, 50) * 1000, p99_ms=p99,
               max_ms=max(latencies, default=math.nan) * 1000,
               sender_lag_ms=max(p["lag"] for p in parts) * 1000,
               node_rss_growth_mb=sampler.growth_mb(), apps_cpu_pct=local["cpu_pct"],
               helper_cpu_pct=remote["cpu_pct"], node_cpu_pct=cpu["node_cpu_pct"],
               steal_pct=cpu["steal_pct"])
        assert total["delivered"] == expected, (total["delivered"], expected)
        assert total["duplicates"] == total["out_of_order"] == 0
        assert total["decrypt_errors"] == total["lost"] == total["other_errors"] == 0
        assert total["acked"] == n * MEMBERS
        return p99

    await latency_gate(measure, 100)


# -- G-2node-CI -------------------------------------------------------------------------


@pytest.mark.matrix("G-2node-CI")
async def test_g_2node_ci_publisher_and_subscriber_on_linked_nodes(
        record_property: Callable[[str, object], None]) -> None:
    rate = 1000.0
    async with open_node_process((*NODE_ARGS, "--node-id", unique("node-a"))) as a, \
            open_node_process((*NODE_ARGS, "--node-id", unique("node-b"), "--link", a.url)) as b, \
            AsyncExitStack() as stack:
        tx_name, rx_name = unique("load2-tx"), unique("load2-rx")
        (tx,), (rx_app,) = await apps(stack, a.url, tx_name), await apps(stack, b.url, rx_name)
        session, incoming = await p2p(tx, rx_app, f"org/ns/{rx_name}",
                                      SessionConfig(**RELIABLE))
        sampler = Usage(a, b)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            stream, rx, (acked, failed), lag = await stream_load(session, incoming, rate)
            cpu = sampler.cpu()
            tg.cancel_scope.cancel()
    n = round(rate * SECONDS)
    report(record_property, "G-2node-CI", sent=n, expected=n, delivered=stream.delivered,
           duplicates=stream.duplicates, lost=n - stream.delivered,
           out_of_order=stream.out_of_order, acked=acked, failed=failed,
           p50_ms=percentile(stream.latencies, 50) * 1000,
           p99_ms=percentile(stream.latencies, 99) * 1000,
           max_ms=max(stream.latencies, default=math.nan) * 1000, sender_lag_ms=lag * 1000,
           node_rss_growth_mb=sampler.growth_mb(), **cpu)
    assert stream.delivered == n and stream.duplicates == 0, (stream.delivered, n)
    assert stream.out_of_order == 0 and rx.lost == 0 and acked == n
