"""The node's opt-in busy polling: it polls after reads, then sleeps again."""

from __future__ import annotations

import anyio
import pytest

from node_lite import NodeConfig, open_node
from node_lite._transport import BusyPoll
from node_lite.wire import Publish
from tests.helpers import app_connection, wait_until


@pytest.mark.anyio
async def test_it_sleeps_until_a_read_then_polls_for_its_window() -> None:
    poll = BusyPoll(0.02)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll.run)
            await anyio.wait_all_tasks_blocked()  # asleep: nothing runs
            assert poll.sleeping
            assert poll.turns == 0
            poll.note()
            await wait_until(lambda: poll.turns > 0, message="polling")
            await wait_until(lambda: poll.sleeping, message="the window to close")
            turns = poll.turns
            await anyio.wait_all_tasks_blocked()  # asleep again: the loop may idle
            assert poll.turns == turns
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_reads_during_the_window_keep_it_open() -> None:
    window = 0.02
    poll = BusyPoll(window)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll.run)
            await anyio.wait_all_tasks_blocked()
            poll.note()
            await wait_until(lambda: poll.turns > 0, message="polling")
            # Reads for three windows in a row: it never goes back to sleep.
            end = anyio.current_time() + 3 * window
            while anyio.current_time() < end:
                poll.note()
                await anyio.lowlevel.checkpoint()
                assert not poll.sleeping
            await wait_until(lambda: poll.sleeping, message="the window to close")
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_busy_polling_node_routes_and_polls() -> None:
    async with open_node(NodeConfig(busy_poll=0.01)) as node, \
            app_connection(node, "a") as (a, a_name), app_connection(node, "b") as (b, b_name):
        poll = node._busy_poll
        assert poll is not None
        for i in range(3):
            await a.send(Publish(source=a_name, destination=b_name, payload=b"%d" % i))
            with anyio.fail_after(5):
                msg = await b.receive()
            assert isinstance(msg, Publish)
            assert msg.payload == b"%d" % i
        await wait_until(lambda: poll.turns > 0, message="the node to poll")


@pytest.mark.anyio
async def test_a_default_node_does_not_poll() -> None:
    async with open_node(NodeConfig()) as node:
        assert node._busy_poll is None


@pytest.mark.parametrize("value", ["1s", "soon", "5 days"])
def test_a_bad_command_line_value_exits_with_code_2(value: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from node_lite._process import main

    assert main(["--endpoint", "127.0.0.1:0", "--busy-poll", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert "busy" in err
