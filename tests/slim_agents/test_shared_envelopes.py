"""A group frame decoded once for the apps of an event loop is also checked once
(SharedEnvelope.checked), by apps that share its limits."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from node_lite import (
    Limits,
    Name,
    NodeConfig,
    SharedSecretProvider,
    SharedSecretVerifier,
    open_node,
    wire,
)
from node_lite._client import SharedDecoding
from node_lite.wire import Publish, SharedEnvelope, check_publish, encode_frame
from slim_agents import SessionConfig
from slim_agents import _app_core as app_core
from slim_agents._app_core import AppCore
from tests.helpers import SECRET, open_group

CHAN = Name("org", "ns", "chan")


def spy(monkeypatch: pytest.MonkeyPatch, module: Any = app_core) -> list[tuple[Any, Limits]]:
    """Record each real check_publish call by ``module`` (by default the apps'; ``wire``:
    the connections' flow decoding): the map, kept alive, and the limits."""
    calls: list[tuple[Any, Limits]] = []
    real: Callable[..., bool] = check_publish

    def counting(d: Any, limits: Limits, known: Any = None) -> bool:
        calls.append((d, limits))
        return real(d, limits, known)

    monkeypatch.setattr(module, "check_publish", counting)
    return calls


def core(app: str, limits: Limits) -> AppCore:
    provider = SharedSecretProvider(f"org/ns/{app}", SECRET)
    return AppCore(Name("org", "ns", app, 1), provider,
                   SharedSecretVerifier(SECRET, replay_cache=0), limits=limits)


def shared_frame(src: list[Any], mid: int = 1) -> SharedEnvelope:
    body = encode_frame(Publish(source=Name("org", "ns", "src", 7), destination=CHAN,
                                fanout=3, message_id=mid, payload=b"x"))[4:]
    decoded = SharedDecoding().decode(memoryview(body), check_ext=False)
    assert type(decoded) is SharedEnvelope and decoded.checked is None
    decoded["src"] = src  # a test-made map: in use, shared maps are read-only
    return decoded


def test_apps_with_the_same_limits_check_a_shared_frame_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy(monkeypatch)
    limits, other = Limits(), Limits(max_name_component=64)
    cores = [core("a", limits), core("b", limits), core("c", other), core("d", limits)]
    env = shared_frame(["org", "ns", "src", 7])
    for c in cores:
        c.receive([env], 0.0)
    # a checks; b reuses it; c (other limits) checks and takes the mark; d checks again.
    assert [lim for _, lim in calls] == [limits, other, limits]
    assert env.checked is limits
    assert all(c.counters["no_session"] == 1 for c in cores)


def test_a_malformed_shared_frame_is_refused_by_every_app(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy(monkeypatch)
    limits = Limits()
    cores = [core("a", limits), core("b", limits)]
    env = shared_frame(["org", "ns", "", 7])  # an empty name component
    for c in cores:
        c.receive([env], 0.0)
    assert len(calls) == 2 and env.checked is None
    assert all(c.counters["malformed"] == 1 and not c.counters["no_session"] for c in cores)


@pytest.mark.anyio
async def test_group_members_of_one_loop_check_each_group_frame_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy(monkeypatch)
    read_calls = spy(monkeypatch, wire)
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, AsyncExitStack() as stack:
        group, *members = await open_group(stack, node.url, SessionConfig.group(), 3)
        calls.clear()
        read_calls.clear()
        for i in range(20):
            await group.publish(f"m{i}".encode())
        with anyio.fail_after(10):
            for m in members:
                assert [(await m.get_message()).payload for _ in range(20)] == [
                    f"m{i}".encode() for i in range(20)]
    # Every group frame reached three apps of this loop. The connection that read it
    # checked it (the first of its flow in full, the tails of the others): no app did.
    assert not [d for d, _ in calls if d["dst"][3] is None]
    to_chan = [d for d, _ in read_calls if d["dst"][3] is None]
    # A connection learns a flow once per map size (with acks or not).
    assert 1 <= len(to_chan) <= 2 * len(members)


@pytest.mark.anyio
@pytest.mark.parametrize("reliable", [False, True])
async def test_group_members_of_one_loop_share_each_message(reliable: bool) -> None:
    """Apps of one loop in a group receive one message object per group frame (it is
    immutable); a member whose roster names the sender differently gets its own."""
    from slim_agents._session_core import Member, _key

    config = SessionConfig.group(timeout=1.0, max_retries=5) if reliable else \
        SessionConfig.group()
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, AsyncExitStack() as stack:
        group, *members = await open_group(stack, node.url, config, 3)
        odd = members[2]._core
        mod_key = _key(group._core.local_wire)
        odd.members[mod_key] = Member(odd.members[mod_key].name, "someone-else")
        for i in range(5):
            await group.publish(f"m{i}".encode(), metadata={"i": str(i)})
        with anyio.fail_after(10):
            got = [[await m.get_message() for _ in range(5)] for m in members]
    for i in range(5):
        first, second, third = (g[i] for g in got)
        assert first is second
        assert first.payload == third.payload == f"m{i}".encode()
        assert first.context.metadata["i"] == str(i)
        assert first.context.identity == group._core.owner.subject
        assert third.context.identity == "someone-else" and third is not first
