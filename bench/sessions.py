"""Session benchmarks: apps and node in separate processes, node baseline in the same run.

    python bench/sessions.py                 # asyncio, 3 interleaved reps
    python bench/sessions.py --backend trio --reps 1

Measures p2p one-way messages/s (64 B, 1 KiB) best effort and reliable,
request/reply RTT, group fan-out to 8 and 32 members (deliveries/s), p2p
session setup time and invite time per member (members spread over one process per
CPU, and all 32 in one process for comparison). The baselines are the node
relaying pre-encoded frames between blocking sockets (bench/node.py's
sender and receiver; its ping and echo for the RTT), measured in the same run.
The RTT and its floor are measured twice: with the node's defaults, and with its
opt-in busy-poll (``--busy-poll``), which saves the node's wake-ups.
Targets: best-effort p2p >= 100 k msg/s at 64 B, reliable >= 50 k msg/s,
RTT p50 <= 300 us, fan-out to 32 >= 300 k deliveries/s.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import (
    Child,
    bench_parser,
    cpu_seconds,
    emit,
    fmt_rate,
    median,
    print_table,
    quiet_gate,
    spawn,
    spread,
)
from node_lite._util import run

HERE = os.path.abspath(__file__)
NODE_BENCH = os.path.join(os.path.dirname(HERE), "node.py")
SECRET = "bench-secret-that-is-long-enough-0123456789"
WARMUP = 0.3
WINDOW = 1.5
# A fan-out measures its sustained rate: until the node's backlogs and the members'
# socket buffers are full (32 of each), the moderator publishes flat out and takes
# CPU the members need; measured here, that start lasts about a second.
FANOUT_WARMUP = 2.0
# Members spread over one process per CPU, as a swarm would place them: in one process
# they share one interpreter, and one CPU.
MEMBER_PROCS = os.cpu_count() or 1


def _config(reliable: bool, group: bool = False):  # type: ignore[no-untyped-def]
    from slim_agents import SessionConfig

    kw = {"timeout": 1.0, "max_retries": 10} if reliable else {}
    return SessionConfig.group(**kw) if group else SessionConfig(**kw)


# -- roles (each runs in its own process) ----------------------------------------------


def role_receiver(url: str, name: str, backend: str) -> None:

    from slim_agents import open_app

    async def main() -> None:
        async with open_app(name, node=url, secret=SECRET) as app:
            emit("READY", {})
            session = await app.listen_for_session()
            await session.get_message()
            t_start = time.perf_counter()
            while time.perf_counter() - t_start < WARMUP:
                await session.get_message()
            count, t0 = 0, time.perf_counter()
            while (now := time.perf_counter()) - t0 < WINDOW:
                await session.get_message()
                count += 1
            emit("RESULT", {"rate": count / (now - t0)})

    run(main, backend=backend)


def role_sender(url: str, target: str, size: int, reliable: bool, backend: str) -> None:

    from slim_agents import SessionClosedError, open_app

    async def main() -> None:
        async with open_app("bench/ns/sender", node=url, secret=SECRET) as app:
            session = await app.create_session(target, _config(reliable))
            emit("READY", {})
            payload = b"x" * size
            try:
                while True:
                    await session.publish(payload)
            except SessionClosedError:
                pass

    run(main, backend=backend)


def role_echo(url: str, backend: str) -> None:

    from slim_agents import open_app

    async def main() -> None:
        async with open_app("bench/ns/echo", node=url, secret=SECRET) as app:
            emit("READY", {})
            session = await app.listen_for_session()
            async for msg in session:
                await session.publish_to(msg.context, msg.payload)

    run(main, backend=backend)


def role_pinger(url: str, reliable: bool, count: int, backend: str) -> None:

    from slim_agents import open_app

    async def main() -> None:
        async with open_app("bench/ns/pinger", node=url, secret=SECRET) as app:
            t0 = time.perf_counter()
            session = await app.create_session("bench/ns/echo", _config(reliable))
            setup = time.perf_counter() - t0
            samples = []
            for i in range(count + 200):
                t0 = time.perf_counter()
                await session.publish(b"p" * 64)
                await session.get_message()
                if i >= 200:
                    samples.append(time.perf_counter() - t0)
            samples.sort()
            emit("RESULT", {"p50": samples[len(samples) // 2] * 1e6,
                            "p99": samples[int(len(samples) * 0.99)] * 1e6,
                            "setup_ms": setup * 1e3})

    run(main, backend=backend)


def role_members(url: str, chan: str, n: int, backend: str, first: int = 0) -> None:
    """Members ``first`` to ``first + n - 1`` of a group, in one process; reports
    deliveries/s summed over them."""
    import anyio

    from slim_agents import open_app

    async def main() -> None:
        counts = [0] * n
        start = anyio.Event()
        stop_at = [0.0]

        async def member(i: int, app) -> None:  # type: ignore[no-untyped-def]
            session = await app.listen_for_session()
            await session.get_message()
            if not start.is_set():
                stop_at[0] = time.perf_counter() + FANOUT_WARMUP + WINDOW
                start.set()
            warm_end = stop_at[0] - WINDOW
            while time.perf_counter() < warm_end:
                await session.get_message()
            while time.perf_counter() < stop_at[0]:
                await session.get_message()
                counts[i] += 1

        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            apps = [await stack.enter_async_context(
                open_app(f"bench/ns/member{i}", node=url, secret=SECRET))
                for i in range(first, first + n)]
            emit("READY", {})
            async with anyio.create_task_group() as tg:
                for i, app in enumerate(apps):
                    tg.start_soon(member, i, app)
            stats = [s.statistics() for a in apps for s in a.sessions]
            emit("RESULT", {"rate": sum(counts) / WINDOW,
                            "dropped": sum(st["dropped"] for st in stats),
                            "duplicates": sum(st["duplicates"] for st in stats)})

    run(main, backend=backend)


def role_moderator(url: str, chan: str, n: int, reliable: bool, backend: str) -> None:

    from slim_agents import SessionClosedError, open_app

    async def main() -> None:
        async with open_app("bench/ns/moderator", node=url, secret=SECRET) as app:
            group = await app.create_session(chan, _config(reliable, group=True))
            t0 = time.perf_counter()
            for i in range(n):
                await group.invite(f"bench/ns/member{i}")
            invite_ms = (time.perf_counter() - t0) / n * 1e3
            emit("READY", {"invite_ms": invite_ms})
            payload = b"g" * 64
            try:
                while True:
                    await group.publish(payload)
            except SessionClosedError:
                pass

    run(main, backend=backend)


# -- driver -----------------------------------------------------------------------------


# The node's opt-in polling window (NodeConfig.busy_poll) of the RTT rows that use it.
BUSY_POLL = "300us"


def start_node(backend: str, busy_poll: str | None = None) -> tuple[Child, str]:
    child = spawn(["-m", "node_lite", "--endpoint", "127.0.0.1:0", "--backend", backend,
                   "--log-level", "warn", "--shared-secret", SECRET]
                  + (["--busy-poll", busy_poll] if busy_poll else []),
                  ready_prefix="node_lite ready ")
    return child, "http://" + child.ready["text"]


def _start_node_without_secret(backend: str, busy_poll: str | None = None
                               ) -> tuple[Child, str]:
    # bench/node.py's blocking clients send unsigned hellos: a node without a secret
    node = spawn(["-m", "node_lite", "--endpoint", "127.0.0.1:0", "--backend", backend,
                  "--log-level", "warn"] + (["--busy-poll", busy_poll] if busy_poll else []),
                 ready_prefix="node_lite ready ")
    return node, node.ready["text"].rsplit(":", 1)[1]


def run_baseline(backend: str, size: int) -> float:
    quiet_gate()
    node, port = _start_node_without_secret(backend)
    sink = spawn([NODE_BENCH, "role", "sink", "--port", port, "--size", str(size), "--node"])
    source = spawn([NODE_BENCH, "role", "source", "--port", port, "--size", str(size), "--node"])
    try:
        return float(sink.result()["rate"])
    finally:
        for c in (source, sink, node):
            c.stop()


def run_rtt_baseline(backend: str, count: int, busy_poll: str | None = None) -> float:
    """RTT p50 through the node between bench/node.py's blocking-socket ping and echo:
    the floor this machine sets under any client (two hops, four process wake-ups)."""
    quiet_gate()
    node, port = _start_node_without_secret(backend, busy_poll)
    echo = spawn([NODE_BENCH, "role", "echo", "--port", port, "--node"])
    ping = spawn([NODE_BENCH, "role", "ping", "--port", port, "--node", "--count", str(count)],
                 ready_prefix="RESULT ")
    try:
        return float(ping.ready["p50"])
    finally:
        for c in (ping, echo, node):
            c.stop()


# A node starter: backend -> (the node's child process, its URL). Other benchmarks
# run these workloads against other nodes (recording, upstream) through it.
NodeStarter = Callable[[str], tuple[Child, str]]


def run_p2p(backend: str, size: int, reliable: bool, *, start: NodeStarter | None = None,
            script: str = HERE, cpu: dict[str, float] | None = None) -> float:
    """Receiver messages/s of one sender; ``script`` provides the roles.

    ``cpu`` gets the CPU seconds each process (node, receiver, sender) used per
    message received, from all three ready to the result.
    """
    quiet_gate()
    node, url = (start or start_node)(backend)
    recv = spawn([script, "role", "receiver", "--url", url, "--name", "bench/ns/receiver",
                  "--backend", backend])
    send = spawn([script, "role", "sender", "--url", url, "--target", "bench/ns/receiver",
                  "--size", str(size), "--backend", backend]
                 + (["--reliable"] if reliable else []))
    procs = {"node": node, "receiver": recv, "sender": send}
    try:
        before = {k: cpu_seconds(c.proc.pid) for k, c in procs.items()}
        t0 = time.perf_counter()
        rate = float(recv.result()["rate"])
        if cpu is not None:
            received = rate * (time.perf_counter() - t0)
            for k, c in procs.items():
                cpu[k] = (cpu_seconds(c.proc.pid) - before[k]) / received
        return rate
    finally:
        for c in (send, recv, node):
            c.stop()


def run_rtt(backend: str, reliable: bool, count: int, busy_poll: str | None = None
            ) -> dict[str, float]:
    quiet_gate()
    node, url = start_node(backend, busy_poll)
    echo = spawn([HERE, "role", "echo", "--url", url, "--backend", backend])
    ping = spawn([HERE, "role", "pinger", "--url", url, "--count", str(count),
                  "--backend", backend] + (["--reliable"] if reliable else []),
                 ready_prefix="RESULT ")
    try:
        return {k: float(v) for k, v in ping.ready.items()}
    finally:
        for c in (ping, echo, node):
            c.stop()


def run_fanout(backend: str, n: int, reliable: bool, *, procs: int = 1,
               start: NodeStarter | None = None, script: str = HERE) -> tuple[float, float]:
    """Deliveries/s summed over ``n`` members (spread over ``procs`` processes), and
    invite ms per member."""
    quiet_gate()
    node, url = (start or start_node)(backend)
    chan = "bench/ns/chan"
    members = []
    for p in range(procs):
        first, last = n * p // procs, n * (p + 1) // procs
        members.append(spawn([script, "role", "members", "--url", url, "--chan", chan,
                              "--n", str(last - first), "--first", str(first),
                              "--backend", backend]))
    mod = spawn([script, "role", "moderator", "--url", url, "--chan", chan, "--n", str(n),
                 "--backend", backend] + (["--reliable"] if reliable else []), timeout=120)
    try:
        results = [m.result(timeout=120) for m in members]
        duplicates = sum(r.get("duplicates", 0) for r in results)
        if duplicates:  # resent before the acks came back: wasted work
            print(f"  fan-out to {n}: members received {duplicates} duplicate copies",
                  file=sys.stderr)
        return sum(float(r["rate"]) for r in results), float(mod.ready["invite_ms"])
    finally:
        for c in (mod, *members, node):
            c.stop()


def main() -> None:
    parser, role = bench_parser(__doc__)
    role.add_argument("--name", dest="app_name")
    role.add_argument("--target")
    role.add_argument("--chan")
    role.add_argument("--n", type=int, default=8)
    role.add_argument("--first", type=int, default=0)
    role.add_argument("--size", type=int, default=64)
    role.add_argument("--count", type=int, default=2000)
    role.add_argument("--reliable", action="store_true")
    args = parser.parse_args()
    if args.cmd == "role":
        b = args.backend
        {"receiver": lambda: role_receiver(args.url, args.app_name, b),
         "sender": lambda: role_sender(args.url, args.target, args.size, args.reliable, b),
         "echo": lambda: role_echo(args.url, b),
         "pinger": lambda: role_pinger(args.url, args.reliable, args.count, b),
         "members": lambda: role_members(args.url, args.chan, args.n, b, args.first),
         "moderator": lambda: role_moderator(args.url, args.chan, args.n, args.reliable, b),
         }[args.name]()
        return

    backend = args.backend
    print(f"slim_agents sessions, backend {backend}, {args.reps} interleaved reps, "
          f"{os.cpu_count()} CPUs; apps and node in separate processes")
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    for rep in range(args.reps):
        for size in (64, 1024):
            add(f"base{size}", run_baseline(backend, size))
            add(f"be{size}", run_p2p(backend, size, reliable=False))
            add(f"rel{size}", run_p2p(backend, size, reliable=True))
        for poll in ("", "bp"):
            busy_poll = BUSY_POLL if poll else None
            add(f"rttbase{poll}", run_rtt_baseline(backend, 2000, busy_poll))
            for reliable in (False, True):
                r = run_rtt(backend, reliable, 2000, busy_poll)
                tag = ("rel" if reliable else "be") + poll
                add(f"rtt50{tag}", r["p50"])
                add(f"rtt99{tag}", r["p99"])
                add(f"setup{tag}", r["setup_ms"])
        for n in (8, 32):
            for reliable in (False, True):
                rate, invite = run_fanout(backend, n, reliable, procs=MEMBER_PROCS)
                tag = "rel" if reliable else "be"
                add(f"fan{n}{tag}", rate)
                add(f"inv{n}{tag}", invite)
        if MEMBER_PROCS > 1:
            add("fan32be1", run_fanout(backend, 32, False)[0])
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)

    def cell(key: str, unit: str = "/s") -> str:
        v = res[key]
        return f"{fmt_rate(median(v))}{unit} ±{spread(v):.0%}"

    rows = []
    for size in (64, 1024):
        base = median(res[f"base{size}"])
        for tag, label, target in (("be", "best effort", 100e3), ("rel", "reliable", 50e3)):
            v = median(res[f"{tag}{size}"])
            ok = "" if size != 64 else ("ok" if v >= target else f"BELOW {fmt_rate(target)}")
            rows.append([f"{size} B", label, cell(f"{tag}{size}"), cell(f"base{size}"),
                         f"{v / base:.2f}x", ok])
    print_table("P2P one-way messages/s (receiver side)",
                ["payload", "mode", "session", "node baseline (raw frames)", "ratio",
                 "target"], rows)
    rows = []
    for poll, node in (("", ""), ("bp", f", node busy-poll {BUSY_POLL}")):
        floor = median(res[f"rttbase{poll}"])
        for mode, label in (("be", "best effort"), ("rel", "reliable")):
            tag = mode + poll
            p50 = median(res[f"rtt50{tag}"])
            rows.append([label + node, f"{p50:.0f}", f"{median(res[f'rtt99{tag}']):.0f}",
                         f"{floor:.0f}", "ok" if p50 <= 300 else "ABOVE 300 us",
                         f"{median(res[f'setup{tag}']):.2f} ms"])
    print_table("Request/reply RTT (µs, 64 B) and p2p session setup",
                ["mode", "p50", "p99", "node floor p50 (blocking clients)",
                 "target p50 <= 300 µs", "setup"], rows)
    rows = []
    for n in (8, 32):
        for tag, label in (("be", "best effort"), ("rel", "reliable")):
            v = median(res[f"fan{n}{tag}"])
            ok = "" if n != 32 else ("ok" if v >= 300e3 else "BELOW 300 k")
            rows.append([str(n), label, cell(f"fan{n}{tag}"),
                         f"{median(res[f'inv{n}{tag}']):.2f} ms", ok])
    if MEMBER_PROCS > 1:
        rows.append(["32", "best effort, all in 1 process", cell("fan32be1"), "", ""])
    print_table(f"Group fan-out (deliveries/s summed over members, spread over {MEMBER_PROCS} "
                "processes) and invite time per member",
                ["members", "mode", "deliveries/s", "invite/member", "target (32)"], rows)


if __name__ == "__main__":
    main()
