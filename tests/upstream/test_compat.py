"""The upstream-bindings-compatible API (slim_agents.compat) on both networks."""

from __future__ import annotations

import anyio
import pytest

from slim_agents.compat import v0_6 as v06
from tests.helpers import unique
from tests.slim_agents.test_compat import RELIABLE_TIMEOUT, slim_config, v06_identity
from tests.upstream import Network, network, upstream_plugin, upstream_server_url

__all__ = ["network", "upstream_plugin", "upstream_server_url"]  # fixtures used here

pytestmark = pytest.mark.anyio


async def test_a_compat_round_trip_with_reply(network: Network) -> None:
    bob_app = unique("bob")
    alice = await v06.Slim.new(v06.PyName("org", "default", "alice"),
                               *v06_identity("org/default/alice"))
    bob = await v06.Slim.new(v06.PyName("org", "default", bob_app),
                             *v06_identity(f"org/default/{bob_app}"))
    async with alice, bob:
        await alice.connect(slim_config(network.url))
        await bob.connect(slim_config(network.url))
        await alice.set_route(bob.local_name)
        session = await alice.create_session(v06.PySessionConfiguration.PointToPoint(
            peer_name=bob.local_name, timeout=RELIABLE_TIMEOUT, max_retries=5))
        with anyio.fail_after(20):
            await session.publish(b"hello")
            recv = await bob.listen_for_session()
            ctx, data = await recv.get_message()
            assert data == b"hello" and recv.id == session.id
            await recv.publish_to(ctx, b"hi back", payload_type="reply", metadata={"k": "v"})
            ctx2, data2 = await session.recv()
        assert data2 == b"hi back" and ctx2.payload_type == "reply"
        assert ctx2.metadata == {"k": "v"}
        await alice.delete_session(session)
