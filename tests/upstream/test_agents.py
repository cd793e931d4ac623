"""Agents and their messaging tools with the same test bodies on node_lite and upstream SLIM.

Agents connect with ``Agent.run(network.url, secret=...)``: an ``http://`` URL
runs them on node_lite, a ``slim://`` URL on upstream SLIM through the backend
plugin. Discovery is the one designed difference (upstream has no directory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from slim_agents import Agent, Message, Session, SlimError, Tool, ToolError
from slim_agents._plugins import make_plugin_manager
from slim_agents.hookspecs import hookimpl
from tests.helpers import unique
from tests.slim_agents.test_agents import calculator
from tests.upstream import Network, network, upstream_plugin, upstream_server_url

__all__ = ["network", "upstream_plugin", "upstream_server_url"]  # fixtures used here

pytestmark = pytest.mark.anyio
LIMIT = 30  # seconds a test may take before it fails


class SessionEvents:
    """A plugin that records the session events of an agent, to wait on them without polling."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed: anyio.Event | None = None

    @hookimpl
    def slim_session_event(self, agent: Agent, session: Session, event: str) -> None:
        self.seen.append((session.kind.name, event))
        e, self._changed = self._changed, None
        if e is not None:
            e.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def count(self, kind: str, event: str) -> int:
        return self.seen.count((kind, event))


def quiet(*plugins: object) -> Any:
    pm = make_plugin_manager(allow=False)
    for p in plugins:
        pm.register(p)
    return pm


def by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools}


def echo_agent(name: str) -> Agent:
    echo = Agent(name, description="shouts back", plugins=quiet())

    @echo.on_message
    async def shout(msg: Message, session: Session) -> str:
        return msg.payload.decode().upper()

    return echo


async def test_a_tool_call_between_two_agents(network: Network) -> None:
    ns = unique("tools")
    calc = f"org/{ns}/calc"
    user = Agent(f"org/{ns}/user", plugins=quiet())
    with anyio.fail_after(LIMIT):
        async with calculator(calc).run(network.url, secret=network.secret), \
                user.run(network.url, secret=network.secret) as u:
            assert await u.call(calc, "add", a=2, b=40) == 42
            assert await u.call(calc, "add", a=1, b=1) == 2  # the session is reused
            with pytest.raises(ToolError) as info:
                await u.call(calc, "fail")
            assert "kaput" in str(info.value)
            with pytest.raises(ToolError) as info:
                await u.call(calc, "nope")
            assert info.value.code == "not_found"
            described = await u.describe(calc)
            assert described["description"] == "adds numbers"
            tools = by_name(await u.remote_tools(calc))
            assert sorted(tools) == ["add", "fail"]
            assert await tools["add"].run({"a": 3, "b": 4}) == 7
            assert len(u._peers) == 1


async def test_messaging_tools_request_and_gather(network: Network) -> None:
    ns = unique("msg")
    channel = f"org/{ns}/room"
    echo_name, quiet_name = f"org/{ns}/echo", f"org/{ns}/quiet"
    events = SessionEvents()
    boss = Agent(f"org/{ns}/boss", plugins=quiet())
    listener = Agent(quiet_name, plugins=quiet(events))
    url, secret = network.url, network.secret
    with anyio.fail_after(LIMIT):
        async with echo_agent(echo_name).run(url, secret=secret), \
                listener.run(url, secret=secret) as q, boss.run(url, secret=secret) as b:
            tools, qtools = by_name(b.messaging_tools()), by_name(q.messaging_tools())
            answer = await tools["request"].run({"to": echo_name, "text": "hi"})
            assert answer["text"] == "HI" and answer["from"].startswith(echo_name)
            assert await tools["send_message"].run({"to": quiet_name, "text": "note"}) == \
                {"sent": True}
            note = await qtools["wait_mailbox"].run({"timeout": 10})
            assert note["text"] == "note" and note["from"].startswith(f"org/{ns}/boss")

            made = await tools["create_group"].run(
                {"channel": channel, "members": [echo_name, quiet_name]})
            assert len(made["members"]) == 3
            await events.wait_for(lambda: events.count("GROUP", "established") == 1)
            [listed] = await qtools["list_groups"].run({})
            assert listed["channel"] == channel
            assert listed["moderator"].startswith(f"org/{ns}/boss")
            assert len(listed["members"]) == 3

            sent = await tools["broadcast"].run({"channel": channel, "text": "news"})
            assert sent == {"sent": True, "members": 2}
            news = await qtools["wait_mailbox"].run({"timeout": 10})
            assert news["text"] == "news" and news["group"] == channel

            async def answer_quietly() -> None:
                asked = await qtools["wait_mailbox"].run({"timeout": 10})
                assert asked["expects_reply"]
                await qtools["reply"].run({"message_id": asked["id"], "text": "quiet yes"})

            async with anyio.create_task_group() as tg:
                tg.start_soon(answer_quietly)
                gathered = await tools["gather"].run({"channel": channel, "text": "ready?"})
            assert sorted(r["text"] for r in gathered["replies"]) == ["READY?", "quiet yes"]

            removed = await tools["remove_member"].run({"channel": channel, "member": quiet_name})
            assert removed == {"removed": quiet_name}
            await events.wait_for(lambda: events.count("GROUP", "closed") == 1)
            assert not q.groups
            missing = await tools["remove_member"].run({"channel": channel, "member": quiet_name})
            assert missing["error"]["code"] == "not_found"
            invited = await tools["invite"].run({"channel": channel, "member": quiet_name})
            assert invited["invited"].startswith(quiet_name) and len(invited["members"]) == 3
            await events.wait_for(lambda: events.count("GROUP", "established") == 2)
            assert await qtools["leave_group"].run({"channel": channel}) == {"left": channel}
            assert not q.groups
            assert await tools["leave_group"].run({"channel": channel}) == {"left": channel}
            assert await tools["list_groups"].run({}) == []


async def test_discovery_needs_a_directory(network: Network) -> None:
    ns = unique("disc")
    calc = f"org/{ns}/calc"
    user = Agent(f"org/{ns}/user", plugins=quiet())
    with anyio.fail_after(LIMIT):
        async with calculator(calc).run(network.url, secret=network.secret), \
                user.run(network.url, secret=network.secret) as u:
            tools = by_name(u.messaging_tools())
            found = await tools["discover_agents"].run({"prefix": f"org/{ns}"})
            if network.upstream:
                # Upstream SLIM has no directory: a typed error, and a code a model can read.
                assert found["error"]["code"] == "unsupported"
                with pytest.raises(SlimError) as info:
                    await u.discover(f"org/{ns}")
                assert info.value.code == "unsupported"
            else:
                assert [a["name"] for a in found] == [str((await u.discover())[0].name)]
                assert found[0]["tools"] == ["add", "fail"]
            # Addressing by name works on both.
            assert await tools["call_tool"].run(
                {"agent_name": calc, "tool": "add", "arguments": {"a": 1, "b": 2}}) == 3
