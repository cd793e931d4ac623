"""Replays the fuzz targets' examples and saved regression seeds (no atheris needed).

Each input may raise only its target's declared errors and must take under
100 ms of CPU (the fuzzer's hang limit). The collector is paused while an input
runs: a full collection of a busy xdist worker's heap is not the input's cost.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

SEEDS = Path(__file__).resolve().parent / "seeds"
HANG_SECONDS = 0.1

pytestmark = pytest.mark.matrix("B-21")


def inputs(name: str) -> list[tuple[str, bytes]]:
    found = [(f"example {i}", data) for i, data in enumerate(TARGETS[name].examples())]
    folder = SEEDS / name
    if folder.is_dir():
        found += [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]
    return found


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_survives_its_seeds(name: str,
                                   record_property: Callable[[str, object], None]) -> None:
    target = TARGETS[name]
    cases = inputs(name)
    slow = []
    for label, data in cases:
        gc.disable()
        start = time.process_time()
        try:
            target.check(data)
        except Exception as exc:
            raise AssertionError(f"{name}: {label} ({data[:64]!r}...) raised {exc!r}") from exc
        finally:
            spent = time.process_time() - start
            gc.enable()
        if spent > HANG_SECONDS:
            slow.append(f"{label}: {spent * 1000:.0f} ms")
    record_property("inputs", len(cases))
    assert not slow, f"{name}: inputs over {HANG_SECONDS * 1000:.0f} ms of CPU: {slow}"


def test_every_seed_folder_names_a_target() -> None:
    if SEEDS.is_dir():
        folders = {p.name for p in SEEDS.iterdir() if p.is_dir()}
        assert folders <= set(TARGETS), folders - set(TARGETS)
