"""Shared benchmark plumbing: child processes that talk JSON lines, CPU quiet gate, tables.

Each role runs as ``python bench/<script>.py role <name> ...`` and prints
``READY <json>`` once listening and ``RESULT <json>`` when done.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_parser(doc: str | None, *, reps: int = 3
                 ) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line every benchmark shares: ``--backend`` and ``--reps``, and a
    ``role NAME --url URL --backend B`` subcommand for its child processes.

    Returns (the parser, the role subparser) for each script's own options.
    """
    from node_lite._util import BACKENDS

    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="asyncio", choices=BACKENDS)
    parser.add_argument("--reps", type=int, default=reps)
    role = parser.add_subparsers(dest="cmd").add_parser("role")
    role.add_argument("name")
    role.add_argument("--url")
    role.add_argument("--backend", default="asyncio")
    return parser, role


def cpu_busy_fraction(interval: float = 0.2) -> float:
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + parts[4]
        return idle, sum(parts)

    i1, t1 = snap()
    time.sleep(interval)
    i2, t2 = snap()
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quiet_gate(max_wait: float = 2.0, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait``) for the CPUs to go idle; return how busy they were."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


@dataclass
class Child:
    proc: subprocess.Popen[str]
    ready: dict[str, Any]

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return dict(json.loads(line[7:]))
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"child {self.proc.args} gave no result (rc={self.proc.poll()})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def spawn(argv: Sequence[str], *, ready_prefix: str = "READY ", timeout: float = 30.0,
          env: dict[str, str] | None = None) -> Child:
    """Start a child and wait for its ready line (``READY <json>`` by default)."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(ready_prefix):
            rest = line[len(ready_prefix):].strip()
            ready = json.loads(rest) if rest.startswith("{") else {"text": rest}
            return Child(proc, ready)
    proc.kill()
    raise RuntimeError(f"{argv} did not become ready")


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    m = median(values)
    return (max(values) - min(values)) / m if m else 0.0


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
