"""Every recipe runs to completion as a script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from node_lite import open_node_process

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_point_to_point_recipe_self_contained() -> None:
    result = subprocess.run([sys.executable, str(RECIPES / "point_to_point.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("reply: 'hello") == 3


@pytest.mark.anyio
async def test_group_recipe_moderator_and_participant() -> None:
    async with open_node_process() as node:
        participant = await anyio.open_process(
            [sys.executable, str(RECIPES / "group.py"), "--local", "agntcy/ns/client-1",
             "--node", node.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert participant.stdout is not None and participant.stdin is not None
        out = b""
        with anyio.fail_after(30):
            async for chunk in participant.stdout:
                out += chunk
                if b"Waiting for session" in out:
                    break
            moderator = await anyio.run_process(
                [sys.executable, str(RECIPES / "group.py"), "--local", "agntcy/ns/moderator",
                 "--node", node.url, "--remote", "agntcy/ns/chat", "--invites",
                 "agntcy/ns/client-1"], input=b"hello group\nexit\n")
            assert b"-> add agntcy/ns/client-1" in moderator.stdout
            async for chunk in participant.stdout:  # ends when the moderator closed the group
                out += chunk
            assert await participant.wait() == 0
        assert b"Welcome to the group agntcy/ns/chat" in out
        assert b"agntcy/ns/moderator/" in out and b"> hello group" in out
        await participant.aclose()


def run_recipe(name: str, *args: str) -> str:
    """Run recipes/<name>.py as a user would; it must finish by itself and succeed."""
    result = subprocess.run([sys.executable, str(RECIPES / name), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_scatter_gather_recipe_spreads_the_work_over_several_processes() -> None:
    out = run_recipe("scatter_gather.py", "--workers", "4", "--processes", "2",
                     "--limit", "5000")
    assert out.count("roll call: org/scatter/worker-") == 4
    m = re.search(r"^OK: 669 primes below 5000, counted by 4 workers in (\d+) processes$",
                  out, re.M)
    assert m, out
    assert int(m.group(1)) >= 2


def test_round_table_recipe_adjourns_on_the_protocol_message() -> None:
    out = run_recipe("round_table.py", "--members", "2", "--rounds", "2", "--backend", "trio")
    speakers = re.findall(r"^  turn +(\d+) +(\w+): ", out, re.M)
    assert speakers == [(str(i + 1), who) for i, who in
                        enumerate(["moderator", "alice", "bob"] * 2)], out
    assert out.rstrip().endswith("adjourned after 6 turns")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_pipeline_recipe_returns_every_item_in_order(backend: str) -> None:
    out = run_recipe("pipeline.py", "--items", "40", "--window", "8", "--backend", backend)
    assert "#1 'pass each item': 3 words, longest 'PASS'" in out
    assert re.search(r"^OK: 40 items through 3 stages, in order ", out, re.M), out


def test_controller_group_recipe_manages_the_channel_through_the_controller() -> None:
    out = run_recipe("controller_group.py", "--participants", "3")
    for step in ("channel create moderators=agntcy/ns/moderator/", "participant add -c",
                 "participant list -c", "participant delete -c", "channel delete",
                 "channel list"):
        assert re.search(rf"^\$ slim-agents ctl --server 127\.0\.0\.1:\d+ {step}", out, re.M), step
    assert "client-3: session closed (removed)" in out
    assert "client-2 heard client-1: glad to be here" in out
    assert re.search(r"^OK: channel agntcy/ns/\w{18}: 8 messages heard, client-3 removed, "
                     r"channel deleted$", out, re.M), out
