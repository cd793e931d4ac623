"""What recording a trace at the node costs: p2p throughput with and without it.

    python bench/trace.py               # asyncio, 5 interleaved reps
    python bench/trace.py --backend trio

The same reliable and best-effort point-to-point runs as bench/sessions.py
(64 B and 1 KiB), through a node process started either plainly or by
`slim-agents trace record` (recording every frame to a file); the plain
node is the baseline, measured in the same run. Target: recording costs
less than 10 % of p2p throughput.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import Child, fmt_rate, median, print_table, spawn, spread
from bench.sessions import SECRET, run_p2p
from node_lite._util import BACKENDS


def run(backend: str, size: int, reliable: bool, traced: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        def start(backend: str) -> tuple[Child, str]:
            args = ["--endpoint", "127.0.0.1:0", "--backend", backend, "--log-level", "warn",
                    "--shared-secret", SECRET]
            argv = (["-m", "slim_agents._cli", "trace", "record", *args,
                     "--out", os.path.join(tmp, "trace.jsonl")] if traced
                    else ["-m", "node_lite", *args])
            node = spawn(argv, ready_prefix="node_lite ready ")
            return node, "http://" + node.ready["text"]

        return run_p2p(backend, size, reliable, start=start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="asyncio", choices=BACKENDS)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"trace recording cost, backend {args.backend}, {args.reps} interleaved reps, "
          f"{os.cpu_count()} CPUs; apps and node in separate processes")
    res: dict[tuple[int, bool, bool], list[float]] = {}
    ratios: dict[tuple[int, bool], list[float]] = {}
    for rep in range(args.reps):
        for size in (64, 1024):
            for reliable in (False, True):
                # Each traced run is paired with a plain one next to it (order
                # alternating), so a pair sees the same machine; the cost is
                # the median of the pairs' ratios.
                order = (False, True) if rep % 2 == 0 else (True, False)
                pair = {traced: run(args.backend, size, reliable, traced) for traced in order}
                for traced, rate in pair.items():
                    res.setdefault((size, reliable, traced), []).append(rate)
                ratios.setdefault((size, reliable), []).append(pair[True] / pair[False])
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)
    rows = []
    for size in (64, 1024):
        for reliable in (False, True):
            plain, traced = res[(size, reliable, False)], res[(size, reliable, True)]
            ratio = median(ratios[(size, reliable)])
            rows.append([f"{size} B", "reliable" if reliable else "best effort",
                         f"{fmt_rate(median(traced))}/s ±{spread(traced):.0%}",
                         f"{fmt_rate(median(plain))}/s ±{spread(plain):.0%}",
                         f"{ratio:.2f}x ±{spread(ratios[(size, reliable)]):.0%}",
                         "ok" if ratio > 0.90 else f"COSTS {1 - ratio:.0%}"])
    print_table("p2p throughput through a recording node vs a plain node (ratio: median of pairs)",
                ["size", "mode", "recording", "plain", "ratio", "target <10%"], rows)


if __name__ == "__main__":
    main()
