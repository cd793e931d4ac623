"""The reliability matrix: which test covers which row of the reference's test matrix.

    python -m tests.reliability.matrix                      # everything, gates at 60 s
    python -m tests.reliability.matrix --load-seconds 5     # quick gates
    python -m tests.reliability.matrix --no-load --fuzz-seconds 0

Tests name their rows with ``@pytest.mark.matrix("F-3")`` (several ids allowed)
and may add figures with ``record_property`` (``sent``, ``delivered``,
``duplicates``, ``lost``, ``inputs``, ...). This module runs pytest in a
subprocess with itself loaded as a plugin (``-p tests.reliability.matrix``),
which writes one JSON line per test to ``$SLIM_MATRIX_OUT``, then prints one
table: row -> tests -> result, and totals.

Phases: the matrix tests other than the load gates run in parallel
(``-n auto``); the load gates run alone afterwards, so they measure a quiet
box; then, optionally, a short atheris run (``tests.fuzz``) whose input count
joins the B-21 row.

It also holds :func:`gated`, the opt-in used by expensive test modules.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAULTS = [f"F-{i}" for i in range(1, 12)]
BAD_INPUTS = [f"B-{i}" for i in range(1, 22)]
GATES = ["G-load-CI", "G-group-CI", "G-2node-CI", "G-soak-nightly", "G-ceiling", "G-fanout",
         "G-rekey"]
ROWS = FAULTS + BAD_INPUTS + GATES
# Figures summed into the totals line.
LOAD_FIGURES = ("sent", "expected", "delivered", "duplicates", "lost")


# -- opt-in for expensive modules -----------------------------------------------------------


def marker_named(markexpr: str, name: str) -> bool:
    """Whether a ``-m`` expression names ``name`` as a positive term (``-m load``,
    ``-m "load or partition"``; not ``-m "not load"``)."""
    expr = " ".join(markexpr.split())
    return re.search(rf"(?<![\w-])(?<!not ){re.escape(name)}(?![\w-])", expr) is not None


def gated(name: str) -> Any:
    """An autouse fixture that skips a module's tests unless ``-m`` names ``name``.

    The default run (no ``-m``) skips them with a reason; ``pytest -m <name>``
    runs them. No conftest and no change to ``addopts`` are needed.
    """

    @pytest.fixture(autouse=True)
    def _gate(request: pytest.FixtureRequest) -> None:
        if not marker_named(request.config.getoption("markexpr") or "", name):
            pytest.skip(f"{name} tests run only when selected: pytest -m {name}")

    return _gate


# -- the plugin (loaded in the pytest subprocess) -------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("matrix"):
            for row in mark.args:
                item.user_properties.append(("matrix", str(row)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    out = os.environ.get("SLIM_MATRIX_OUT")
    if not out or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # xdist workers forward their reports to the controller, which writes
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed") \
            and not (report.when == "teardown" and report.outcome == "failed"):
        return
    rows = [v for k, v in report.user_properties if k == "matrix"]
    figures = {k: v for k, v in report.user_properties if k != "matrix"}
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
    if report.when == "teardown":
        outcome = "error"
    record = {"nodeid": report.nodeid, "rows": rows, "outcome": outcome,
              "duration": report.duration, "figures": figures}
    with open(out, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


# -- the command ----------------------------------------------------------------------------


def _run(args: list[str], env: dict[str, str]) -> int:
    print("$ " + " ".join(args), flush=True)
    return subprocess.call(args, cwd=ROOT, env=env)


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def _short(nodeid: str) -> str:
    return nodeid.removeprefix("tests/reliability/").removeprefix("tests/")


def _merge(outcomes: list[str]) -> str:
    """One result for several outcomes: any failure wins, then passes (n/total)."""
    if not outcomes:
        return "not covered"
    for bad in ("failed", "error", "xpassed"):
        if bad in outcomes:
            return f"{bad} {outcomes.count(bad)}/{len(outcomes)}"
    if all(o == "skipped" for o in outcomes):
        return "skipped"
    passed = sum(o in ("passed", "xfailed") for o in outcomes)
    return f"passed {passed}/{len(outcomes)}" if len(outcomes) > 1 else "passed"


def table(records: list[dict[str, Any]], fuzz: dict[str, Any] | None) -> str:
    """Row -> tests (parametrized variants folded into one line) -> result."""
    by_row: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for r in [*records, *([fuzz] if fuzz is not None else [])]:
        for row in r["rows"]:
            base = _short(r["nodeid"]).split("[")[0]
            by_row[row].setdefault(base, []).append(r["outcome"])
    extra = sorted(set(by_row) - set(ROWS))
    width = min(90, max([len(t) for tests in by_row.values() for t in tests] + [30]))
    lines = [f"{'row':<15} {'test':<{width}} result", f"{'-' * 15} {'-' * width} {'-' * 12}"]
    for row in ROWS + extra:
        tests = by_row.get(row, {})
        if not tests:
            lines.append(f"{row:<15} {'-':<{width}} not covered")
        for i, (test, outcomes) in enumerate(tests.items()):
            name = test if len(test) <= width else test[:width - 3] + "..."
            lines.append(f"{row if i == 0 else '':<15} {name:<{width}} {_merge(outcomes)}")
    lines.append("")
    lines.extend(totals(records, fuzz))
    return "\n".join(lines)


def _row_result(row: str, records: list[dict[str, Any]]) -> str:
    return _merge([r["outcome"] for r in records if row in r["rows"]])


def totals(records: list[dict[str, Any]], fuzz: dict[str, Any] | None) -> list[str]:
    load = dict.fromkeys(LOAD_FIGURES, 0)
    for r in records:
        if any(row.startswith("G-") for row in r["rows"]):
            for k in LOAD_FIGURES:
                load[k] += int(r["figures"].get(k, 0) or 0)
    with_fuzz = [*records, *([fuzz] if fuzz is not None else [])]
    covered = [row for row in ROWS if any(row in r["rows"] for r in with_fuzz)]

    def passed(prefix: str) -> int:
        return sum(1 for row in covered if row.startswith(prefix)
                   and _row_result(row, with_fuzz).startswith("passed"))

    inputs = sum(int(r["figures"].get("inputs", 0) or 0) for r in records)
    if fuzz is not None:
        inputs += int(fuzz["figures"].get("inputs", 0))
    outcomes = [r["outcome"] for r in records]
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    return [
        f"load held: {load['sent']} messages published, {load['delivered']} of "
        f"{load['expected']} expected deliveries made, {load['duplicates']} duplicates, "
        f"{load['lost']} lost",
        f"faults survived: {passed('F-')}/{len(FAULTS)} rows",
        f"bad inputs tried: {passed('B-')}/{len(BAD_INPUTS)} rows; {inputs} fuzz and seed inputs",
        f"gates held: {passed('G-')}/{len(GATES)} rows",
        f"rows covered: {len(covered)}/{len(ROWS)}; tests: "
        + ", ".join(f"{n} {o}" for o, n in counts.items()),
    ]


def _fuzz(seconds: float, env: dict[str, str], out: Path) -> dict[str, Any] | None:
    code = _run([sys.executable, "-m", "tests.fuzz", "run", "--seconds", str(seconds),
                 "--json", str(out)], env)
    if not out.exists():
        return {"nodeid": "tests/fuzz (atheris)", "rows": ["B-21"], "figures": {},
                "outcome": "failed" if code else "skipped"}
    summary = json.loads(out.read_text())
    outcome = "skipped" if summary.get("skipped") else ("passed" if code == 0 else "failed")
    return {"nodeid": f"tests/fuzz (atheris, {len(summary.get('targets', {}))} targets, "
                      f"{seconds:g} s)",
            "rows": ["B-21"], "outcome": outcome, "figures": {"inputs": summary.get("runs", 0)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.matrix",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-seconds", type=float,
                        default=float(os.environ.get("SLIM_LOAD_SECONDS", 60)),
                        help="duration of each load gate (default 60, or $SLIM_LOAD_SECONDS)")
    parser.add_argument("--no-load", action="store_true", help="skip the load gates")
    parser.add_argument("--fuzz-seconds", type=float, default=10.0,
                        help="atheris run across all targets (0: none; default 10)")
    parser.add_argument("-n", "--workers", default="auto",
                        help="xdist workers for the non-load phase (0: serial)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="slim-matrix-") as tmp:
        out = Path(tmp) / "results.jsonl"
        env = dict(os.environ, SLIM_MATRIX_OUT=str(out),
                   SLIM_LOAD_SECONDS=f"{args.load_seconds:g}")
        base = [sys.executable, "-m", "pytest", "-p", "tests.reliability.matrix", "-q",
                "-p", "no:cacheprovider"]
        paths = ["tests/reliability", "tests/fuzz/test_seeds.py"]
        codes = []
        parallel = ["-n", args.workers] if args.workers != "0" and _has_xdist() else []
        codes.append(_run([*base, *parallel, "-m", "(matrix or partition) and not load", *paths,
                           *args.pytest_args], env))
        if not args.no_load:
            codes.append(_run([*base, "-m", "load", "tests/reliability/test_load_gates.py",
                               *args.pytest_args], env))
        fuzz = _fuzz(args.fuzz_seconds, env, Path(tmp) / "fuzz.json") \
            if args.fuzz_seconds > 0 else None
        if fuzz is not None and fuzz["outcome"] == "failed":
            codes.append(1)
        records = list(_records(out))
    print()
    print(table(records, fuzz))
    # 5: nothing selected in a phase (rows may be uncovered yet)
    return 0 if all(c in (0, 5) for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
