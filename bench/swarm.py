"""Swarm start-up and test-fleet benchmarks.

    python bench/swarm.py                    # spawn and connect 32 and 128 agents (3 reps)
    python bench/swarm.py --suite            # also: the test suite with -n auto vs -n 0

Start-up: wall time from open_swarm() to every agent connected (processes
started, modules imported, agents connected to the node and announced),
with 4 worker processes, on asyncio and trio. The baseline measured in the
same run is the bare cost of starting the same number of Python processes
that import slim_agents and exit, so the ratio shows what connecting adds.
Target: 128 agents connected in under 10 s on this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import median, print_table, quiet_gate, spread
from node_lite._util import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 4


def make_agent(name: str):  # type: ignore[no-untyped-def]
    from slim_agents import Agent
    from slim_agents._plugins import make_plugin_manager

    agent = Agent(name, plugins=make_plugin_manager(allow=False))

    @agent.tool
    async def ping() -> str:
        """Answer pong."""
        return "pong"

    return agent


def time_swarm(count: int, backend: str) -> float:

    from slim_agents import AgentSpec, open_swarm

    async def main() -> float:
        specs = AgentSpec.many("bench.swarm:make_agent", "bench/swarm/a-{i}", count)
        t0 = time.perf_counter()
        async with open_swarm(specs, processes=PROCESSES):
            return time.perf_counter() - t0

    return float(run(main, backend=backend))


def time_bare_processes() -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "import slim_agents"], cwd=ROOT)
             for _ in range(PROCESSES)]
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def time_suite(workers: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", workers, "-p", "no:cacheprovider"],
                   cwd=ROOT, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--suite", action="store_true", help="also time the test suite")
    args = parser.parse_args()
    print(f"swarm start-up, {PROCESSES} worker processes, {args.reps} interleaved reps, "
          f"{os.cpu_count()} CPUs")
    res: dict[str, list[float]] = {}
    for rep in range(args.reps):
        quiet_gate()
        res.setdefault("bare", []).append(time_bare_processes())
        for backend in ("asyncio", "trio"):
            for count in (32, 128):
                quiet_gate()
                res.setdefault(f"{backend}{count}", []).append(time_swarm(count, backend))
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)
    bare = median(res["bare"])
    rows = []
    for backend in ("asyncio", "trio"):
        for count in (32, 128):
            v = res[f"{backend}{count}"]
            ok = "" if count != 128 else ("ok" if median(v) < 10 else "ABOVE 10 s")
            rows.append([backend, str(count), f"{median(v):.2f} s ±{spread(v):.0%}",
                         f"{bare:.2f} s", f"{median(v) / bare:.1f}x", ok])
    print_table("spawn and connect", ["backend", "agents", "time", f"{PROCESSES} bare "
                "processes", "ratio", "target"], rows)
    if args.suite:
        auto, serial = time_suite("auto"), time_suite("0")
        print_table("test suite wall time", ["-n auto", "-n 0", "speed-up"],
                    [[f"{auto:.1f} s", f"{serial:.1f} s", f"{serial / auto:.2f}x"]])


if __name__ == "__main__":
    main()
