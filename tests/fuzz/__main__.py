"""Coverage-guided fuzzing of the decoders with atheris (libFuzzer).

    python -m tests.fuzz run --seconds 10            # all targets, 10 s of fuzzing in total
    python -m tests.fuzz run --seconds 600 --target wire --target node
    python -m tests.fuzz list

Each target runs in its own process (libFuzzer exits the process when done),
with ``node_lite`` and ``slim_agents`` instrumented, starting from the target's
examples and its saved seeds. An input that raises an undeclared error, spends
over 100 ms of CPU, or pushes RSS past ``--rss-mb`` is a crash: it is copied to
``tests/fuzz/seeds/<target>/`` as a regression seed (commit it; test_seeds.py
replays it) and the run fails. Needs ``pip install -e '.[fuzz]'``; without
atheris the run is skipped (exit 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEEDS = HERE / "seeds"
# CPU time one input may take (section 3.6: no hang > 100 ms per input).
HANG_SECONDS = 0.1
TARGETS = ("wire", "flows", "node", "session_body", "app", "e2e_decode", "e2e_group", "token",
           "jwt")
# Instrumented: both packages but the modules no target reaches (instrumenting
# those costs seconds per process).
NOT_REACHED = ["node_lite._server", "node_lite._client", "node_lite._transport",
               "node_lite._process", "node_lite._faults", "node_lite._config",
               "node_lite._controller", "slim_agents._agent", "slim_agents._app",
               "slim_agents._app_core", "slim_agents._session", "slim_agents._session_core",
               "slim_agents._swarm", "slim_agents._swarm_worker", "slim_agents._tools",
               "slim_agents._plugins", "slim_agents.hookspecs", "slim_agents._messaging"]
# ... except where a target does reach them.
REACHED = {"app": {"slim_agents._app_core", "slim_agents._session_core",
                   "slim_agents._messaging"}}


class Hang(Exception):
    """One input took longer than HANG_SECONDS of CPU."""


def worker(name: str, seconds: int, corpus: Path, artifacts: Path, rss_mb: int) -> None:
    """Fuzz one target in this process until libFuzzer stops it."""
    import atheris

    exclude = [m for m in NOT_REACHED if m not in REACHED.get(name, ())]
    with atheris.instrument_imports(include=["node_lite", "slim_agents"], exclude=exclude):
        from tests.fuzz.targets import TARGETS as registry
    target = registry[name]
    for example in target.examples():  # also builds the targets' cached state
        target.check(example)
        (corpus / f"example-{abs(hash(example)):x}").write_bytes(example)

    def one_input(data: bytes) -> None:
        start = time.process_time()
        target.check(data)
        spent = time.process_time() - start
        if spent > HANG_SECONDS:
            raise Hang(f"{spent * 1000:.0f} ms of CPU for one input of {len(data)} bytes")

    seeds = SEEDS / name
    dirs = [str(corpus)] + ([str(seeds)] if seeds.is_dir() else [])
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-rss_limit_mb={rss_mb}",
                   "-timeout=5", "-max_len=4096", "-print_final_stats=1",
                   f"-artifact_prefix={artifacts}/", *dirs], one_input)
    atheris.Fuzz()


def _runs(output: str) -> int:
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", output) or \
        re.search(r"Done (\d+) runs", output)
    return int(m.group(1)) if m else 0


def _fuzz_one(name: str, seconds: int, rss_mb: int) -> tuple[dict[str, object], str]:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        corpus, artifacts = Path(tmp) / "corpus", Path(tmp) / "artifacts"
        corpus.mkdir()
        artifacts.mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "tests.fuzz", "worker", name, "--seconds", str(seconds),
             "--corpus", str(corpus), "--artifacts", str(artifacts), "--rss-mb", str(rss_mb)],
            cwd=ROOT, capture_output=True, text=True, errors="replace")
        output = done.stdout + done.stderr
        crashes = []
        for found in sorted(artifacts.iterdir()):
            (SEEDS / name).mkdir(parents=True, exist_ok=True)
            saved = SEEDS / name / found.name
            shutil.copyfile(found, saved)
            crashes.append(str(saved.relative_to(ROOT)))
    ok = done.returncode == 0 and not crashes
    return {"ok": ok, "runs": _runs(output), "crashes": crashes, "exit": done.returncode}, output


def run(names: list[str], seconds: float, rss_mb: int, jobs: int, json_out: Path | None) -> int:
    if importlib.util.find_spec("atheris") is None:
        print("fuzz: atheris is not installed (pip install -e '.[fuzz]'); skipped")
        if json_out:
            json_out.write_text(json.dumps({"skipped": True, "runs": 0, "targets": {}}))
        return 0
    # each target gets its share of the total (at least 1 s), `jobs` of them at once
    each = max(1, round(seconds / len(names)))
    results: dict[str, dict[str, object]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(_fuzz_one, name, each, rss_mb) for name in names}
        for name, future in futures.items():
            result, output = future.result()
            results[name] = result
            print(f"fuzz {name}: {result['runs']} inputs in {each} s, "
                  + ("ok" if result["ok"] else f"FAILED (exit {result['exit']})"), flush=True)
            if not result["ok"]:
                tail = [line for line in output.splitlines() if line.strip()][-40:]
                print("\n".join("    " + line for line in tail))
                for c in result["crashes"]:  # type: ignore[attr-defined]
                    print(f"    saved as a regression seed: {c}")
    failed = [n for n, r in results.items() if not r["ok"]]
    total = sum(int(r["runs"]) for r in results.values())  # type: ignore[call-overload]
    if json_out:
        json_out.write_text(json.dumps({"skipped": False, "runs": total, "targets": results}))
    print(f"fuzz: {total} inputs tried across {len(results)} targets")
    print(f"fuzz: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="fuzz targets for a while")
    p_run.add_argument("--seconds", type=float, default=60.0,
                       help="fuzzing time split between the targets, at least 1 s each "
                       "(default 60; start-up comes on top)")
    p_run.add_argument("--target", action="append", choices=TARGETS,
                       help="a target to run (repeatable; default all)")
    p_run.add_argument("--rss-mb", type=int, default=200,
                       help="libFuzzer's RSS limit per target process (default 200, section 3.6)")
    p_run.add_argument("--jobs", type=int, default=2,
                       help="targets fuzzed at once, one process each (default 2)")
    p_run.add_argument("--json", type=Path, help="write a summary here")
    sub.add_parser("list", help="print the target names")
    p_worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    p_worker.add_argument("name", choices=TARGETS)
    p_worker.add_argument("--seconds", type=int, required=True)
    p_worker.add_argument("--corpus", type=Path, required=True)
    p_worker.add_argument("--artifacts", type=Path, required=True)
    p_worker.add_argument("--rss-mb", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(TARGETS))
        return 0
    if args.command == "worker":
        worker(args.name, args.seconds, args.corpus, args.artifacts, args.rss_mb)
        return 0
    return run(args.target or list(TARGETS), args.seconds, args.rss_mb, max(1, args.jobs),
               args.json)


if __name__ == "__main__":
    sys.exit(main())
