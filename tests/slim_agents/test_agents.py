"""Agents: tools called by name across agents and processes, error results, invite plugins."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import AsyncIterator

import anyio
import pytest

from node_lite import Name, Node, NodeConfig, open_node
from slim_agents import Agent, JoinInfo, SessionRejectedError, ToolError
from slim_agents._plugins import make_plugin_manager
from slim_agents.hookspecs import hookimpl
from tests.helpers import unique, wait_until

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


async def test_a_call_reaches_the_new_instance_when_the_callee_vanished(node: Node) -> None:
    calc_name = f"org/ns/{unique('calc')}"
    user = Agent(f"org/ns/{unique('user')}", plugins=make_plugin_manager(allow=False))
    async with user.run(node, secret=SECRET) as u:
        async with calculator(calc_name).run(node, secret=SECRET) as old:
            with anyio.fail_after(10):
                assert await u.call(calc_name, "add", a=1, b=1) == 2
            first = u._peers[Name.parse(calc_name)]
            # gone without closing its sessions: its connection is cut at the node
            old.app._closing = True
            old.app._tg.cancel_scope.cancel()  # type: ignore[union-attr]
        async with calculator(calc_name).run(node, secret=SECRET):
            # The node reports the old instance unreachable; the call is asked
            # again on a new session, well before the retries (10 x 1 s) run out.
            with anyio.fail_after(5):
                assert await u.call(calc_name, "add", a=2, b=3) == 5
            assert u._peers[Name.parse(calc_name)] is not first
            assert not u._waiters


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


async def test_the_handler_pool_bounds_concurrency_and_backlog_and_keeps_order() -> None:
    from slim_agents._agent import _Handlers

    pool = _Handlers(2, backlog=3)
    running = peak = 0
    started: list[int] = []
    gate = anyio.Event()

    async def work(i: int) -> None:
        nonlocal running, peak
        started.append(i)
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1

    async with anyio.create_task_group() as tg:
        for i in range(5):
            pool.submit(tg, work, i)
        await anyio.wait_all_tasks_blocked()
        assert pool.workers == 2 and running == 2 and len(pool.jobs) == 3 and pool.full
        with anyio.move_on_after(0.05):  # no room while every task is busy
            await pool.wait_room()
            raise AssertionError("room while the backlog is full")
        gate.set()
        with anyio.fail_after(5):
            await pool.wait_room()
        await anyio.wait_all_tasks_blocked()
        assert started == [0, 1, 2, 3, 4] and peak == 2 and not pool.jobs
        assert pool.workers == 2 and len(pool._idle) == 2  # kept, idle, for the next calls
        pool.submit(tg, work, 5)  # an idle task takes it: no new one
        await anyio.wait_all_tasks_blocked()
        assert pool.workers == 2 and started[-1] == 5
        tg.cancel_scope.cancel()
    assert pool.workers == 0 and not pool._idle  # cancelled while idle: nothing left behind
    with pytest.raises(ValueError, match="at least 1"):
        _Handlers(0, backlog=1)


async def test_tool_calls_beyond_concurrency_and_backlog_wait_and_all_get_answers(
        node: Node) -> None:
    # One task, two waiting calls: the rest stay unread in the session (backpressure)
    # and are answered in turn; none is lost.
    slow_name = f"org/ns/{unique('slow')}"
    slow = Agent(slow_name, concurrency=1, mailbox=2, plugins=make_plugin_manager(allow=False))
    running = peak = 0
    gate = anyio.Event()

    @slow.tool
    async def hold(i: int) -> int:
        """Wait for the gate.

        :param i: echoed back
        """
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return i

    user = Agent(f"org/ns/{unique('user')}", plugins=make_plugin_manager(allow=False))
    results: list[int] = []
    async with slow.run(node, secret=SECRET) as s, user.run(node, secret=SECRET) as u:

        async def call(i: int) -> None:
            results.append(await u.call(slow_name, "hold", i=i))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(call, i)
                await wait_until(lambda: running == 1 and s._handlers.full, timeout=15)
                assert len(s._handlers.jobs) == 2  # the others wait unread
                gate.set()
    assert sorted(results) == list(range(8)) and peak == 1 and s.handled == 8


DEEP = b"[" * 5000 + b"]" * 5000  # past the JSON decoder's nesting limit


async def test_a_request_nested_too_deeply_is_answered_as_a_bad_request(node: Node) -> None:
    from slim_agents import open_app
    from slim_agents._agent import CALL, CALL_ID

    calc_name = f"org/ns/{unique('calc')}"
    async with calculator(calc_name).run(node, secret=SECRET), \
            open_app(f"org/ns/{unique('raw')}", node=node, secret=SECRET) as raw:
        with anyio.fail_after(10):
            session = await raw.create_session(calc_name)
            await session.publish(DEEP, payload_type=CALL, metadata={CALL_ID: "c1"})
            answer = await session.get_message()
    assert answer.context.metadata[CALL_ID] == "c1"
    assert b'"code": "bad_request"' in answer.payload and b"too deeply" in answer.payload


@pytest.mark.parametrize("reply", [b"not json", b"[1, 2]", DEEP, b'{"ok": false, "error": 5}'],
                         ids=["not json", "a list", "nested too deeply", "error not a map"])
async def test_a_reply_that_is_not_a_result_is_a_typed_error(node: Node, reply: bytes) -> None:
    from slim_agents import open_app
    from slim_agents._agent import CALL_ID, RESULT

    fake_name = f"org/ns/{unique('fake')}"
    user = Agent(f"org/ns/{unique('user')}", plugins=make_plugin_manager(allow=False))

    async def answer(app: object) -> None:
        session = await app.listen_for_session()  # type: ignore[attr-defined]
        async for msg in session:
            await session.publish_to(msg.context, reply, payload_type=RESULT,
                                     metadata={CALL_ID: msg.context.metadata[CALL_ID]})

    async with open_app(fake_name, node=node, secret=SECRET) as fake, \
            user.run(node, secret=SECRET) as u, anyio.create_task_group() as tg:
        tg.start_soon(answer, fake)
        with anyio.fail_after(10), pytest.raises(ToolError) as info:
            await u.call(fake_name, "anything")
        tg.cancel_scope.cancel()
    if reply.startswith(b"{"):
        assert info.value.code == "failed"  # its error is unreadable: the default
    else:
        assert info.value.code == "bad_reply" and fake_name in str(info.value)


async def test_discovery_lists_an_app_with_an_unreadable_card_by_name(node: Node) -> None:
    from slim_agents import open_app

    ns = unique("cards")
    calc_name = f"org/{ns}/calc"
    user = Agent(f"org/{ns}/user", plugins=make_plugin_manager(allow=False))
    async with calculator(calc_name).run(node, secret=SECRET) as calc, \
            open_app(f"org/{ns}/deep", node=node, secret=SECRET) as deep, \
            open_app(f"org/{ns}/list", node=node, secret=SECRET) as listed, \
            user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            await deep.announce(DEEP)
            await listed.announce(b"[1]")
            # A node reads each connection in order: once an app's lookup is
            # answered, its announcement is in the directory.
            for app in (calc.app, deep, listed):
                await app.lookup(f"org/{ns}")
            cards = {str(c.name.without_id()): c for c in await u.discover(f"org/{ns}")}
    assert sorted(cards) == sorted([calc_name, f"org/{ns}/deep", f"org/{ns}/list"])
    assert cards[calc_name].known and cards[calc_name].description == "adds numbers"
    assert not cards[f"org/{ns}/deep"].known and not cards[f"org/{ns}/list"].known
