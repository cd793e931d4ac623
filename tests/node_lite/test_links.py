"""Networks of nodes on loopback: propagation, multi-hop, loops and resync."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest

from node_lite import ClientConfig, Name, Node, NodeConfig, ServerConfig, open_node
from node_lite.wire import Publish, Subscribe, SubscribeAck
from tests.helpers import SECRET, app_connection, unique, wait_until

pytestmark = pytest.mark.anyio


def node_config(node_id: str, links: Sequence[str] = (), port: int = 0) -> NodeConfig:
    return NodeConfig(node_id=node_id, shared_secret=SECRET,
                      servers=(ServerConfig(endpoint=f"127.0.0.1:{port}"),),
                      links=tuple(ClientConfig(endpoint=u) for u in links))


@asynccontextmanager
async def network(ids: Sequence[str], edges: Sequence[tuple[int, int]]
                  ) -> AsyncIterator[list[Node]]:
    """Start nodes and links ``(dialer, listener)``; wait until every link is up."""
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_node(node_config(i + unique(""))))
                 for i in ids]
        for dialer, listener in edges:
            nodes[dialer].add_link(nodes[listener].url)
        await wait_until(lambda: all(
            link.connected for n in nodes for link in n.statistics().links),
            message="links up")
        yield nodes


def reachable(node: Node, name: Name) -> bool:
    return node.core.table.match_one(name) is not None


async def collect(conn: object, n: int, timeout: float = 5.0) -> list[Publish]:
    out: list[Publish] = []
    with anyio.fail_after(timeout):
        while len(out) < n:
            msg = await conn.receive()  # type: ignore[attr-defined]
            if isinstance(msg, Publish):
                out.append(msg)
    return out


async def test_chain_of_three_delivers_end_to_end() -> None:
    async with network(["a", "b", "c"], [(1, 0), (2, 1)]) as (na, nb, nc):
        svc = unique("far")
        async with app_connection(na.url, "near") as (near, near_name), \
                app_connection(nc.url, svc) as (far, far_name):
            await wait_until(lambda: reachable(na, far_name) and reachable(nc, near_name),
                             message="routes propagated over two hops")
            await near.send(Publish(source=near_name, destination=far_name, payload=b"uni"))
            await near.send(Publish(source=near_name, destination=far_name.without_id(),
                                    payload=b"any"))
            got = await collect(far, 2)
            assert [m.payload for m in got] == [b"uni", b"any"]
            assert got[0].source == near_name
            await far.send(Publish(source=far_name, destination=near_name, payload=b"back"))
            (reply,) = await collect(near, 1)
            assert reply.payload == b"back"
            # the middle node relayed both ways; its routes came from both ends
            origins = {kind for _, kind, _ in nb.core.table.entries()}
            assert any(k.startswith("remote:") for k in origins)


async def test_channel_across_a_cycle_reaches_each_member_once() -> None:
    # a triangle: a->b, b->c, c->a
    async with network(["a", "b", "c"], [(0, 1), (1, 2), (2, 0)]) as nodes:
        chan = Name("org", "ns", unique("chan"))
        async with AsyncExitStack() as stack:
            members = [await stack.enter_async_context(app_connection(n.url, f"m{i}"))
                       for i, n in enumerate(nodes)]
            for conn, _ in members:
                await conn.send(Subscribe(name=chan, request_id=1))
                assert isinstance(await conn.receive(), SubscribeAck)
            await wait_until(lambda: all(
                len({k for nm, k, _ in n.core.table.entries() if nm == chan}) == 3
                for n in nodes), message="channel known everywhere")
            sender, sender_name = members[0]
            for i in range(20):
                await sender.send(Publish(source=sender_name, destination=chan, fanout=2,
                                          message_id=i, payload=b"x"))
            for conn, _ in members[1:]:
                got = await collect(conn, 20)
                assert [m.message_id for m in got] == list(range(20))
            # No duplicates arrive after the expected ones.
            for conn, name in members[1:]:
                await sender.send(Publish(source=sender_name, destination=name,
                                          message_id=99, payload=b"end"))
                (last,) = await collect(conn, 1)
                assert last.message_id == 99


async def test_dropped_link_resyncs() -> None:
    async with network(["a", "b"], [(1, 0)]) as (na, nb):
        async with app_connection(na.url, "x") as (x, x_name), \
                app_connection(nb.url, "y") as (y, y_name):
            await wait_until(lambda: reachable(na, y_name) and reachable(nb, x_name))
            link_conn = nb.link_connection(na.url)
            assert link_conn is not None
            nb.core.close_connection(link_conn, "test", "drop the link")
            await wait_until(lambda: nb.link_connection(na.url) not in (None, link_conn)
                             and all(link.connected for link in nb.statistics().links),
                             message="link redialed")
            await wait_until(lambda: reachable(na, y_name) and reachable(nb, x_name),
                             message="routes resynced")
            await x.send(Publish(source=x_name, destination=y_name, payload=b"again"))
            (got,) = await collect(y, 1)
            assert got.payload == b"again"
            assert nb.statistics().links[0].attempts >= 2


async def test_middle_node_restart_resyncs_subscriptions_made_meanwhile() -> None:
    async with open_node(node_config("probe-" + unique(""))) as probe:
        port_b = probe.ports[0]
    # Reuse a port the OS just gave us for b, so that c can redial the same address.
    async with open_node(node_config("a-" + unique(""))) as na:
        async with AsyncExitStack() as outer:
            nb = await outer.enter_async_context(
                open_node(node_config("b", [na.url], port=port_b)))
            nc = await outer.enter_async_context(
                open_node(node_config("c-" + unique(""), [nb.url])))
            await wait_until(lambda: all(link.connected for n in (nb, nc)
                                         for link in n.statistics().links))
            async with app_connection(na.url, "x") as (x, x_name), \
                    app_connection(nc.url, "y") as (y, y_name):
                await wait_until(lambda: reachable(na, y_name))
                await nb.aclose()
                await wait_until(lambda: not reachable(na, y_name), message="withdrawn")
                # subscribe on c while its link is down
                chan = Name("org", "ns", unique("late"))
                await y.send(Subscribe(name=chan, request_id=5))
                assert isinstance(await y.receive(), SubscribeAck)
                async with open_node(node_config("b", [na.url], port=port_b)) as nb2:
                    await wait_until(lambda: reachable(na, y_name) and reachable(na, chan),
                                     timeout=10, message="resync through the new b")
                    await x.send(Publish(source=x_name, destination=chan, fanout=2,
                                         payload=b"late"))
                    (got,) = await collect(y, 1)
                    assert got.payload == b"late"
                    assert nb2.statistics().connections.get("peer") == 2
