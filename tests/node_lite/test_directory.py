"""The node's directory: apps announce a card, anyone connected looks up who is reachable."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import anyio
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_lite import (
    LimitExceededError,
    Limits,
    MalformedFrameError,
    Name,
    NodeConfig,
    ServerConfig,
    open_node,
)
from node_lite.wire import (
    MAX_CARD_SIZE,
    Announce,
    DirectoryEntry,
    Error,
    Lookup,
    LookupResult,
    decode_frame,
    decode_message,
    encode_frame,
)
from slim_agents import open_app
from tests.helpers import SECRET, app_connection, unique, wait_until
from tests.node_lite.test_links import network
from tests.node_lite.test_wire import any_names, node_ids

LIMITS = Limits()
pytestmark = pytest.mark.anyio


def roundtrip(message: Any) -> Any:
    return decode_message(decode_frame(encode_frame(message)[4:]), LIMITS)


def decode(obj: dict[str, Any]) -> Any:
    return decode_message(decode_frame(msgpack.packb(obj, use_bin_type=True)), LIMITS)


def cards(node: Any, *prefix: str) -> list[bytes | None]:
    return [e.card for e in node.core.lookup(Lookup(request_id=1, prefix=prefix)).entries]


named = any_names.filter(lambda n: n.id is not None)
entries = st.builds(DirectoryEntry, named, st.just("") | node_ids,
                    st.none() | st.binary(max_size=64))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # pure codec: one backend is enough
@given(st.builds(Announce, card=st.binary(max_size=256))
       | st.builds(Lookup, request_id=st.integers(0, 2**32 - 1),
                   prefix=st.lists(st.text(min_size=1, max_size=8), max_size=3).map(tuple),
                   limit=st.integers(1, 1000))
       | st.builds(LookupResult, request_id=st.integers(0, 2**32 - 1),
                   entries=st.lists(entries, max_size=5).map(tuple), truncated=st.booleans()))
def test_directory_messages_round_trip(anyio_backend: str, message: Any) -> None:
    assert roundtrip(message) == message


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(("frame", "error"), [
    ({"v": 1, "t": "announce", "card": "text"}, MalformedFrameError),
    ({"v": 1, "t": "announce", "card": b"x" * (MAX_CARD_SIZE + 1)}, LimitExceededError),
    ({"v": 1, "t": "lookup", "rid": 1, "prefix": ["a", "b", "c", "d"]}, MalformedFrameError),
    ({"v": 1, "t": "lookup", "rid": 1, "prefix": "org"}, MalformedFrameError),
    ({"v": 1, "t": "lookup", "rid": 1, "prefix": [1]}, MalformedFrameError),
    ({"v": 1, "t": "lookup", "rid": 1, "limit": 0}, MalformedFrameError),
    ({"v": 1, "t": "lookup", "rid": 1, "limit": 1001}, MalformedFrameError),
    ({"v": 1, "t": "lookup", "rid": -1}, MalformedFrameError),
    ({"v": 1, "t": "lookup_res", "rid": 1, "entries": {}}, MalformedFrameError),
    ({"v": 1, "t": "lookup_res", "rid": 1, "entries": [[["o", "n", "a", 1], ""]]},
     MalformedFrameError),
    ({"v": 1, "t": "lookup_res", "rid": 1, "entries": [[["o", "n", "a", 1], "", "card"]]},
     MalformedFrameError),
    ({"v": 1, "t": "lookup_res", "rid": 1, "entries": [[["o", "n"], "", None]]},
     MalformedFrameError),
    ({"v": 1, "t": "lookup_res", "rid": 1, "entries": [[["o", "n", "a", 1], 5, None]]},
     MalformedFrameError),
])
def test_bad_directory_frames_get_typed_errors(anyio_backend: str, frame: dict[str, Any],
                                               error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(frame)


async def test_apps_announce_and_look_up_through_a_node() -> None:
    ns = unique("dir")
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, AsyncExitStack() as stack:
        apps = [await stack.enter_async_context(
            open_app(f"org/{ns}/{app}", node=node.url, secret=SECRET))
            for app in ("alpha", "beta", "gamma")]
        other = await stack.enter_async_context(
            open_app(f"org/{unique('elsewhere')}/x", node=node.url, secret=SECRET))
        await apps[0].announce(b'{"role": "first"}')
        await apps[1].announce(b'{"role": "second"}')
        await apps[1].announce(b'{"role": "second, again"}')  # replaces
        with anyio.fail_after(5):
            await wait_until(lambda: cards(node, "org", ns)[1] == b'{"role": "second, again"}',
                             message="cards announced")
            found = await other.lookup(f"org/{ns}")
        assert [e.name for e in found] == sorted((a.name for a in apps), key=str)
        assert [e.card for e in found] == [b'{"role": "first"}', b'{"role": "second, again"}',
                                           None]
        assert all(e.node == "" for e in found)
        with anyio.fail_after(5):
            just_beta = await other.lookup(f"org/{ns}/beta")
            capped = await other.lookup(f"org/{ns}", limit=2)
            everyone = await other.lookup()
        assert [e.name for e in just_beta] == [apps[1].name]
        assert len(capped) == 2
        assert {a.name for a in [*apps, other]} <= {e.name for e in everyone}
        with pytest.raises(LimitExceededError):
            await apps[2].announce(b"x" * (MAX_CARD_SIZE + 1))
        with pytest.raises(ValueError, match="three components"):
            await other.lookup("a/b/c/d")
        # A departed app leaves the directory.
        await apps[2].aclose()
        with anyio.fail_after(5):
            await wait_until(lambda: len(node.core.lookup(
                Lookup(request_id=1, prefix=("org", ns))).entries) == 2, message="gone")


async def test_a_lookup_cut_short_says_so() -> None:
    ns = unique("cut")
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, AsyncExitStack() as stack:
        for i in range(3):
            app = await stack.enter_async_context(
                open_app(f"org/{ns}/a{i}", node=node.url, secret=SECRET))
        answer = node.core.lookup(Lookup(request_id=7, prefix=("org", ns), limit=2))
        assert answer.request_id == 7 and len(answer.entries) == 2 and answer.truncated
        full = node.core.lookup(Lookup(request_id=8, prefix=("org", ns)))
        assert len(full.entries) == 3 and not full.truncated
        assert app.name in [e.name for e in full.entries]


async def test_apps_behind_a_linked_node_appear_without_cards() -> None:
    ns = unique("far")
    async with network(["a", "b"], [(1, 0)]) as (na, nb), \
            open_app(f"org/{ns}/near", node=na.url, secret=SECRET) as near, \
            open_app(f"org/{ns}/far", node=nb.url, secret=SECRET) as far:
        await far.announce(b"card of far")
        with anyio.fail_after(5):
            await wait_until(lambda: any(e.name == far.name for e in na.core.lookup(
                Lookup(request_id=1, prefix=("org", ns))).entries), message="route to far")
            seen = {e.name: e for e in await near.lookup(f"org/{ns}")}
        assert seen[far.name].node == nb.node_id and seen[far.name].card is None
        assert seen[near.name].node == ""


async def test_the_card_is_announced_again_after_a_node_restart() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as probe:
        port = probe.ports[0]
    cfg = NodeConfig(shared_secret=SECRET, servers=(ServerConfig(endpoint=f"127.0.0.1:{port}"),))
    ns = unique("again")
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(cfg))
        app = await stack.enter_async_context(
            open_app(f"org/{ns}/a", node=first.url, secret=SECRET))
        await app.announce(b"still here")
        await first.aclose()
        await wait_until(lambda: not app.connected, message="disconnect")
        async with open_node(cfg):
            with anyio.fail_after(15):
                found = await app.lookup(f"org/{ns}")
        assert [(e.name, e.card) for e in found] == [(app.name, b"still here")]


async def test_only_apps_use_the_directory() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, \
            app_connection(node.url, unique("raw")) as (conn, name):
        await conn.send(Lookup(request_id=3, prefix=("org",)))
        with anyio.fail_after(5):
            while True:
                msg = await conn.receive()
                if isinstance(msg, LookupResult):
                    break
        assert msg.request_id == 3 and name in [e.name for e in msg.entries]
        assert isinstance(Name.parse(str(name)), Name)
        # A malformed announce is answered with a typed error; the connection survives.
        await conn.send({"v": 1, "t": "announce", "card": "not bytes"})
        with anyio.fail_after(5):
            while True:
                err = await conn.receive()
                if isinstance(err, Error):
                    break
        assert err.code == "malformed"
        await conn.send(Lookup(request_id=4))
        with anyio.fail_after(5):
            while not isinstance(msg := await conn.receive(), LookupResult):
                pass
        assert msg.request_id == 4
