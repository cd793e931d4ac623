"""The live view: a node's links, apps, channels with their members, rates and drops."""

from __future__ import annotations

import io
import sys

import anyio
import pytest

from node_lite import NodeConfig, ServerConfig, open_node
from slim_agents import SessionConfig, open_app
from slim_agents._top import render_text, run_top, snapshot_from_report
from tests.helpers import SECRET, unique

pytestmark = pytest.mark.anyio


async def test_top_prints_the_channel_and_its_members_for_a_running_group() -> None:
    ns = unique("top")
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, \
            open_app(f"org/{ns}/mod", node=node, secret=SECRET) as mod, \
            open_app(f"org/{ns}/c1", node=node, secret=SECRET) as c1, \
            open_app(f"org/{ns}/c2", node=node, secret=SECRET) as c2:
        session, ready = await mod.start_session(
            f"org/{ns}/chat", SessionConfig.group(timeout=1.0, max_retries=5))
        with anyio.fail_after(10):
            await ready
            for member in (c1, c2):
                await session.invite(f"org/{ns}/{member.name.app}")
                await member.listen_for_session()
            for _ in range(5):
                await (await session.publish(b"tick"))

        async def fetch() -> dict[str, object]:
            await anyio.lowlevel.checkpoint()
            return node.report()

        out = io.StringIO()
        await run_top(fetch, interval=0.01, count=2, out=out)
    text = out.getvalue()
    block = text.strip().split("\n\n")[-1]
    channel_line = next(line for line in block.splitlines()
                        if line.strip().startswith(f"org/{ns}/chat:"))
    assert all(str(a.name) in channel_line for a in (mod, c1, c2))
    assert "connections:" in block and str(c1.name) in block
    assert text.count("node ") == 2  # two refreshes


def test_rates_and_drops_in_the_text_view(anyio_backend: str) -> None:
    def report(frames: int, drops: dict[str, int]) -> dict[str, object]:
        return {"node": "n1", "endpoints": ["127.0.0.1:1"], "totals": {"frames_in": frames},
                "drops": drops, "links": [{"endpoint": "x:1", "connected": False}],
                "connections": [{"id": 1, "kind": "app", "name": "org/ns/a/1",
                                 "frames_in": frames, "frames_out": 0, "pending_frames": 3,
                                 "drops": drops}], "channels": {}}

    before = snapshot_from_report(report(100, {}), at=10.0)
    now = snapshot_from_report(report(300, {"slow_consumer": 2}), at=12.0)
    text = render_text(now, before)
    assert "drops: slow_consumer 2" in text and "link x:1 -> ?: down" in text
    row = next(line for line in text.splitlines() if "org/ns/a/1" in line)
    assert row.split()[2:5] == ["100", "0", "3"]  # 200 frames in 2 s
    assert "(none)" in text


async def test_an_app_gets_the_node_report_over_the_wire_and_top_runs_as_a_command() -> None:
    ns = unique("wire")
    async with open_node(NodeConfig(shared_secret=SECRET, servers=(
            ServerConfig(endpoint="127.0.0.1:0"),))) as node, \
            open_app(f"org/{ns}/mod", node=node.url, secret=SECRET) as mod, \
            open_app(f"org/{ns}/c1", node=node.url, secret=SECRET) as c1:
        session, ready = await mod.start_session(
            f"org/{ns}/room", SessionConfig.group(timeout=1.0, max_retries=5))
        with anyio.fail_after(20):
            await ready
            await session.invite(f"org/{ns}/c1")
            await c1.listen_for_session()
            report = await c1.node_report()
            assert sorted(report["channels"][f"org/{ns}/room"]) == sorted(
                [str(mod.name), str(c1.name)])
            mine = next(c for c in report["connections"] if c["name"] == str(c1.name))
            assert mine["frames_in"] > 0 and mine["kind"] == "app"
            done = await anyio.run_process(
                [sys.executable, "-m", "slim_agents._cli", "top", "--node", node.url,
                 "--secret", SECRET, "--count", "2", "--interval", "0.05"])
    text = done.stdout.decode()
    assert f"org/{ns}/room: " in text and str(c1.name) in text and str(mod.name) in text
    assert text.count("connections:") == 2


async def test_malformed_report_answers_get_typed_errors() -> None:
    from node_lite import Limits, MalformedFrameError
    from node_lite.wire import ReportResult

    with pytest.raises(MalformedFrameError):
        ReportResult.from_dict({"v": 1, "t": "report_res", "rid": 1, "report": [1]}, Limits())
    assert ReportResult.from_dict({"v": 1, "t": "report_res", "rid": 2}, Limits()).report == {}


async def test_ctl_prints_a_node_report() -> None:
    import json

    async with open_node(NodeConfig(shared_secret=SECRET, servers=(
            ServerConfig(endpoint="127.0.0.1:0"),))) as node:
        with anyio.fail_after(20):
            done = await anyio.run_process(
                [sys.executable, "-m", "slim_agents._cli", "ctl", "node", "stats", "--node",
                 node.url, "--secret", SECRET])
    report = json.loads(done.stdout)
    assert report["node"] == node.node_id and report["totals"]["accepted"] >= 1
    assert any(c["name"].startswith("slim/top/viewer") for c in report["connections"])


async def test_statistics_count_exactly_what_a_scripted_exchange_did() -> None:
    ns = unique("count")
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, \
            open_app(f"org/{ns}/a", node=node, secret=SECRET) as a, \
            open_app(f"org/{ns}/b", node=node, secret=SECRET) as b:
        sender = await a.create_session(f"org/{ns}/b", SessionConfig(timeout=1.0,
                                                                       max_retries=5))
        receiver = await b.listen_for_session()

        def per_conn() -> dict[str, tuple[int, int, int, int]]:
            stats = node.statistics(per_connection=True).per_connection
            return {c.name: (c.frames_in, c.frames_out, c.bytes_in, c.bytes_out)
                    for c in stats if c.name}

        before = per_conn()
        with anyio.fail_after(10):
            for _ in range(10):  # each acknowledged before the next: one ack per message
                await (await sender.publish(b"x" * 100))
            for _ in range(10):
                assert (await receiver.get_message()).payload == b"x" * 100
        after = per_conn()
        report = await b.node_report()
    s, r = sender.statistics(), receiver.statistics()
    assert (s["published"], s["received"], s["retransmissions"], s["acks_pending"]) == \
        (10, 0, 0, 0)
    assert (r["published"], r["received"], r["dropped"], r["duplicates"]) == (0, 10, 0, 0)
    da = [x - y for x, y in zip(after[str(a.name)], before[str(a.name)], strict=True)]
    db = [x - y for x, y in zip(after[str(b.name)], before[str(b.name)], strict=True)]
    assert da[:2] == [10, 10] and db[:2] == [10, 10]  # 10 data in from a, 10 acks in from b
    assert da[2] == db[3] and db[2] == da[3]  # every byte in was forwarded, unchanged
    assert da[2] > 10 * 100  # the data frames carry the payloads
    wire = {c["name"]: c for c in report["connections"]}
    assert wire[str(a.name)]["frames_in"] >= after[str(a.name)][0]
    assert report["drops"] == {} and wire[str(a.name)]["drops"] == {}
