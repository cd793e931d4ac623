"""Wakeup: tasks wait until the next fire, and it is armed again after each."""

from __future__ import annotations

import anyio
import pytest

from node_lite._util import Wakeup

pytestmark = pytest.mark.anyio


async def test_a_fire_wakes_every_waiter_once_and_rearms() -> None:
    wakeup = Wakeup()
    wakeup.fire()  # nobody waits: nothing is kept for later
    assert not wakeup.waiting
    woken: list[int] = []

    async def waiter(i: int) -> None:
        await wakeup.wait()
        woken.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(waiter, i)
            while not wakeup.waiting:
                await anyio.lowlevel.checkpoint()
            await anyio.wait_all_tasks_blocked()
            wakeup.fire()
    assert sorted(woken) == [0, 1, 2]
    assert not wakeup.waiting
    with anyio.move_on_after(0.05) as scope:
        await wakeup.wait()  # the earlier fire does not count for a new wait
    assert scope.cancelled_caught
