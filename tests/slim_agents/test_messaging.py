"""The built-in messaging tools, discovery and the message hooks, through a real node."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, Message, Session, Tool, ToolError
from slim_agents._messaging import messaging_tools, tool_specs
from slim_agents._plugins import make_plugin_manager
from slim_agents.hookspecs import hookimpl
from tests.helpers import unique, wait_until

pytestmark = pytest.mark.anyio
SECRET = "messaging-test-secret-that-is-long-enough-0123"
SPECS = Path(__file__).parents[2] / "slim_agents" / "messaging_tools.json"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


def quiet_pm() -> Any:
    return make_plugin_manager(allow=False)


def by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools}


def echo_agent(name: str) -> Agent:
    echo = Agent(name, description="shouts back", plugins=quiet_pm())

    @echo.on_message
    async def shout(msg: Message, session: Session) -> str:
        return msg.payload.decode().upper()

    @echo.tool
    async def length(text: str) -> int:
        """Count characters.

        :param text: what to measure
        """
        return len(text)

    return echo


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_the_tool_specs_match_the_published_fixture(anyio_backend: str) -> None:
    # Frameworks and prompts depend on these; a change must be deliberate
    # (regenerate: python -m slim_agents._messaging > slim_agents/messaging_tools.json).
    assert tool_specs(messaging_tools(None)) == SPECS.read_text()  # type: ignore[arg-type]
    for spec in json.loads(SPECS.read_text()):
        params = spec["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        assert "$ref" not in json.dumps(params)
        assert all(p.get("description") for p in params["properties"].values())


async def test_point_to_point_tools_discovery_and_the_mailbox(node: Node) -> None:
    ns = unique("msg")
    echo_name, quiet_name = f"org/{ns}/echo", f"org/{ns}/quiet"
    boss = Agent(f"org/{ns}/boss", plugins=quiet_pm())
    quiet = Agent(quiet_name, description="reads its mail", plugins=quiet_pm())
    async with echo_agent(echo_name).run(node, secret=SECRET), \
            quiet.run(node, secret=SECRET) as q, boss.run(node, secret=SECRET) as b:
        tools, qtools = by_name(b.messaging_tools()), by_name(q.messaging_tools())
        with anyio.fail_after(15):
            found = await tools["discover_agents"].run({"prefix": f"org/{ns}"})
            assert [a["name"].rsplit("/", 1)[0] for a in found] == [echo_name, quiet_name]
            assert found[0]["description"] == "shouts back" and found[0]["tools"] == ["length"]
            spec = await tools["describe_agent"].run({"agent_name": echo_name})
            assert spec["tools"][0]["parameters"]["required"] == ["text"]
            assert await tools["call_tool"].run(
                {"agent_name": echo_name, "tool": "length", "arguments": {"text": "four"}}) == 4

            # A handler's return value is the reply.
            answer = await tools["request"].run({"to": echo_name, "text": "hello"})
            assert answer["text"] == "HELLO" and answer["from"].startswith(echo_name)

            # A mailbox agent reads and replies (the way a model would).
            assert await tools["send_message"].run({"to": quiet_name, "text": "fyi"}) == \
                {"sent": True}

            async def ask() -> None:
                result["answer"] = await tools["request"].run(
                    {"to": quiet_name, "text": "how are you?", "timeout": 10})

            result: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                await wait_until(lambda: len(q._mailbox) == 2, message="two messages")
                mail = await qtools["read_mailbox"].run({})
                assert [m["text"] for m in mail] == ["fyi", "how are you?"]
                assert "expects_reply" not in mail[0] and mail[1]["expects_reply"] is True
                assert await qtools["reply"].run(
                    {"message_id": mail[1]["id"], "text": "fine"}) == {"sent": True}
            assert result["answer"]["text"] == "fine"

            # wait_mailbox hands over the next message, or null in time.
            async with anyio.create_task_group() as tg:
                tg.start_soon(tools["send_message"].run, {"to": quiet_name, "text": "later"})
                got = await qtools["wait_mailbox"].run({"timeout": 10})
            assert got["text"] == "later"
            assert await qtools["wait_mailbox"].run({"timeout": 0.05}) is None


async def test_errors_come_back_as_results_a_model_reads(node: Node) -> None:
    ns = unique("err")
    boss = Agent(f"org/{ns}/boss", plugins=quiet_pm())
    async with boss.run(node, secret=SECRET) as b:
        tools = by_name(b.messaging_tools())
        with anyio.fail_after(15):
            cases = [
                ("request", {"to": f"org/{ns}/nobody", "text": "hi"}, "no_route"),
                ("call_tool", {"agent_name": f"org/{ns}/nobody", "tool": "x"}, "no_route"),
                ("reply", {"message_id": 12345, "text": "hi"}, "not_found"),
                ("broadcast", {"channel": f"org/{ns}/nowhere", "text": "hi"}, "not_member"),
                ("invite", {"channel": f"org/{ns}/nowhere", "member": "a/b/c"}, "not_member"),
                ("leave_group", {"channel": f"org/{ns}/nowhere"}, "not_member"),
                ("request", {"to": "not a name", "text": "hi"}, "bad_arguments"),
                ("request", {"to": f"org/{ns}/x", "text": "hi", "timeout": -1}, "bad_arguments"),
                ("request", {"to": f"org/{ns}/x"}, "bad_arguments"),
                ("send_message", {"to": f"org/{ns}/x", "text": 5}, "bad_arguments"),
            ]
            for name, args, code in cases:
                result = await tools[name].run(args)
                assert result["error"]["code"] == code, (name, args, result)
                assert result["error"]["message"]
        with pytest.raises(ToolError) as info:
            await tools["reply"]({"message_id": 1, "text": "x"})
        assert info.value.code == "not_found"


async def test_a_request_that_gets_no_answer_times_out(node: Node) -> None:
    ns = unique("slow")
    mute = Agent(f"org/{ns}/mute", plugins=quiet_pm())

    @mute.on_message
    async def ignore(msg: Message, session: Session) -> None:
        return None

    boss = Agent(f"org/{ns}/boss", plugins=quiet_pm())
    async with mute.run(node, secret=SECRET), boss.run(node, secret=SECRET) as b:
        tools = by_name(b.messaging_tools())
        with anyio.fail_after(15):
            result = await tools["request"].run(
                {"to": f"org/{ns}/mute", "text": "anyone?", "timeout": 0.2})
        assert result["error"]["code"] == "timeout"
        assert not b._waiters  # nothing left behind


async def test_group_tools(node: Node) -> None:
    ns = unique("grp")
    channel = f"org/{ns}/room"
    echo_name, quiet_name = f"org/{ns}/echo", f"org/{ns}/quiet"
    boss = Agent(f"org/{ns}/boss", plugins=quiet_pm())
    quiet = Agent(quiet_name, plugins=quiet_pm())
    async with echo_agent(echo_name).run(node, secret=SECRET), \
            quiet.run(node, secret=SECRET) as q, boss.run(node, secret=SECRET) as b:
        tools, qtools = by_name(b.messaging_tools()), by_name(q.messaging_tools())
        with anyio.fail_after(20):
            made = await tools["create_group"].run(
                {"channel": channel, "members": [echo_name, quiet_name]})
            assert len(made["members"]) == 3
            again = await tools["create_group"].run({"channel": channel})
            assert again["error"]["code"] == "exists"
            await wait_until(lambda: bool(q.groups), message="quiet sees the group")
            [listed] = await qtools["list_groups"].run({})
            assert listed["channel"] == channel and listed["moderator"].startswith(f"org/{ns}/boss")

            sent = await tools["broadcast"].run({"channel": channel, "text": "news"})
            assert sent == {"sent": True, "members": 2}
            news = await qtools["wait_mailbox"].run({"timeout": 10})
            assert news["text"] == "news" and news["group"] == channel

            async def answer_quietly() -> None:
                asked = await qtools["wait_mailbox"].run({"timeout": 10})
                await qtools["reply"].run({"message_id": asked["id"], "text": "quiet yes"})

            async with anyio.create_task_group() as tg:
                tg.start_soon(answer_quietly)
                gathered = await tools["gather"].run({"channel": channel, "text": "ready?"})
            assert sorted(r["text"] for r in gathered["replies"]) == ["READY?", "quiet yes"]
            # With fewer replies than asked for, the timeout returns what came.
            partial = await tools["gather"].run(
                {"channel": channel, "text": "again?", "count": 2, "timeout": 0.5})
            assert [r["text"] for r in partial["replies"]] == ["AGAIN?"]

            removed = await tools["remove_member"].run({"channel": channel, "member": quiet_name})
            assert removed == {"removed": quiet_name}
            await wait_until(lambda: not q.groups, message="quiet removed")
            missing = await tools["remove_member"].run(
                {"channel": channel, "member": quiet_name})
            assert missing["error"]["code"] == "not_found"
            invited = await tools["invite"].run({"channel": channel, "member": quiet_name})
            assert invited["invited"].startswith(quiet_name) and len(invited["members"]) == 3
            await wait_until(lambda: bool(q.groups), message="quiet back")
            assert await qtools["leave_group"].run({"channel": channel}) == {"left": channel}
            await wait_until(lambda: len(b.group(channel).participants) == 2,
                             message="quiet left")
            assert await tools["leave_group"].run({"channel": channel}) == {"left": channel}
            assert await tools["list_groups"].run({}) == []


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.membership: list[tuple[list[str], list[str]]] = []
        self.received: list[bytes] = []

    @hookimpl
    def slim_before_send(self, payload: bytes, metadata: dict[str, str]) -> bytes | None:
        metadata["trace"] = "t-1"
        return payload + b" (signed)" if payload.startswith(b"note") else None

    @hookimpl
    def slim_after_receive(self, message: Message) -> Message | None:
        self.received.append(message.payload)
        if message.payload.startswith(b"secret"):
            return message._replace(payload=b"[redacted]")
        return None

    @hookimpl
    def slim_session_event(self, session: Session, event: str) -> None:
        self.events.append((event, session.kind.name))

    @hookimpl
    def slim_membership_event(self, session: Session, added: list[Any],
                              removed: list[Any]) -> None:
        self.membership.append(([str(n) for n in added], [str(n) for n in removed]))


async def test_message_hooks_see_and_change_traffic(node: Node) -> None:
    ns = unique("hooks")
    rec_send, rec_recv = Recorder(), Recorder()
    pm_send, pm_recv = quiet_pm(), quiet_pm()
    pm_send.register(rec_send)
    pm_recv.register(rec_recv)
    sender = Agent(f"org/{ns}/sender", plugins=pm_send)
    receiver = Agent(f"org/{ns}/receiver", plugins=pm_recv)
    async with receiver.run(node, secret=SECRET) as r, sender.run(node, secret=SECRET) as s:
        with anyio.fail_after(15):
            await s.send(r.name, "note to self")
            await s.send(r.name, "secret plans")
            first, second = await r.wait_mailbox(), await r.wait_mailbox()
            assert first.message.payload == b"note to self (signed)"
            assert first.message.context.metadata["trace"] == "t-1"
            assert second.message.payload == b"[redacted]"
            assert rec_recv.received == [b"note to self (signed)", b"secret plans"]
            # Membership events on both sides of a group.
            channel = f"org/{ns}/room"
            await s.create_group(channel, [str(r.name)])
            await wait_until(lambda: any(str(r.name) in added
                                         for added, _ in rec_send.membership),
                             message="moderator sees the join")
            await s.remove(channel, r.name)
            await wait_until(lambda: any(str(r.name) in removed
                                         for _, removed in rec_send.membership),
                             message="moderator sees the removal")
            await wait_until(lambda: ("closed", "GROUP") in rec_recv.events,
                             message="receiver's group session closed")
    assert ("established", "POINT_TO_POINT") in rec_send.events
    assert ("established", "POINT_TO_POINT") in rec_recv.events
    assert ("established", "GROUP") in rec_recv.events


async def test_a_handler_failure_answers_a_request_with_an_error(node: Node,
                                                                caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    ns = unique("boom")
    broken = Agent(f"org/{ns}/broken", plugins=quiet_pm())

    @broken.on_message
    async def explode(msg: Message, session: Session) -> str:
        raise KeyError("missing")

    boss = Agent(f"org/{ns}/boss", plugins=quiet_pm())
    async with broken.run(node, secret=SECRET), boss.run(node, secret=SECRET) as b:
        with anyio.fail_after(15):
            answer = await b.request(f"org/{ns}/broken", "go")
    assert answer.context.payload_type == "slim-agents/error"
    assert json.loads(answer.payload)["error"]["code"] == "handler_failed"
    assert "message handler failed" in caplog.text


async def test_the_mailbox_keeps_arrival_order_and_pushes_back_when_full(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    ns = unique("order")
    rx = Agent(f"org/{ns}/rx", mailbox=10, plugins=quiet_pm())
    tx = Agent(f"org/{ns}/tx", plugins=quiet_pm())
    async with rx.run(node, secret=SECRET) as r, tx.run(node, secret=SECRET) as t:
        with anyio.fail_after(20):
            async def send_all() -> None:
                for i in range(50):
                    await t.send(r.name, str(i))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send_all)
                # The warning comes when the 11th message finds the mailbox full.
                await wait_until(lambda: "the mailbox is full" in caplog.text,
                                 message="the warning of a full mailbox")
                assert len(r._mailbox) == 10
                got = []
                while len(got) < 50:
                    got.append(int((await r.wait_mailbox()).message.payload))
    assert got == list(range(50))  # in order, and nothing dropped


async def test_handlers_reach_their_running_agent_and_start_hooks_run(node: Node) -> None:
    ns = unique("relay")
    relay = Agent(f"org/{ns}/relay", plugins=quiet_pm())
    started: list[str] = []

    @relay.on_start
    async def hello(running: Any) -> None:
        started.append(str(running.name))

    @relay.on_message
    async def forward(msg: Message, session: Session) -> str:
        assert relay.running is not None
        answer = await relay.running.request(f"org/{ns}/echo", msg.payload)
        return answer.payload.decode() + "!"

    boss = Agent(f"org/{ns}/boss", plugins=quiet_pm())
    async with echo_agent(f"org/{ns}/echo").run(node, secret=SECRET), \
            relay.run(node, secret=SECRET) as r, boss.run(node, secret=SECRET) as b:
        with anyio.fail_after(15):
            answer = await b.request(f"org/{ns}/relay", "hop")
            await wait_until(lambda: bool(started), message="on_start ran")
        assert started == [str(r.name)]
    assert answer.payload == b"HOP!" and relay.running is None
