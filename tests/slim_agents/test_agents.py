"""Agents: tools called by name across agents and processes, error results, invite plugins."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import AsyncIterator

import anyio
import pytest

from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, JoinInfo, SessionRejectedError, ToolError
from slim_agents._plugins import make_plugin_manager
from slim_agents.hookspecs import hookimpl
from tests.helpers import unique

pytestmark = pytest.mark.anyio
SECRET = "agents-test-secret-that-is-long-enough-0123"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


def calculator(name: str) -> Agent:
    agent = Agent(name, description="adds numbers", plugins=make_plugin_manager(allow=False))

    @agent.tool
    async def add(a: int, b: int) -> int:
        """Add two integers.

        :param a: the first number
        :param b: the second number
        """
        return a + b

    @agent.tool
    async def fail() -> str:
        """Always fails."""
        raise RuntimeError("kaput")

    return agent


async def test_a_tool_is_called_by_name_and_a_failure_comes_back_as_an_error_result(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    calc_name = f"org/ns/{unique('calc')}"
    user = Agent(f"org/ns/{unique('user')}", plugins=make_plugin_manager(allow=False))
    async with calculator(calc_name).run(node, secret=SECRET), \
            user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            assert await u.call(calc_name, "add", a=2, b=40) == 42
            with pytest.raises(ToolError) as info:
                await u.call(calc_name, "fail")
            assert "kaput" in str(info.value)
            with pytest.raises(ToolError) as info:
                await u.call(calc_name, "nope")
            assert info.value.code == "not_found"
            tools = await u.remote_tools(calc_name)
    assert sorted(t.name for t in tools) == ["add", "fail"]
    assert "tool call failed" in caplog.text  # logged, not swallowed


async def test_two_agents_in_separate_processes(node: Node) -> None:
    calc_name = f"org/ns/{unique('calc')}"
    script = textwrap.dedent(f"""
        import anyio
        from tests.slim_agents.test_agents import calculator, SECRET

        async def main():
            async with calculator({calc_name!r}).run({node.url!r}, secret=SECRET):
                print("ready", flush=True)
                await anyio.sleep_forever()

        anyio.run(main)
    """)
    async with await anyio.open_process([sys.executable, "-c", script]) as proc:
        try:
            assert proc.stdout is not None
            seen = b""
            with anyio.fail_after(20):
                while b"ready" not in seen:
                    seen += await proc.stdout.receive()
            user = Agent(f"org/ns/{unique('user')}", plugins=make_plugin_manager(allow=False))
            async with user.run(node, secret=SECRET) as u:
                with anyio.fail_after(10):
                    assert await u.call(calc_name, "add", a=20, b=22) == 42
        finally:
            proc.terminate()
            with anyio.fail_after(10):
                await proc.wait()


class DeclineEverything:
    @hookimpl
    def slim_invite_policy(self, agent: Agent, info: JoinInfo) -> str:
        return "closed for the day"


async def test_an_invite_policy_plugin_declines_an_invitation(node: Node) -> None:
    pm = make_plugin_manager(allow=False)
    pm.register(DeclineEverything())
    shy_name = f"org/ns/{unique('shy')}"
    shy = Agent(shy_name, plugins=pm)
    user = Agent(f"org/ns/{unique('user')}", plugins=make_plugin_manager(allow=False))
    async with shy.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10), pytest.raises(SessionRejectedError) as info:
            await u.call(shy_name, "anything")
    assert info.value.code == "declined" and "closed for the day" in str(info.value)


async def test_handler_slots_bound_concurrency_and_survive_cancellation() -> None:
    from slim_agents._agent import _Slots

    slots = _Slots(2)
    running = peak = done = 0
    gate = anyio.Event()

    async def work() -> None:
        nonlocal running, peak, done
        async with slots:
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1
            done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(work)
        await anyio.wait_all_tasks_blocked()
        assert running == 2 and len(slots._waiters) == 3
        with anyio.move_on_after(0):  # a waiter cancelled while queued leaves the queue
            async with slots:
                raise AssertionError("no slot was free")
        assert len(slots._waiters) == 3
        gate.set()
    assert peak == 2 and done == 5
    async with slots, slots:  # every slot came back
        pass
