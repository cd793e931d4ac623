"""What recording a trace at the node costs: p2p throughput with and without it.

    python bench/trace.py               # asyncio, 5 interleaved reps
    python bench/trace.py --backend trio

The same reliable and best-effort point-to-point runs as bench/sessions.py
(64 B and 1 KiB), through a node process started either plainly or by
`slim-agents trace record` (recording every frame to a file); the plain
node is the baseline, measured in the same run, each traced run paired with
a plain one next to it. Target: recording costs less than 10 % of p2p
throughput.

Sender, receiver and node are CPU-bound on two cores, so what recording
costs is the CPU it adds per message: the verdict uses the node's extra CPU per
message over the CPU all three processes spend per message without it. The
throughput ratio of the pairs is printed beside it; on a shared box it swings
by tens of percent between identical runs (the apps' batching changes with
scheduling), so it cannot decide a 10 % target by itself.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import Child, bench_parser, fmt_rate, median, print_table, spawn, spread
from bench.sessions import SECRET, run_p2p


def run(backend: str, size: int, reliable: bool, traced: bool) -> tuple[float, float, float]:
    """(messages/s, CPU seconds per message of all three processes, of the node)."""
    with tempfile.TemporaryDirectory() as tmp:
        def start(backend: str) -> tuple[Child, str]:
            args = ["--endpoint", "127.0.0.1:0", "--backend", backend, "--log-level", "warn",
                    "--shared-secret", SECRET]
            argv = (["-m", "slim_agents._cli", "trace", "record", *args,
                     "--out", os.path.join(tmp, "trace.jsonl")] if traced
                    else ["-m", "node_lite", *args])
            node = spawn(argv, ready_prefix="node_lite ready ")
            return node, "http://" + node.ready["text"]

        cpu: dict[str, float] = {}
        rate = run_p2p(backend, size, reliable, start=start, cpu=cpu)
        return rate, sum(cpu.values()), cpu["node"]


def main() -> None:
    parser, _ = bench_parser(__doc__, reps=5)
    args = parser.parse_args()
    print(f"trace recording cost, backend {args.backend}, {args.reps} interleaved reps, "
          f"{os.cpu_count()} CPUs; apps and node in separate processes")
    res: dict[tuple[int, bool, bool], list[float]] = {}
    ratios: dict[tuple[int, bool], list[float]] = {}
    costs: dict[tuple[int, bool], list[float]] = {}
    node_us: dict[tuple[int, bool, bool], list[float]] = {}
    for rep in range(args.reps):
        for size in (64, 1024):
            for reliable in (False, True):
                # Each traced run is paired with a plain one next to it (order
                # alternating), so a pair sees the same machine.
                order = (False, True) if rep % 2 == 0 else (True, False)
                pair = {traced: run(args.backend, size, reliable, traced) for traced in order}
                for traced, (rate, _, node) in pair.items():
                    res.setdefault((size, reliable, traced), []).append(rate)
                    node_us.setdefault((size, reliable, traced), []).append(node * 1e6)
                key = (size, reliable)
                ratios.setdefault(key, []).append(pair[True][0] / pair[False][0])
                # the node's added CPU per message, over everything a message costs
                costs.setdefault(key, []).append((pair[True][2] - pair[False][2])
                                                 / pair[False][1])
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)
    rows = []
    for size in (64, 1024):
        for reliable in (False, True):
            key = (size, reliable)
            plain, traced = res[(size, reliable, False)], res[(size, reliable, True)]
            cost = median(costs[key])
            rows.append([f"{size} B", "reliable" if reliable else "best effort",
                         f"{fmt_rate(median(traced))}/s", f"{fmt_rate(median(plain))}/s",
                         f"{median(ratios[key]):.2f}x ±{spread(ratios[key]):.0%}",
                         f"{median(node_us[(size, reliable, True)]):.1f} / "
                         f"{median(node_us[(size, reliable, False)]):.1f}",
                         f"{cost:+.1%}",
                         "ok" if cost < 0.10 else "COSTS MORE"])
    print_table("p2p through a recording node vs a plain node (medians of pairs)",
                ["size", "mode", "recording", "plain", "throughput ratio",
                 "node µs/msg (rec / plain)", "added CPU", "target <10%"], rows)


if __name__ == "__main__":
    main()
