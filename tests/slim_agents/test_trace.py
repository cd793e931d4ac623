"""Session traces: recorded at a node or an agent, drawn as sequence diagrams."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, SessionConfig, open_app
from slim_agents._plugins import make_plugin_manager
from slim_agents._trace import (
    TracePlugin,
    TraceRecorder,
    load_trace,
    phases,
    record_node,
    render_mermaid,
)
from tests.helpers import SECRET, unique

pytestmark = pytest.mark.anyio
GROUP = SessionConfig.group(timeout=1.0, max_retries=5)


@pytest.fixture
async def node() -> Node:  # type: ignore[misc]
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


async def invite_third_member(node: Node, *, mls: bool, text: str) -> list[dict[str, object]]:
    ns = unique("tr")
    async with open_app(f"org/{ns}/mod", node=node, secret=SECRET) as mod, \
            open_app(f"org/{ns}/c1", node=node, secret=SECRET) as c1, \
            open_app(f"org/{ns}/c2", node=node, secret=SECRET) as c2:
        config = SessionConfig.group(timeout=1.0, max_retries=5, mls_enabled=mls)
        session, ready = await mod.start_session(f"org/{ns}/chat", config)
        await ready
        await session.invite(f"org/{ns}/c1")
        first = await c1.listen_for_session()
        out = io.StringIO()
        with anyio.fail_after(10), record_node(node, TraceRecorder(out, text=200)):
            await session.invite(f"org/{ns}/c2")
            second = await c2.listen_for_session()
            await (await session.publish(text.encode()))  # acknowledged by both
            assert (await first.get_message()).payload == text.encode()
            assert (await second.get_message()).payload == text.encode()
        return load_trace(out.getvalue().splitlines())


async def test_an_invite_into_a_group_of_three_draws_the_seeds_phases(node: Node) -> None:
    events = await invite_third_member(node, mls=False, text="hello, group")
    seen = phases(events)
    order = ["discovery request", "discovery reply", "join request", "join reply",
             "group update", "group ack", "welcome", "group ack", "msg", "ack"]
    positions = []
    start = 0
    for kind in order:  # each phase appears, after the one before it
        start = seen.index(kind, start)
        positions.append(start)
    assert positions == sorted(positions)
    update = next(e for e in events if e["kind"] == "group update")
    assert str(update["dst"]).endswith("/chat") and update["group"] is True
    diagram = render_mermaid(events, title="invite")
    lines = diagram.splitlines()
    assert lines[0] == "sequenceDiagram" and lines[1] == "    title invite"
    arrows = [line for line in lines if "->>" in line]
    labels = [a.split(": ", 1)[1] for a in arrows]
    assert labels[:4] == ["discovery request", "discovery reply", "join request", "join reply"]
    assert any(label == "msg #1: hello, group" for label in labels)
    assert all(a.split(":")[0].strip().replace("-", "").replace(">", "").replace("p", "")
               .isdigit() for a in arrows)  # pN->>pM: label


async def test_an_encrypted_session_trace_holds_no_plaintext(node: Node) -> None:
    secret_text = "the launch code is 0000"
    events = await invite_third_member(node, mls=True, text=secret_text)
    raw = json.dumps(events)
    assert secret_text not in raw and "launch" not in raw
    assert "launch" not in render_mermaid(events)
    assert any(e["kind"] == "msg" and "text" not in e for e in events)


async def test_recording_only_some_sessions_and_without_text(node: Node) -> None:
    ns = unique("only")
    recorder = TraceRecorder()
    async with open_app(f"org/{ns}/a", node=node, secret=SECRET) as a, \
            open_app(f"org/{ns}/b", node=node, secret=SECRET) as b:
        s1 = await a.create_session(f"org/{ns}/b", SessionConfig(timeout=1.0, max_retries=5))
        r1 = await b.listen_for_session()
        recorder.sessions = {s1.id}
        with anyio.fail_after(10), record_node(node, recorder):
            s2 = await a.create_session(f"org/{ns}/b", SessionConfig(timeout=1.0,
                                                                     max_retries=5))
            r2 = await b.listen_for_session()
            await (await s1.publish(b"one"))
            await (await s2.publish(b"two"))
            await r1.get_message()
            await r2.get_message()
    assert {e["sid"] for e in recorder.events} == {s1.id}
    assert all("text" not in e for e in recorder.events)  # text is opt-in


async def test_an_agent_records_its_own_messages_through_the_hooks(node: Node) -> None:
    ns = unique("agent")
    recorder = TraceRecorder(text=10)
    pm = make_plugin_manager(allow=False)
    pm.register(TracePlugin(recorder))
    echo = Agent(f"org/{ns}/echo", plugins=make_plugin_manager(allow=False))

    @echo.on_message
    async def shout(msg, session):  # type: ignore[no-untyped-def]
        return msg.payload.upper()

    async with echo.run(node, secret=SECRET), \
            Agent(f"org/{ns}/me", plugins=pm).run(node, secret=SECRET) as me:
        with anyio.fail_after(10):
            await me.request(f"org/{ns}/echo", "ping")
    assert [(e["dir"], e["text"]) for e in recorder.events] == [("send", "ping"),
                                                                ("receive", "PING")]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # subprocesses: one backend is enough
async def test_the_trace_command_records_at_a_node_and_renders(tmp_path: Path,
                                                               anyio_backend: str) -> None:
    trace = tmp_path / "trace.jsonl"
    argv = [sys.executable, "-m", "slim_agents._cli", "trace", "record", "--endpoint",
            "127.0.0.1:0", "--shared-secret", SECRET, "--out", str(trace)]
    async with await anyio.open_process(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with anyio.fail_after(30):
            line = b""
            async for chunk in proc.stdout:
                line += chunk
                if b"\n" in line:
                    break
            url = "http://" + line.decode().split()[-1]
            ns = unique("cli")
            async with open_app(f"org/{ns}/a", node=url, secret=SECRET) as a, \
                    open_app(f"org/{ns}/b", node=url, secret=SECRET) as b:
                s = await a.create_session(f"org/{ns}/b",
                                           SessionConfig(timeout=1.0, max_retries=5))
                r = await b.listen_for_session()
                await (await s.publish(b"traced"))
                await r.get_message()
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    done = await anyio.run_process([sys.executable, "-m", "slim_agents._cli", "trace",
                                    "render", str(trace), "--no-acks"], check=True)
    rendered = done.stdout.decode()
    assert rendered.startswith("```mermaid\nsequenceDiagram\n") and rendered.endswith("```\n")
    assert "join request" in rendered and "msg #1" in rendered and "ack #" not in rendered
    assert "traced" not in rendered  # text is opt-in at recording


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_demo_writes_a_trace(tmp_path: Path, anyio_backend: str) -> None:
    from slim_agents._demo import run_demo

    trace = tmp_path / "demo.jsonl"
    lines: list[str] = []
    assert await run_demo(lines.append, trace=str(trace)) == 0
    events = load_trace(trace.read_text().splitlines())
    kinds = phases(events)
    assert kinds[0] == "discovery request" and "welcome" in kinds and kinds[-1] in (
        "close", "group ack", "leave reply")
    assert all("text" not in e for e in events)


def test_a_message_carrying_acks_is_marked() -> None:
    from node_lite import Name
    from slim_agents._protocol import Kind, build_frame, encode_body

    a, b = Name("org", "ns", "a", 1).to_wire(), Name("org", "ns", "b", 2).to_wire()
    recorder = TraceRecorder()
    plain = build_frame(a, b, fanout=1, sid=7, st=1, kind=Kind.MSG, mid=4, body=b"x")
    carrying = build_frame(b, a, fanout=1, sid=7, st=1, kind=Kind.MSG, mid=9, body=b"y",
                           ack=encode_body({"a": [[4, 4]], "at": 4}))
    recorder.feed_bytes(1, plain + carrying)
    first, second = recorder.events
    assert "acks" not in first and second["acks"] is True and second["mid"] == 9
    labels = [line.split(": ", 1)[1] for line in render_mermaid(recorder.events).splitlines()
              if "->>" in line]
    assert labels == ["msg #4 (1 B)", "msg #9 (1 B) +ack"]
