"""Every recipe runs to completion as a script."""

from __future__ import annotations

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
