"""Sessions with the same test bodies on node_lite and on upstream SLIM, on asyncio and trio.

Where upstream behaves differently by design (close reasons of removed members,
encryption state, error timing), the test says which backend expects what.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, aclosing

import anyio
import pytest

from slim_agents import (
    Name,
    NoRouteError,
    NotModeratorError,
    ParticipantError,
    SessionClosedError,
    SessionConfig,
    SessionKind,
    open_app,
)
from tests.helpers import unique
from tests.upstream import Network, network, upstream_plugin, upstream_server_url

__all__ = ["network", "upstream_plugin", "upstream_server_url"]  # fixtures used here

pytestmark = pytest.mark.anyio
RELIABLE = SessionConfig(timeout=0.5, max_retries=10)
GROUP = SessionConfig.group(timeout=0.5, max_retries=10)
LIMIT = 20  # seconds a test may take before it fails


async def test_p2p_request_reply_with_metadata_and_payload_type(network: Network) -> None:
    ns = unique("p2p")
    config = SessionConfig(timeout=0.5, max_retries=10, metadata={"topic": "sums"})
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/alice", node=network.url, secret=network.secret) as a, \
                open_app(f"org/{ns}/bob", node=network.url, secret=network.secret) as b:
            s = await a.create_session(f"org/{ns}/bob", config)
            r = await b.listen_for_session()
            assert s.id == r.id
            assert s.kind is r.kind is SessionKind.POINT_TO_POINT
            assert (s.src, s.dst, r.src, r.dst) == (a.name, b.name, b.name, a.name)
            assert r.metadata["topic"] == "sums" and "topic" in dict(r.metadata)
            assert s.moderator == r.moderator == a.name and s.is_moderator
            assert not r.is_moderator
            assert sorted(map(str, r.participants)) == sorted(map(str, (a.name, b.name)))

            report = await (await s.publish(b"2+2", payload_type="question",
                                            metadata={"request-id": "q1"}))
            assert report.ok and report.reliable and report.delivered == (b.name,)
            ctx, payload = await r.get_message()
            assert payload == b"2+2"
            assert (ctx.source_name, ctx.payload_type, dict(ctx.metadata)) == \
                (a.name, "question", {"request-id": "q1"})
            assert ctx.session_id == s.id and ctx.identity

            await r.publish_to(ctx, b"4", payload_type="answer", metadata={"reply-to": "q1"})
            reply = await s.get_message()
            assert (reply.payload, reply.context.source_name) == (b"4", b.name)
            assert (reply.context.payload_type, dict(reply.context.metadata)) == \
                ("answer", {"reply-to": "q1"})
            assert a.sessions == [s] and b.sessions == [r]


async def test_best_effort_reports_at_once_and_iteration_ends_on_close(
        network: Network) -> None:
    ns = unique("be")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/alice", node=network.url, secret=network.secret) as a, \
                open_app(f"org/{ns}/bob", node=network.url, secret=network.secret) as b:
            s = await a.create_session(f"org/{ns}/bob", SessionConfig())
            r = await b.listen_for_session()
            handles = [await s.publish(b"m%d" % i) for i in range(20)]
            reports = [await h for h in handles]
            assert all(not rep.reliable for rep in reports)
            assert all(h.done for h in handles)
            got = [(await r.get_message()).payload for _ in range(20)]
            assert sorted(got) == sorted(b"m%d" % i for i in range(20))

            await s.close()
            await s.close()  # twice is harmless
            assert s.is_closed and s.close_reason == "closed"
            assert await r.wait_closed() == "closed by peer"
            assert [m async for m in r] == []
            with pytest.raises(SessionClosedError):
                await s.publish(b"late")
            with pytest.raises(SessionClosedError):
                await r.get_message()
            assert a.sessions == [] and b.sessions == []


async def test_group_invite_publish_remove_close_with_rosters(network: Network) -> None:
    ns = unique("grp")
    chan = Name("org", ns, "room")
    with anyio.fail_after(LIMIT):
        async with AsyncExitStack() as stack:
            mod, m1, m2 = [await stack.enter_async_context(
                open_app(f"org/{ns}/{who}", node=network.url, secret=network.secret))
                for who in ("mod", "m1", "m2")]
            g = await mod.create_session(chan, GROUP)
            assert g.is_moderator and g.participants == [mod.name] and g.dst == chan
            assert await g.invite(f"org/{ns}/m1") == m1.name
            s1 = await m1.listen_for_session()
            assert await g.invite(m2.name.without_id()) == m2.name
            s2 = await m2.listen_for_session()
            everyone = {mod.name, m1.name, m2.name}
            for s in (g, s1, s2):
                assert s.kind is SessionKind.GROUP and s.dst == chan and s.id == g.id
                assert s.participants[0] == mod.name and set(s.participants) == everyone
                assert s.moderator == mod.name
            assert await s1.wait_participants(3)
            assert not s1.is_moderator

            with pytest.raises(NotModeratorError):
                await s1.invite(f"org/{ns}/m2")
            with pytest.raises(ParticipantError):
                await g.invite(m1.name)
            with pytest.raises(ParticipantError):
                await g.remove(f"org/{ns}/nobody")

            report = await (await g.publish(b"hello all", payload_type="news"))
            assert set(report.delivered) == {m1.name, m2.name}
            for s in (s1, s2):
                ctx, payload = await s.get_message()
                assert (payload, ctx.source_name, ctx.payload_type) == \
                    (b"hello all", mod.name, "news")
            await s1.publish(b"from m1")
            for s in (g, s2):
                ctx, payload = await s.get_message()
                assert (payload, ctx.source_name) == (b"from m1", m1.name)

            # A direct message reaches only its target: m2's next message is the broadcast.
            direct = await (await g.publish_to(ctx, b"just you"))
            assert direct.delivered == (m1.name,)
            await g.publish(b"everyone again")
            msg = await s1.get_message()
            assert (msg.payload, msg.context.direct) == (b"just you", True)
            assert (await s2.get_message()).payload == b"everyone again"
            assert (await s1.get_message()).payload == b"everyone again"

            changes = []

            async def watch() -> None:
                async with aclosing(s1.watch_roster()) as roster:
                    async for change in roster:
                        changes.append(change)
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await anyio.lowlevel.checkpoint()
                await g.remove(f"org/{ns}/m2")  # a base name picks the member
            assert changes == [([], [m2.name])]
            removed = await s2.wait_closed()
            # Upstream does not tell a removed member from a closed group.
            assert removed == ("closed by moderator" if network.upstream else "removed")
            assert set(g.participants) == {mod.name, m1.name}

            await g.close()
            assert await s1.wait_closed() == "closed by moderator"
            assert g.close_reason == "closed" and mod.sessions == []


async def test_encrypted_sessions(network: Network) -> None:
    ns = unique("mls")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/alice", node=network.url, secret=network.secret) as a, \
                open_app(f"org/{ns}/bob", node=network.url, secret=network.secret) as b:
            s = await a.create_session(f"org/{ns}/bob",
                                       SessionConfig(timeout=0.5, max_retries=10,
                                                     mls_enabled=True))
            r = await b.listen_for_session()
            assert r.config.mls_enabled
            await s.publish(b"secret", metadata={"k": "v"})
            ctx, payload = await r.get_message()
            assert (payload, dict(ctx.metadata)) == (b"secret", {"k": "v"})

            g = await a.create_session(Name("org", ns, "vault"),
                                       SessionConfig.group(timeout=0.5, max_retries=10,
                                                           mls_enabled=True))
            await g.invite(f"org/{ns}/bob")
            gb = await b.listen_for_session()
            await gb.publish(b"sealed")
            assert (await g.get_message()).payload == b"sealed"
            # Upstream keeps its MLS state to itself.
            for session in (s, r, g, gb):
                assert (session.encryption is None) is network.upstream


async def test_a_session_to_nobody_fails_with_no_route(network: Network) -> None:
    ns = unique("none")
    with anyio.fail_after(LIMIT):
        async with open_app(f"org/{ns}/alice", node=network.url, secret=network.secret) as a:
            with pytest.raises(NoRouteError):
                await a.create_session(f"org/{ns}/nobody",
                                       SessionConfig(timeout=0.1, max_retries=2))
            g = await a.create_session(Name("org", ns, "room"),
                                       SessionConfig.group(timeout=0.1, max_retries=2))
            with pytest.raises(NoRouteError):
                await g.invite(f"org/{ns}/nobody")
            assert g.participants == [a.name]
