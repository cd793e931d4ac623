"""F-7: a partition between two linked nodes, each in its own network namespace.

Topology (addresses from a random 10.231.X.0/24, interface names from a random tag)::

    root ns (this test's apps)
      |  veth 10.231.X.5/.6             veth 10.231.X.9/.10  |
    netns A: node A  ---- veth 10.231.X.1 <-> .2 ----  netns B: node B (links to A)

The apps reach their nodes over their own veth pairs, so the partition cuts only
the A-B link: ``iptables -A INPUT -i <a-b> -j DROP`` and ``-A OUTPUT -o <a-b> -j
DROP`` inside netns A (a silent partition; a blanket DROP would also cut the
node from its own apps), or ``ip link set <a-b> down`` (a hard one). The nodes
ping links every ``KEEPALIVE`` s (configurable; 0.5 s here instead of 5 s), so
the partition lasts ``SLIM_PARTITION_SECONDS`` (default 5 s) instead of 15.

Outcomes checked: node-local traffic is unaffected; both nodes mark the link
down within ``LINK_DOWN_LIMIT`` (three silent keepalives, seen at a ping tick:
up to four, plus 0.5 s); every cross-node reliable publish either succeeds
(possibly by retry) or reports a DeliveryError, the receiver sees no
duplicate and keeps order, and a gap it learns of arrives as MessageLostError;
after healing the link comes back, subscriptions made during the partition
resync within 5 s in both directions, and new publishes succeed. Then the apps
close and the nodes' fd counts return to their baseline.

Opt-in: ``pytest -m partition``; needs root, ``ip netns`` and (for the silent
variant) ``iptables``, else skipped with the reason. The silent variant runs on
asyncio, the hard one on trio (each takes about 10 s).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from node_lite import NoRouteError
from slim_agents import (
    App,
    DeliveryError,
    Handle,
    MessageLostError,
    Session,
    SessionClosedError,
    SessionConfig,
    open_app,
)
from tests.helpers import SECRET, unique, wait_until
from tests.reliability.matrix import gated

pytestmark = [pytest.mark.partition, pytest.mark.anyio, pytest.mark.timeout(180)]
_gate = gated("partition")

KEEPALIVE = 0.5
PARTITION = float(os.environ.get("SLIM_PARTITION_SECONDS", "5"))
RATE = 20.0  # messages/s on each stream
# Budget of a cross-node publish: 0.5 s x (6 retries + 1), shorter than the partition.
CONFIG = SessionConfig(timeout=0.5, max_retries=6)
# The node checks for silence when a ping is due: three silent intervals are seen
# at the fourth tick at the latest.
LINK_DOWN_LIMIT = 4 * KEEPALIVE + 0.5
LINK_UP = re.compile(r"link to \S+ \(conn \d+\) is up")
LINK_DOWN = re.compile(r"link to \S+ \(conn \d+\) is down")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"slimprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# -- the namespaces -------------------------------------------------------------------------


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    net: str = ""

    def __post_init__(self) -> None:
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        for _ in range(64):
            self.net = f"10.231.{secrets.randbelow(256)}"
            if f"{self.net}." not in used:
                break

    @property
    def ns_a(self) -> str:
        return f"slimA{self.tag}"

    @property
    def ns_b(self) -> str:
        return f"slimB{self.tag}"

    def iface(self, pair: str) -> str:
        return f"s{self.tag}{pair}"

    @property
    def link_a(self) -> str:
        """netns A's end of the A-B link."""
        return self.iface("ab")

    @property
    def addr_a(self) -> str:
        """Where node B dials node A."""
        return f"{self.net}.1"

    def app_addr(self, side: str) -> str:
        return f"{self.net}.6" if side == "a" else f"{self.net}.10"

    def create(self) -> None:
        a, b, n = self.ns_a, self.ns_b, self.net
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        for ns in (a, b):
            _ip("-n", ns, "link", "set", "lo", "up")
        # the A-B link
        _ip("link", "add", self.iface("ab"), "type", "veth", "peer", "name", self.iface("ba"))
        _ip("link", "set", self.iface("ab"), "netns", a)
        _ip("link", "set", self.iface("ba"), "netns", b)
        _ip("-n", a, "addr", "add", f"{n}.1/30", "dev", self.iface("ab"))
        _ip("-n", b, "addr", "add", f"{n}.2/30", "dev", self.iface("ba"))
        _ip("-n", a, "link", "set", self.iface("ab"), "up")
        _ip("-n", b, "link", "set", self.iface("ba"), "up")
        # the apps' paths from the root namespace
        for ns, side, host, inner in ((a, "a", 5, 6), (b, "b", 9, 10)):
            outside, inside = self.iface("h" + side), self.iface(side + "h")
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("addr", "add", f"{n}.{host}/30", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{n}.{inner}/30", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")

    def destroy(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for side in "ab":  # normally gone with their peers
            subprocess.run(["ip", "link", "del", self.iface("h" + side)], capture_output=True)

    def in_a(self, *cmd: str) -> None:
        done = subprocess.run(["ip", "netns", "exec", self.ns_a, *cmd], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {self.ns_a}: {done.stderr.strip()}")


@dataclass
class Partition:
    """How the A-B link is cut and healed."""

    name: str
    cut: Callable[[Topology], None]
    heal: Callable[[Topology], None]


def _iptables_cut(t: Topology) -> None:
    t.in_a("iptables", "-A", "INPUT", "-i", t.link_a, "-j", "DROP")
    t.in_a("iptables", "-A", "OUTPUT", "-o", t.link_a, "-j", "DROP")


def _iptables_heal(t: Topology) -> None:
    t.in_a("iptables", "-F")


def _link_down(t: Topology) -> None:
    _ip("-n", t.ns_a, "link", "set", t.link_a, "down")


def _link_up(t: Topology) -> None:
    _ip("-n", t.ns_a, "link", "set", t.link_a, "up")


SILENT = Partition("iptables DROP", _iptables_cut, _iptables_heal)
HARD = Partition("ip link set down", _link_down, _link_up)


# -- nodes in namespaces --------------------------------------------------------------------


class NsNode:
    """A ``python -m node_lite`` in a namespace, with its log lines collected."""

    def __init__(self, process: Process, endpoint: str) -> None:
        self.process = process
        self.port = int(endpoint.rpartition(":")[2])
        self.lines: list[tuple[float, str]] = []
        self._changed = anyio.Event()

    async def pump_log(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        async for chunk in self.process.stderr:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            now = time.monotonic()
            self.lines += [(now, line.decode(errors="replace")) for line in complete]
            self._changed.set()
            self._changed = anyio.Event()

    def mark(self) -> int:
        return len(self.lines)

    async def wait_log(self, pattern: re.Pattern[str], since: int, timeout: float) -> float:
        """Time (monotonic) of the first line matching ``pattern`` after mark ``since``."""
        with anyio.fail_after(timeout):
            while True:
                for at, line in self.lines[since:]:
                    if pattern.search(line):
                        return at
                await self._changed.wait()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@asynccontextmanager
async def ns_node(tg: Any, ns: str, node_id: str, tmp: Path, link: str | None = None
                  ) -> AsyncIterator[NsNode]:
    cfg = tmp / f"{node_id}.yaml"
    cfg.write_text(
        "tracing:\n  log_level: info\n"
        f"services:\n  {node_id}:\n"
        "    dataplane:\n      servers:\n        - endpoint: \"0.0.0.0:0\"\n"
        f"    auth:\n      shared_secret: \"{SECRET}\"\n"
        f"    limits:\n      keepalive: {KEEPALIVE}\n")
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "node_lite", "--config", str(cfg)]
    if link:
        cmd += ["--link", link]
    process = await anyio.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        buffered = b""
        with anyio.move_on_after(20):
            async for chunk in process.stdout:
                buffered += chunk
                if b"\n" in buffered:
                    break
        line = buffered.split(b"\n", 1)[0].decode(errors="replace")
        if not line.startswith("node_lite ready"):
            raise RuntimeError(f"node {node_id} in {ns} did not start: {line!r}")
        node = NsNode(process, line.split()[-1])
        tg.start_soon(node.pump_log)
        yield node
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()


# -- traffic --------------------------------------------------------------------------------


@dataclass
class Traffic:
    """One paced reliable stream and what its receiver saw."""

    sender: Session
    receiver: Session
    sent: list[tuple[int, float, Handle[Any]]] = field(default_factory=list)
    got: list[tuple[int, int, float]] = field(default_factory=list)  # seq, mid, latency
    lost: list[int] = field(default_factory=list)  # mids
    stop: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)

    async def send(self) -> None:
        start = time.perf_counter()
        seq = 0
        while True:
            delay = start + seq / RATE - time.perf_counter()
            if delay > 0:
                with anyio.move_on_after(delay):  # pacing the load, or stopped
                    await self.stop.wait()
            if self.stop.is_set():
                self.stopped.set()
                return
            now = time.perf_counter()
            payload = f"{seq}:{now!r}".encode()
            self.sent.append((seq, now, await self.sender.publish(payload)))
            seq += 1

    async def receive(self) -> None:
        while True:
            try:
                msg = await self.receiver.get_message()
            except MessageLostError as exc:
                self.lost.append(exc.message_id)
                continue
            except SessionClosedError:
                return
            seq, sent = msg.payload.decode().split(":")
            self.got.append((int(seq), msg.context.message_id,
                             time.perf_counter() - float(sent)))

    async def settle(self, timeout: float) -> list[tuple[int, float, bool]]:
        """Wait for every publish to resolve: (seq, sent at, acknowledged)."""
        out = []
        with anyio.fail_after(timeout):
            for seq, t_sent, h in self.sent:
                try:
                    await h
                    out.append((seq, t_sent, True))
                except DeliveryError:
                    out.append((seq, t_sent, False))
        return out

    def check_order(self) -> None:
        seqs = [s for s, _, _ in self.got]
        assert len(seqs) == len(set(seqs)), "a message was delivered twice"
        assert seqs == sorted(seqs), "messages out of order"
        mids = [m for _, m, _ in self.got]
        assert not set(mids) & set(self.lost), "a message both delivered and reported lost"
        if mids:
            # every id below the last delivered one was delivered or reported lost
            assert set(range(min(mids), max(mids) + 1)) <= set(mids) | set(self.lost)


async def open_session(sender: App, receiver: App, target: str, deadline: float
                       ) -> tuple[Session, Session, float]:
    """A session, retried while the receiver's route is unknown at the sender's node;
    also returns how long the route took to appear."""
    start = time.monotonic()
    with anyio.fail_after(deadline):
        while True:
            try:
                session = await sender.create_session(target, CONFIG)
                break
            except NoRouteError:
                await anyio.sleep(0.05)  # the subscription is still propagating
        return session, await receiver.listen_for_session(), time.monotonic() - start


async def app(stack: AsyncExitStack, name: str, host: str, port: int) -> App:
    return await stack.enter_async_context(
        open_app(f"org/ns/{name}", node=f"http://{host}:{port}", secret=SECRET))


# -- the test -------------------------------------------------------------------------------


@pytest.fixture
def topology() -> Any:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    t = Topology()
    try:
        t.create()
        yield t
    finally:
        t.destroy()


@pytest.mark.matrix("F-7")
@pytest.mark.parametrize(("partition", "anyio_backend"), [
    pytest.param(SILENT, "asyncio", id="iptables-asyncio"),
    pytest.param(HARD, "trio", id="linkdown-trio"),
])
async def test_partition_between_two_nodes(partition: Partition, topology: Topology,
                                           tmp_path: Path,
                                           record_property: Callable[[str, object], None]
                                           ) -> None:
    if partition is SILENT and shutil.which("iptables") is None:
        pytest.skip("needs iptables (apt-get install -y iptables)")
    t = topology
    fig: dict[str, Any] = {}
    async with anyio.create_task_group() as tg, AsyncExitStack() as nodes:
        na = await nodes.enter_async_context(ns_node(tg, t.ns_a, "A", tmp_path))
        nb = await nodes.enter_async_context(
            ns_node(tg, t.ns_b, "B", tmp_path, link=f"http://{t.addr_a}:{na.port}"))
        await na.wait_log(LINK_UP, 0, 15)
        await nb.wait_log(LINK_UP, 0, 15)
        fds = (na.fds(), nb.fds())
        host_a, host_b = t.app_addr("a"), t.app_addr("b")
        names = {k: unique(k) for k in ("a1", "a2", "a3", "b1", "b2")}
        async with AsyncExitStack() as stack:
            a1 = await app(stack, names["a1"], host_a, na.port)
            a2 = await app(stack, names["a2"], host_a, na.port)
            b1 = await app(stack, names["b1"], host_b, nb.port)
            local = Traffic(*(await open_session(a1, a2, f"org/ns/{names['a2']}", 10))[:2])
            cross = Traffic(*(await open_session(a1, b1, f"org/ns/{names['b1']}", 10))[:2])
            async with anyio.create_task_group() as traffic, AsyncExitStack() as late:
                for stream in (local, cross):
                    traffic.start_soon(stream.send)
                    traffic.start_soon(stream.receive)
                await anyio.sleep(1.0)  # traffic before the fault

                # -- cut ------------------------------------------------------------------
                marks = na.mark(), nb.mark()
                t_cut = time.monotonic()
                t_cut_perf = time.perf_counter()
                partition.cut(t)
                down = [await na.wait_log(LINK_DOWN, marks[0], LINK_DOWN_LIMIT + 5),
                        await nb.wait_log(LINK_DOWN, marks[1], LINK_DOWN_LIMIT + 5)]
                fig["link_down_s"] = max(down) - t_cut
                # subscriptions made on each side while the link is down
                b2 = await app(late, names["b2"], host_b, nb.port)
                a3 = await app(late, names["a3"], host_a, na.port)
                await anyio.sleep(max(0.0, t_cut + PARTITION - time.monotonic()))  # the fault

                # -- heal -----------------------------------------------------------------
                marks = na.mark(), nb.mark()
                t_heal = time.monotonic()
                partition.heal(t)
                up = [await na.wait_log(LINK_UP, marks[0], PARTITION + 20),
                      await nb.wait_log(LINK_UP, marks[1], PARTITION + 20)]
                fig["link_up_after_heal_s"] = max(up) - t_heal
                # remote subscriptions replayed: each new app is reachable from the other side
                _, _, fig["resync_a_to_b2_s"] = await open_session(
                    a1, b2, f"org/ns/{names['b2']}", 5)
                _, _, fig["resync_b2_to_a3_s"] = await open_session(
                    b2, a3, f"org/ns/{names['a3']}", 5)
                t_resynced = time.perf_counter()
                await anyio.sleep(1.5)  # traffic after the healing
                for stream in (local, cross):
                    stream.stop.set()
                    await stream.stopped.wait()
                budget = CONFIG.timeout * (CONFIG.max_retries + 1)  # type: ignore[operator]
                local_out = await local.settle(budget + 5)
                cross_out = await cross.settle(budget + 5)
                # acknowledged means in the receiver's inbox: let the readers take it
                acked = sum(ok for *_, ok in cross_out)
                await wait_until(lambda: len(local.got) >= len(local_out)
                                 and len(cross.got) >= acked, message="receivers drained")
                await late.aclose()
                traffic.cancel_scope.cancel()
        # every app closed: the nodes are back to their baseline (links up, no app)
        await wait_until(lambda: (na.fds(), nb.fds()) == fds, message="node fds at baseline")
        tg.cancel_scope.cancel()

    during = [ok for _, sent, ok in cross_out if t_cut_perf <= sent < t_resynced]
    after = [ok for _, sent, ok in cross_out if sent >= t_resynced]
    local_during = [lat for seq, _, lat in local.got
                    if local.sent[seq][1] >= t_cut_perf and local.sent[seq][1] < t_resynced]
    fig.update(
        local_sent=len(local_out), local_acked=sum(ok for *_, ok in local_out),
        local_max_latency_ms=1000 * max((lat for *_, lat in local.got), default=0.0),
        local_during_partition=len(local_during),
        cross_sent=len(cross_out), cross_acked=sum(ok for *_, ok in cross_out),
        cross_failed=sum(not ok for *_, ok in cross_out),
        cross_during_partition=len(during), cross_during_acked=sum(during),
        cross_after_acked=sum(after), cross_after=len(after),
        cross_received=len(cross.got), cross_reported_lost=len(cross.lost),
        sent=len(local_out) + len(cross_out), delivered=len(local.got) + len(cross.got),
        duplicates=sum(len(x.got) - len({g[0] for g in x.got}) for x in (local, cross)),
        lost=len(cross.lost))
    for k, v in fig.items():
        record_property(k, round(v, 3) if isinstance(v, float) else v)
    print(f"\nF-7 {partition.name}, {PARTITION:g} s:",
          ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in fig.items()))

    # node-local traffic went on: all acknowledged, each once, in order, no retry needed
    assert all(ok for *_, ok in local_out)
    local.check_order()
    assert len(local.got) == len(local_out)
    assert local_during and max(local_during) < 1.0
    # cross-node: each publish acknowledged or reported failed; no duplicate, in order
    cross.check_order()
    acked = {seq for seq, _, ok in cross_out if ok}
    assert acked <= {seq for seq, _, _ in cross.got}, "an acknowledged message never arrived"
    assert during, "no publish during the partition"
    assert after and all(after), "publishes after healing must succeed"
    # the link went down in time, and came back with its routes
    assert fig["link_down_s"] <= LINK_DOWN_LIMIT
    assert fig["resync_a_to_b2_s"] <= 5 and fig["resync_b2_to_a3_s"] <= 5
