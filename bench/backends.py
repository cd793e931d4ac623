"""The same session workloads on node_lite and on upstream SLIM (slim-bindings), one run.

    python bench/backends.py                 # asyncio, 3 interleaved reps
    python bench/backends.py --backend trio --reps 1

Every workload runs once per network with the same slim-agents code (the roles of
bench/sessions.py, or the pinger here): only the node URL differs, ``http://``
for a node_lite node, ``slim://`` for an upstream node. Apps and node run in
separate processes on both; the upstream node is a slim_bindings Service serving
from its own Python process (role ``upstream-node``), each upstream app brings its
own Service (data plane) into its process.

Measures p2p one-way messages/s (64 B, 1 KiB) best effort and reliable, request/reply
RTT and session setup, group fan-out to 8 members (deliveries/s summed over members)
and invite time per member. Ratios are upstream / node_lite (above 1: upstream is
faster for rates, slower for times).
"""

from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import sessions
from bench._harness import (
    Child,
    bench_parser,
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
SECRET = sessions.SECRET
NETWORKS = ("node_lite", "upstream")
# Request/reply samples: at most this many, within this many seconds (upstream's
# reliable round trip is slow enough that a fixed count would take minutes).
RTT_COUNT = 2000
RTT_WARMUP = 20
RTT_WINDOW = 3.0
FANOUT = 8


def _with_upstream_plugin() -> None:
    """Let slim:// URLs reach the upstream backend when its entry point is not installed."""
    from slim_agents._plugins import plugin_manager
    from slim_agents_plugins import _hooks

    pm = plugin_manager()
    if pm.get_plugin("upstream") is None and _hooks.upstream not in pm.get_plugins():
        pm.register(_hooks.upstream, name="upstream")


# -- roles (each runs in its own process) ----------------------------------------------


def role_upstream_node() -> None:
    import threading

    from slim_agents_plugins.upstream import UpstreamServer

    with UpstreamServer() as server:
        emit("READY", {"url": server.url})
        threading.Event().wait()  # serves from upstream's threads until terminated


def role_pinger(url: str, reliable: bool, backend: str) -> None:

    from slim_agents import open_app

    async def main() -> None:
        async with open_app("bench/ns/pinger", node=url, secret=SECRET) as app:
            t0 = time.perf_counter()
            session = await app.create_session("bench/ns/echo", sessions._config(reliable))
            setup = time.perf_counter() - t0
            samples: list[float] = []
            deadline = time.perf_counter() + RTT_WINDOW
            for i in range(RTT_COUNT + RTT_WARMUP):
                t0 = time.perf_counter()
                await session.publish(b"p" * 64)
                await session.get_message()
                if i >= RTT_WARMUP:
                    samples.append(time.perf_counter() - t0)
                    if t0 > deadline:
                        break
            samples.sort()
            emit("RESULT", {"p50": samples[len(samples) // 2] * 1e6,
                            "p99": samples[int(len(samples) * 0.99)] * 1e6,
                            "setup_ms": setup * 1e3, "samples": len(samples)})

    run(main, backend=backend)


# -- driver -----------------------------------------------------------------------------


def start_network(network: str, backend: str) -> tuple[Child, str]:
    if network == "node_lite":
        child, url = sessions.start_node(backend)
        return child, url
    child = spawn([HERE, "role", "upstream-node"])
    return child, str(child.ready["url"])


def _role(name: str, url: str, backend: str, *extra: str) -> list[str]:
    return [HERE, "role", name, "--url", url, "--backend", backend, *extra]


def run_p2p(network: str, backend: str, size: int, reliable: bool) -> float:
    return sessions.run_p2p(backend, size, reliable, script=HERE,
                            start=functools.partial(start_network, network))


def run_rtt(network: str, backend: str, reliable: bool) -> dict[str, float]:
    quiet_gate()
    node, url = start_network(network, backend)
    echo = spawn(_role("echo", url, backend))
    ping = spawn(_role("pinger", url, backend, *(["--reliable"] if reliable else [])),
                 ready_prefix="RESULT ", timeout=120)
    try:
        return {k: float(v) for k, v in ping.ready.items()}
    finally:
        for c in (ping, echo, node):
            c.stop()


def run_fanout(network: str, backend: str, n: int, reliable: bool) -> tuple[float, float]:
    return sessions.run_fanout(backend, n, reliable, script=HERE,
                               start=functools.partial(start_network, network))


def main() -> None:
    parser, role = bench_parser(__doc__)
    role.add_argument("--name", dest="app_name")
    role.add_argument("--target")
    role.add_argument("--chan")
    role.add_argument("--n", type=int, default=FANOUT)
    role.add_argument("--first", type=int, default=0)
    role.add_argument("--size", type=int, default=64)
    role.add_argument("--reliable", action="store_true")
    args = parser.parse_args()
    if args.cmd == "role":
        b = args.backend
        _with_upstream_plugin()
        {"upstream-node": role_upstream_node,
         "receiver": lambda: sessions.role_receiver(args.url, args.app_name, b),
         "sender": lambda: sessions.role_sender(args.url, args.target, args.size,
                                                args.reliable, b),
         "echo": lambda: sessions.role_echo(args.url, b),
         "pinger": lambda: role_pinger(args.url, args.reliable, b),
         "members": lambda: sessions.role_members(args.url, args.chan, args.n, b,
                                                  args.first),
         "moderator": lambda: sessions.role_moderator(args.url, args.chan, args.n,
                                                      args.reliable, b),
         }[args.name]()
        return

    backend = args.backend
    print(f"node_lite vs upstream SLIM (slim-bindings), backend {backend}, {args.reps} "
          f"interleaved reps, {os.cpu_count()} CPUs; apps and node in separate processes")
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    for rep in range(args.reps):
        for net in NETWORKS:
            for size in (64, 1024):
                for reliable in (False, True):
                    add(f"{net}/p2p{size}{reliable}", run_p2p(net, backend, size, reliable))
            for reliable in (False, True):
                r = run_rtt(net, backend, reliable)
                add(f"{net}/rtt50{reliable}", r["p50"])
                add(f"{net}/rtt99{reliable}", r["p99"])
                add(f"{net}/setup{reliable}", r["setup_ms"])
                rate, invite = run_fanout(net, backend, FANOUT, reliable)
                add(f"{net}/fan{reliable}", rate)
                add(f"{net}/inv{reliable}", invite)
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)

    def cell(key: str, unit: str, fmt: str = "rate") -> str:
        v = res[key]
        shown = fmt_rate(median(v)) if fmt == "rate" else f"{median(v):.{fmt}f}"
        return f"{shown}{unit} ±{spread(v):.0%}"

    def ratio(key: str) -> str:
        base = median(res[f"node_lite/{key}"])
        return f"{median(res[f'upstream/{key}']) / base:.2f}x" if base else "-"

    rows = []
    for size in (64, 1024):
        for reliable, label in ((False, "best effort"), (True, "reliable")):
            key = f"p2p{size}{reliable}"
            rows.append([f"p2p {size} B, {label}", cell(f"node_lite/{key}", "/s"),
                         cell(f"upstream/{key}", "/s"), ratio(key)])
    for reliable, label in ((False, "best effort"), (True, "reliable")):
        key = f"fan{reliable}"
        rows.append([f"fan-out to {FANOUT}, {label}", cell(f"node_lite/{key}", "/s"),
                     cell(f"upstream/{key}", "/s"), ratio(key)])
    print_table("Throughput (messages/s at the receivers)",
                ["workload", "node_lite", "upstream", "upstream/node_lite"], rows)

    rows = []
    for reliable, label in ((False, "best effort"), (True, "reliable")):
        for key, what, unit, fmt in ((f"rtt50{reliable}", "RTT p50", " µs", "0"),
                                     (f"rtt99{reliable}", "RTT p99", " µs", "0"),
                                     (f"setup{reliable}", "p2p session setup", " ms", "2"),
                                     (f"inv{reliable}", "invite per member", " ms", "2")):
            rows.append([f"{what}, {label}", cell(f"node_lite/{key}", unit, fmt),
                         cell(f"upstream/{key}", unit, fmt), ratio(key)])
    print_table("Latency (64 B request/reply, session setup, invites)",
                ["workload", "node_lite", "upstream", "upstream/node_lite"], rows)


if __name__ == "__main__":
    main()
