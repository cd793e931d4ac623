"""Sessions through a real node on loopback (and in memory), on asyncio and trio."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest

from node_lite import Node, NodeConfig, ServerConfig, open_fault_proxy, open_node
from slim_agents import (
    App,
    DeliveryTimeoutError,
    Name,
    NoRouteError,
    ParticipantError,
    Session,
    SessionClosedError,
    SessionConfig,
    SessionRejectedError,
    open_app,
)
from tests.helpers import SECRET, unique, wait_until

pytestmark = pytest.mark.anyio
RELIABLE = SessionConfig(timeout=0.5, max_retries=10)
GROUP = SessionConfig.group(timeout=0.5, max_retries=10)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


@pytest.fixture(params=["tcp", "memory"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def target(node: Node, transport: str) -> Node | str:
    return node.url if transport == "tcp" else node


@asynccontextmanager
async def alice_to_bob(node: Node, transport: str, config: SessionConfig = RELIABLE
                       ) -> AsyncIterator[tuple[App, App, Session, Session]]:
    """Apps alice and (a unique) bob, and a session between them (reliable unless
    told): a, b and the session on each side."""
    bob = unique("bob")
    async with open_app("org/ns/alice", node=target(node, transport), secret=SECRET) as a, \
            open_app(f"org/ns/{bob}", node=target(node, transport), secret=SECRET) as b:
        s = await a.create_session(f"org/ns/{bob}", config)
        with anyio.fail_after(5):
            r = await b.listen_for_session()
        yield a, b, s, r


async def test_point_to_point_round_trip(node: Node, transport: str) -> None:
    async with alice_to_bob(node, transport) as (a, b, s, r):
        assert s.id == r.id
        assert s.dst == b.name and r.dst == a.name
        assert s.src == a.name and r.src == b.name
        report = await (await s.publish(b"hello", payload_type="text",
                                        metadata={"sender": "alice"}))
        assert report.delivered == (b.name,)
        ctx, payload = await r.get_message()
        assert payload == b"hello"
        assert (ctx.source_name, ctx.payload_type, dict(ctx.metadata)) == \
            (a.name, "text", {"sender": "alice"})
        assert ctx.session_id == s.id and ctx.identity
        await r.publish_to(ctx, b"reply")
        assert (await s.get_message()).payload == b"reply"


async def test_replies_carry_the_acks_of_the_requests(node: Node, transport: str) -> None:
    async with alice_to_bob(node, transport) as (a, b, s, r):
        with anyio.fail_after(10):
            async def echo() -> None:
                while True:
                    _, payload = await r.get_message()
                    await r.publish(b"re: " + payload)

            async with anyio.create_task_group() as tg:
                tg.start_soon(echo)
                for i in range(20):
                    report = await (await s.publish(b"%d" % i))
                    assert report.delivered == (b.name,)
                    assert (await s.get_message())[1] == b"re: %d" % i
                tg.cancel_scope.cancel()
    # The echo runs while bob's read loop waits to acknowledge: each reply takes the
    # ack of its request (on trio too, which may run a batch of tasks in either order).
    assert b.core.counters["acks_carried"] == 20
    assert a.core.counters["malformed"] == 0


async def test_publishes_while_the_read_loop_is_corked_share_writes(
        node: Node, transport: str) -> None:
    async with alice_to_bob(node, transport) as (a, _, s, r):
        assert a._conn is not None
        box = a._conn.outbox
        writes = box.writes
        # What the read loop does while the tasks a batch woke run.
        a._corked = True
        try:
            for i in range(7):
                await s.publish(b"%d" % i)
            assert (box.writes, box.pending_frames) == (writes, 7)
            await s.publish(b"7")  # a full share goes out at once
            await wait_until(lambda: not box.pending_bytes, message="the share written")
            assert box.writes == writes + 1
            await s.publish(b"8")
            assert box.pending_frames == 1
        finally:
            a._corked = False
        await a._flush()
        with anyio.fail_after(5):
            for i in range(9):
                assert (await r.get_message())[1] == b"%d" % i
        await wait_until(lambda: not box.pending_bytes, message="the rest written")
        assert box.writes >= writes + 2


async def test_a_bad_frame_from_the_node_is_counted_and_the_session_goes_on(
        node: Node, transport: str) -> None:
    from node_lite._core import ConnKind

    async with alice_to_bob(node, transport) as (_, b, s, r):
        # A broken node: a frame that is not a map, to every app connection.
        for conn_id, box in list(node._outboxes.items()):
            if node.core.connection_kind(conn_id) is ConnKind.APP:
                box.write(b"\x00\x00\x00\x04\x93\x01\x02\x03")
                box.wake_writer()
        await wait_until(lambda: b.core.counters["read_error:MalformedFrameError"] == 1,
                         message="the bad frame counted")
        with anyio.fail_after(5):
            await (await s.publish(b"after"))
            assert (await r.get_message())[1] == b"after"


async def test_bytes_that_are_not_frames_end_the_connection_and_the_app_reconnects(
        node: Node, transport: str) -> None:
    from node_lite._core import ConnKind

    async with alice_to_bob(node, transport) as (a, b, s, r):
        # A broken node: a length prefix past any limit, to every app connection.
        for conn_id, box in list(node._outboxes.items()):
            if node.core.connection_kind(conn_id) is ConnKind.APP:
                box.write(b"\x7f\xff\xff\xff" + b"\x00" * 16)
                box.wake_writer()
        await wait_until(lambda: all(x.connects == 2 and x.connected for x in (a, b)),
                         message="both reconnected")
        assert [x.core.counters["read_error:FrameTooLargeError"] for x in (a, b)] == [1, 1]
        with anyio.fail_after(10):
            await (await s.publish(b"after"))
            assert (await r.get_message())[1] == b"after"


async def test_session_metadata_reaches_the_receiver(node: Node) -> None:
    svc = unique("svc")
    async with open_app("org/ns/a", node=node, secret=SECRET) as a, \
            open_app(f"org/ns/{svc}", node=node, secret=SECRET) as b:
        await a.create_session(f"org/ns/{svc}",
                               SessionConfig(metadata={"a": "1", "k": "session"}))
        r = await b.listen_for_session()
        assert dict(r.metadata) == {"a": "1", "k": "session"}


async def test_sticky_anycast_across_ten_receivers(node: Node) -> None:
    svc = unique("sticky")
    async with AsyncExitStack() as stack:
        receivers = [await stack.enter_async_context(
            open_app(f"org/ns/{svc}", node=node.url, secret=SECRET)) for _ in range(10)]
        sender = await stack.enter_async_context(
            open_app("org/ns/sender", node=node.url, secret=SECRET))
        assert len({r.name for r in receivers}) == 10
        s = await sender.create_session(f"org/ns/{svc}", RELIABLE)
        handles = [await s.publish(b"x%d" % i, payload_type="hello message",
                                   metadata={"sender": "hello"}) for i in range(1000)]
        for h in handles:
            await h
        counts = {}
        for r in receivers:
            if r.sessions:
                (rs,) = r.sessions
                msgs = [await rs.get_message() for _ in range(1000)]
                assert all(m.context.payload_type == "hello message" for m in msgs)
                assert all(dict(m.context.metadata) == {"sender": "hello"} for m in msgs)
                assert [m.payload for m in msgs] == [b"x%d" % i for i in range(1000)]
                assert rs.dst == sender.name
                counts[r.name] = len(msgs)
        assert list(counts.values()) == [1000]


async def test_ring_relay_through_a_group_of_ten(node: Node) -> None:
    chan = Name("org", "ns", unique("ring"))
    n = 10
    async with AsyncExitStack() as stack:
        apps = [await stack.enter_async_context(
            open_app(f"org/ns/{unique('p')}", node=node, secret=SECRET)) for _ in range(n)]
        g = await apps[0].create_session(chan, GROUP)
        for app in apps[1:]:
            await g.invite(app.name.without_id())
        sessions = [g] + [await app.listen_for_session() for app in apps[1:]]
        for s in sessions:
            assert s.dst == chan and len(s.participants) == n
        received: dict[int, list[bytes]] = {i: [] for i in range(n)}

        async def member(i: int) -> None:
            s = sessions[i]
            if i == 0:
                await s.publish(b"1")
            while len(received[i]) < n - 1:
                msg = await s.get_message()
                received[i].append(msg.payload)
                hop = int(msg.payload)
                if hop % n == i and hop < n:
                    await s.publish(b"%d" % (hop + 1))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(member, i)
        assert all(len(v) == n - 1 for v in received.values())


async def test_invite_remove_close_with_rosters_checked(node: Node) -> None:
    chan = Name("org", "ns", unique("chan"))
    async with open_app("org/ns/mod", node=node, secret=SECRET) as mod, \
            open_app(f"org/ns/{unique('a')}", node=node, secret=SECRET) as a, \
            open_app(f"org/ns/{unique('b')}", node=node.url, secret=SECRET) as b:
        g = await mod.create_session(chan, GROUP)
        assert g.participants == [mod.name] and g.is_moderator
        await g.invite(a.name.without_id())
        sa = await a.listen_for_session()
        assert sa.participants == g.participants == [mod.name, a.name]
        added = await g.invite(b.name.without_id())
        assert added == b.name
        sb = await b.listen_for_session()
        assert g.participants == sa.participants == sb.participants == \
            [mod.name, a.name, b.name]
        assert sb.moderator == mod.name
        with pytest.raises(ParticipantError):
            await g.invite(b.name)
        await g.remove(a.name)
        assert await sa.wait_closed() == "removed"
        assert g.participants == sb.participants == [mod.name, b.name]
        with pytest.raises(SessionClosedError):
            await sa.get_message()
        await g.close()
        assert await sb.wait_closed() == "closed by moderator"
        assert g.is_closed


async def test_listen_and_get_message_timeouts(node: Node) -> None:
    async with open_app("org/ns/lonely", node=node, secret=SECRET) as app, \
            open_app(f"org/ns/{unique('p')}", node=node, secret=SECRET) as peer:
        start = anyio.current_time()
        with pytest.raises(TimeoutError), anyio.fail_after(0.1):
            await app.listen_for_session()
        assert 0.08 <= anyio.current_time() - start <= 0.5
        s = await app.create_session(peer.name.without_id(), RELIABLE)
        start = anyio.current_time()
        with pytest.raises(TimeoutError), anyio.fail_after(0.1):
            await s.get_message()
        assert 0.08 <= anyio.current_time() - start <= 0.5


async def test_errors_on_a_deleted_session(node: Node) -> None:
    svc = unique("svc")
    async with open_app("org/ns/a", node=node, secret=SECRET) as a, \
            open_app(f"org/ns/{svc}", node=node, secret=SECRET) as b:
        s = await a.create_session(f"org/ns/{svc}", RELIABLE)
        r = await b.listen_for_session()
        await a.delete_session(s)
        with pytest.raises(SessionClosedError, match="session closed"):
            await s.publish(b"late")
        assert await r.wait_closed() == "closed by peer"
        with pytest.raises(SessionClosedError, match="closed"):
            await r.publish(b"late")
        await a.delete_session(s)  # deleting twice is harmless


async def test_no_route_error(node: Node) -> None:
    async with open_app("org/ns/a", node=node, secret=SECRET) as a:
        with pytest.raises(NoRouteError, match="no matching found"):
            await a.create_session(f"org/ns/{unique('nobody')}", RELIABLE)


async def test_wrong_secret_is_refused_and_the_sender_told() -> None:
    async with open_node() as dev_node:  # the tutorial's node: no secret of its own
        svc = unique("svc")
        async with open_app("org/ns/a", node=dev_node, secret=SECRET) as a, \
                open_app(f"org/ns/{svc}", node=dev_node,
                         secret="a-different-secret-of-sufficient-length-000"):
            with pytest.raises(SessionRejectedError) as info:
                await a.create_session(f"org/ns/{svc}", RELIABLE)
            assert info.value.code == "unauthenticated"


async def test_failure_report_when_the_peer_is_gone(node: Node) -> None:
    svc = unique("svc")
    async with open_app("org/ns/a", node=node, secret=SECRET) as a:
        async with open_app(f"org/ns/{svc}", node=node, secret=SECRET,
                            reconnect=False) as b:
            s = await a.create_session(f"org/ns/{svc}",
                                       SessionConfig(timeout=0.1, max_retries=3))
            await b.listen_for_session()
            bob = b.name
            # bob vanishes without closing: cut its connection at the node
            b._closing = True
            b._tg.cancel_scope.cancel()  # type: ignore[union-attr]
        handle = await s.publish(b"into the void")
        with pytest.raises(DeliveryTimeoutError) as info, anyio.fail_after(10):
            await handle
        assert dict(info.value.failed) == {bob: "timeout"}


async def test_node_restart_in_the_middle_of_a_session() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as probe:
        port = probe.ports[0]
    cfg = NodeConfig(shared_secret=SECRET, servers=(ServerConfig(endpoint=f"127.0.0.1:{port}"),))
    svc = unique("svc")
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(cfg))
        a = await stack.enter_async_context(open_app("org/ns/a", node=first.url, secret=SECRET))
        b = await stack.enter_async_context(
            open_app(f"org/ns/{svc}", node=first.url, secret=SECRET))
        s = await a.create_session(f"org/ns/{svc}", SessionConfig(timeout=0.2, max_retries=50))
        r = await b.listen_for_session()
        await s.publish(b"before")
        assert (await r.get_message()).payload == b"before"
        await first.aclose()
        await wait_until(lambda: not a.connected and not b.connected, message="disconnect")
        handle = await s.publish(b"during")  # retried until the node is back
        async with open_node(cfg):
            with anyio.fail_after(15):
                await a.wait_connected()
                await b.wait_connected()
                assert (await r.get_message()).payload == b"during"
                await handle
                await s.publish(b"after")
                assert (await r.get_message()).payload == b"after"
                await r.publish(b"back")
                assert (await s.get_message()).payload == b"back"
        assert a.connects >= 2 and b.connects >= 2


@pytest.mark.parametrize("seed", [1, 2])
async def test_exactly_once_in_order_through_a_fault_injector(node: Node, seed: int) -> None:
    svc = unique("svc")
    async with open_fault_proxy(node.url, seed=seed) as proxy:
        for plan in (proxy.up, proxy.down):
            plan.drop, plan.duplicate, plan.reorder = 0.1, 0.1, 0.1
        async with open_app("org/ns/a", node=proxy.url, secret=SECRET) as a, \
                open_app(f"org/ns/{svc}", node=proxy.url, secret=SECRET) as b:
            s = await a.create_session(f"org/ns/{svc}",
                                       SessionConfig(timeout=0.1, max_retries=100))
            r = await b.listen_for_session()
            n = 300
            handles = [await s.publish(b"%d" % i) for i in range(n)]
            with anyio.fail_after(30):
                got = [(await r.get_message()).payload for _ in range(n)]
                for h in handles:
                    await h
            assert got == [b"%d" % i for i in range(n)]
            stats = proxy.stats
            assert stats.dropped and stats.duplicated and stats.reordered
            with pytest.raises(TimeoutError), anyio.fail_after(0.3):
                await r.get_message()  # and nothing more (no duplicates)


async def test_hundreds_of_apps_in_one_process(node: Node) -> None:
    async with AsyncExitStack() as stack:
        apps: list[App] = []
        for i in range(200):
            apps.append(await stack.enter_async_context(
                open_app(f"org/fleet/a{i}", node=node, secret=SECRET)))
        assert len({a.name for a in apps}) == 200
        s = await apps[0].create_session("org/fleet/a199", RELIABLE)
        r = await apps[199].listen_for_session()
        await s.publish(b"ping")
        assert (await r.get_message()).payload == b"ping"


def count_takes(app: App) -> list[bool]:
    """What the app's read callback returned, read after read (False: handed to
    the read loop). Stays empty where the stream has no such callback."""
    assert app._conn is not None
    reading = app._conn._reading
    results: list[bool] = []
    if reading.attached:
        take = reading.take

        def counted(data: bytes) -> bool:
            results.append(take(data))
            return results[-1]

        reading.take = counted
    return results


async def test_the_app_reads_in_the_transport_callback_where_it_can(
        node: Node, transport: str, anyio_backend_name: str) -> None:
    async with alice_to_bob(node, transport, SessionConfig()) as (a, _, s, r):
        takes = count_takes(a)
        with anyio.fail_after(10):
            for i in range(50):
                await s.publish(b"%d" % i)
                ctx, payload = await r.get_message()
                assert payload == b"%d" % i
                await r.publish_to(ctx, b"re: %d" % i)
                assert (await s.get_message()).payload == b"re: %d" % i
    if transport == "tcp" and anyio_backend_name == "asyncio":
        # Best effort, no acks: every reply (one read each) is done with in the
        # callback. Closing the sessions at the end may hand over.
        assert takes.count(True) >= 50
    else:  # TLS, trio and in-memory streams keep the read loop's own reads
        assert takes == []


async def test_acks_due_hand_the_batch_from_the_callback_to_the_read_loop(
        node: Node, transport: str, anyio_backend_name: str) -> None:
    async with alice_to_bob(node, transport) as (_, b, s, r):
        takes = count_takes(b)
        with anyio.fail_after(10):
            for i in range(20):
                await (await s.publish(b"%d" % i))
                assert (await r.get_message())[1] == b"%d" % i
    assert b.core.counters["read_error:ProtocolError"] == 0
    if transport == "tcp" and anyio_backend_name == "asyncio":
        # Each request needs an ack, which waits for the tasks the request woke
        # (a reply they send would carry it): the read loop sends it after them.
        assert takes.count(False) >= 20
    else:
        assert takes == []


async def test_a_full_inbox_stops_the_reading_until_the_application_drains(
        node: Node, transport: str) -> None:
    from dataclasses import replace

    # Best effort: past twice max_inbox, a reader that did not stop would drop.
    async with alice_to_bob(node, transport, SessionConfig()) as (_, b, s, r):
        r._core.config = replace(r._core.config, max_inbox=64)
        count = 600
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                async def send() -> None:
                    for i in range(count):
                        await s.publish(b"%06d" % i + b"x" * 4090)

                tg.start_soon(send)
                await wait_until(lambda: b.core.counters["inbox_pauses"] >= 1,
                                 message="the reader paused on the full inbox")
                for i in range(count):
                    if i % 50 == 0:  # a slow application: the rest runs meanwhile
                        await anyio.wait_all_tasks_blocked()
                    assert len(r._core.inbox) < 2 * 64
                    assert (await r.get_message())[1][:6] == b"%06d" % i
        assert r._core.dropped == 0


async def test_an_internal_error_in_the_read_path_ends_the_app_with_that_error(
        node: Node, transport: str) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with alice_to_bob(node, transport) as (_, b, s, _):
            receive = b.core.receive

            def broken(*args: object, **kwargs: object) -> None:
                b.core.receive = receive  # type: ignore[method-assign]
                raise Boom

            b.core.receive = broken  # type: ignore[method-assign]
            await s.publish(b"x")
            with anyio.fail_after(5):
                await anyio.sleep_forever()
