"""The multiprocess runtime: swarms across worker processes, supervision, clean shutdown."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import anyio
import pytest

from node_lite import ConfigError
from slim_agents import Agent
from slim_agents._plugins import make_plugin_manager
from slim_agents._swarm import AgentSpec, RestartPolicy, SwarmError, factory_ref, open_swarm
from tests.helpers import unique, wait_until
from tests.slim_agents.swarm_agents import worker

pytestmark = pytest.mark.anyio


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_swarm_of_32_in_4_processes_answers_a_gather_and_leaves_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    ns = unique("swarm")
    specs = AgentSpec.many(worker, f"org/{ns}/w-{{i}}", 32, greeting="hi")
    progress: list[int] = []
    with anyio.fail_after(60):
        async with open_swarm(specs, processes=4, log_level=logging.WARNING,
                              on_progress=lambda ready, total: progress.append(ready)) as swarm:
            assert swarm.ready_count == 32 and len(swarm.pids) == 4
            assert progress[-1] == 32 and sorted(progress) == progress
            pids = swarm.pids
            boss = Agent(f"org/{ns}/boss", plugins=make_plugin_manager(allow=False))
            async with boss.run(swarm.url, secret=swarm.secret) as b:
                await b.create_group(f"org/{ns}/all", swarm.names)
                replies = [m async for m in b.gather(f"org/{ns}/all", "ready?")]
                found = await b.discover(f"org/{ns}")
    assert sorted(m.payload.decode() for m in replies) == sorted(
        f"hi from {n}: ready?" for n in swarm.names)
    assert len([c for c in found if c.known]) == 32
    assert all(gone(pid) for pid in pids)
    # Each agent's log lines come back tagged with its name.
    assert f"[org/{ns}/w-7] worker org/{ns}/w-7 starting" in caplog.text


async def test_a_killed_worker_is_restarted_and_serves_again() -> None:
    ns = unique("restart")
    specs = AgentSpec.many(worker, f"org/{ns}/w-{{i}}", 4)
    with anyio.fail_after(60):
        async with open_swarm(specs, processes=2) as swarm:
            boss = Agent(f"org/{ns}/boss", plugins=make_plugin_manager(allow=False))
            async with boss.run(swarm.url, secret=swarm.secret) as b:
                before = await b.call(f"org/{ns}/w-0", "whoami")
                os.kill(before["pid"], signal.SIGKILL)
                await wait_until(lambda: swarm.restarts == 1, timeout=20, message="restart")
                await swarm.wait_ready()
                after = await b.call(f"org/{ns}/w-0", "whoami")
            assert after["name"] == f"org/{ns}/w-0" and after["pid"] != before["pid"]
            assert gone(before["pid"])
            pids = swarm.pids
    assert all(gone(pid) for pid in pids)


async def test_a_worker_that_keeps_dying_fails_the_swarm() -> None:
    specs = [AgentSpec("tests.slim_agents.swarm_agents:crasher", f"org/{unique('c')}/x")]
    with anyio.fail_after(30), pytest.raises(SwarmError, match="exited with 3"):
        async with open_swarm(specs, restart=RestartPolicy(max_restarts=1, backoff=0.01)):
            pass


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_bad_swarm_specs_are_refused(anyio_backend: str) -> None:
    def local(name: str) -> Agent:
        return Agent(name)

    with pytest.raises(ConfigError, match="module:function"):
        AgentSpec("no_colon", "a/b/c")
    with pytest.raises(ConfigError, match="local to a function"):
        factory_ref(local)
    with pytest.raises(ConfigError, match=r"\{i\}"):
        AgentSpec.many(worker, "org/ns/same", 2)
    assert factory_ref(worker) == "tests.slim_agents.swarm_agents:worker"


async def test_duplicate_or_missing_agents_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        async with open_swarm([AgentSpec("m:f", "a/b/c"), AgentSpec("m:f", "a/b/c")]):
            pass
    with pytest.raises(ConfigError, match="at least one"):
        async with open_swarm([]):
            pass


async def test_ctrl_c_stops_the_swarm_command_and_leaves_nothing_behind() -> None:
    ns = unique("cli")
    argv = [sys.executable, "-m", "slim_agents._cli", "swarm",
            "tests.slim_agents.swarm_agents:worker", "--count", "6", "--processes", "2",
            "--name", f"org/{ns}/w-{{i}}"]
    async with await anyio.open_process(argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out = b""
        with anyio.fail_after(60):
            async for chunk in proc.stdout:
                out += chunk
                if b"\n" in out:
                    break
            ready = json.loads(out.split(b"\n")[0])
            assert ready["ready"] == 6 and len(ready["pids"]) == 2
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        err = await proc.stderr.receive() if proc.stderr else b""
    assert b"connected 6/6" in err
    assert all(gone(pid) for pid in ready["pids"])


async def test_the_pytest_plugin_starts_a_swarm_on_the_test_node(
        slim_swarm: Any, slim_agent: Any, slim_name: Any) -> None:
    swarm = await slim_swarm(worker, 4, processes=2, greeting="yo")
    user = await slim_agent("user")
    with anyio.fail_after(20):
        answers = [await user.call(name, "whoami") for name in swarm.names]
        reply = await user.request(slim_name("agent-3"), "hi")
    assert [a["name"] for a in answers] == [slim_name(f"agent-{i}") for i in range(4)]
    assert len({a["pid"] for a in answers}) == 2
    assert reply.payload.decode() == f"yo from {slim_name('agent-3')}: hi"


@pytest.mark.parametrize("workers", [None, "uvloop"])
async def test_a_swarm_on_a_node_subprocess(workers: str | None, anyio_backend: str) -> None:
    if workers == "uvloop":
        pytest.importorskip("uvloop")
    ns = unique("sub")
    specs = AgentSpec.many("tests.slim_agents.swarm_agents:worker", f"org/{ns}/w-{{i}}", 3)
    with anyio.fail_after(60):
        async with open_swarm(specs, node="subprocess", processes=1, backend=workers) as swarm:
            user = Agent(f"org/{ns}/user", plugins=make_plugin_manager(allow=False))
            async with user.run(swarm.url, secret=swarm.secret) as u:
                answers = [await u.call(n, "whoami") for n in swarm.names]
    assert [a["name"] for a in answers] == swarm.names
    expected = workers or {"asyncio": "asyncio", "trio": "trio"}[anyio_backend]
    assert {a["loop"] for a in answers} == {expected}


async def test_an_unknown_worker_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'curio'"):
        async with open_swarm([AgentSpec("m:f", "a/b/c")], backend="curio"):
            pass
