"""Session-level rows of the reliability and security matrix (reference §3.6, §2.12, §4.3).

Two levels: the sans-IO harness (a real NodeCore, virtual time) pins down the
heartbeat and liveness rules exactly; the rest runs through real nodes (in
this process, or a child process killed with SIGKILL), each fault or bad input
ending with the resource check of ``tests/reliability/resources.py`` and a
fresh client served by the node.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest
import sniffio

from node_lite import (
    ConfigError,
    Name,
    Node,
    NodeConfig,
    NodeProcess,
    open_fault_proxy,
    open_node,
    open_node_process,
)
from node_lite.wire import decode_frame, encode_frame
from slim_agents import App, Session, open_app
from slim_agents._config import SessionConfig
from slim_agents._e2e import E2EError
from slim_agents._e2e_epoch import Chain, seal_app
from slim_agents._e2e_identity import make_key_package
from slim_agents._errors import (
    DeliveryError,
    DeliveryTimeoutError,
    JoinFailedError,
    NotModeratorError,
    SessionClosedError,
)
from slim_agents._protocol import Kind, SessionType, build_frame, decode_body, encode_body
from slim_agents._reports import Message
from slim_agents._session_core import SessionCore, State
from slim_agents._session_e2e import DecryptError, SessionKeys
from tests.helpers import SECRET, unique, wait_until
from tests.reliability.resources import health_probe, resource_check, snapshot, wait_for_baseline
from tests.slim_agents.harness import Net

CHAN = Name("org", "ns", "chan")
HB = 1.0  # heartbeat interval of the harness tests (virtual seconds)
HB_GROUP = SessionConfig.group(timeout=1.0, max_retries=30, heartbeat_interval=HB,
                               moderator_grace=5.0)


# -- sans-IO helpers -------------------------------------------------------------------------


def payloads(session: SessionCore) -> list[bytes]:
    out = [m.payload for m in session.inbox if isinstance(m, Message)]
    session.inbox.clear()
    return out


def send(app: Any, session: SessionCore, payload: bytes, net: Net, **kw: Any) -> Any:
    ticket = session.publish(payload, net.now, **kw)
    app.operate(session)
    return ticket


def group(net: Net, n: int, config: SessionConfig = HB_GROUP
          ) -> tuple[Any, list[Any], SessionCore, list[SessionCore]]:
    mod = net.add_app("moderator")
    members = [net.add_app(f"m{i}") for i in range(n)]
    net.pump()
    g, _ = mod.create_session(CHAN, config, net.now)
    sessions = []
    for m in members:
        t = g.invite(m.name.without_id(), net.now)
        mod.operate(g)
        net.pump()
        assert t.resolved and t.error is None, t.error
        sessions.append(net.announced(m)[-1])
    return mod, members, g, sessions


def vanish(net: Net, app: Any) -> None:
    """The app's process dies: its connection drops and it never runs again."""
    conn = net.conn_of(app)
    net.node.connection_lost(conn)
    del net.apps[conn], net.sinks[conn]


def cut_off(net: Net, app: Any) -> None:
    """A silent partition between ``app`` and the node: nothing reaches it, nothing leaves."""
    def drop(d: dict[str, Any], to: Any) -> dict[str, Any] | None:
        return None if to is app or d.get("src") == app.wire else d

    net.mutate = drop


def failures(ticket: Any) -> dict[Name, str]:
    assert ticket.resolved
    if ticket.error is None:
        return {}
    assert isinstance(ticket.error, DeliveryError), ticket.error
    return dict(ticket.error.failed)


# -- heartbeats and liveness (sans-IO) --------------------------------------------------------


def test_heartbeat_settings_are_checked_and_reach_the_members() -> None:
    for bad in ({"heartbeat_interval": 0.001}, {"heartbeat_interval": -1},
                {"heartbeat_misses": 0}, {"heartbeat_misses": True}, {"moderator_grace": 0},
                {"moderator_grace": None}, {"remove_offline": 1}):
        with pytest.raises(ConfigError):
            SessionConfig.group(**bad)
    assert SessionConfig.group().heartbeats and not SessionConfig().heartbeats
    assert not SessionConfig.group(heartbeat_interval=None).heartbeats
    net = Net()
    config = SessionConfig.group(heartbeat_interval=0.25, heartbeat_misses=4, moderator_grace=7)
    _mod, _members, _g, (s,) = group(net, 1, config)
    assert (s.config.heartbeat_interval, s.config.heartbeat_misses,
            s.config.moderator_grace) == (0.25, 4, 7.0)


def test_heartbeats_add_no_frame_to_the_data_path() -> None:
    def frames(config: SessionConfig) -> list[tuple[Any, ...]]:
        net = Net()
        _mod, members, _g, sessions = group(net, 3, config)
        net.tapped.clear()
        for i in range(50):
            send(members[i % 3], sessions[i % 3], b"%d" % i, net)
            net.pump()
        return [(d["k"], d["mid"]) for f in net.tapped if (d := decode_frame(f[4:]))["t"] == "pub"]

    plain = SessionConfig.group(timeout=1.0, max_retries=5, heartbeat_interval=None)
    assert frames(plain) == frames(SessionConfig.group(timeout=1.0, max_retries=5))


@pytest.mark.matrix("F-4")
def test_a_silent_member_is_offline_after_three_intervals_and_reported_unreachable() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 3)
    crashed = members[2]
    t0 = net.now
    vanish(net, crashed)
    in_flight = send(members[0], sessions[0], b"in flight", net)
    net.pump()
    assert not in_flight.resolved  # waits for the crashed member's ack
    net.advance(2 * HB)
    assert crashed.name not in g.offline
    net.advance(HB)
    assert net.now - t0 <= 3 * HB and g.offline == {crashed.name}
    # the moderator's ping told the others; they stop waiting for it at once
    assert all(s.offline == {crashed.name} for s in sessions[:2])
    assert failures(in_flight) == {crashed.name: "unreachable"}
    assert set(in_flight.error.report.delivered) == {mod.name, members[1].name}
    later = send(members[1], sessions[1], b"later", net)
    net.pump()
    assert failures(later) == {crashed.name: "unreachable"}  # answered by acks alone
    assert payloads(g) == [b"in flight", b"later"] and payloads(sessions[0]) == [b"later"]
    assert crashed.name in g.roster  # offline is not removed (that is a policy)


def test_an_offline_member_heard_again_is_waited_for_again() -> None:
    net = Net()
    _mod, members, g, sessions = group(net, 2)
    away = members[1]
    cut_off(net, away)
    net.advance(3 * HB)
    assert g.offline == {away.name} and sessions[0].offline == {away.name}
    net.mutate = None
    net.advance(HB)  # it answers the next ping
    assert not g.offline
    net.advance(HB)  # and the ping after tells the others
    assert not sessions[0].offline
    t = send(members[0], sessions[0], b"all here", net)
    net.pump()
    assert t.resolved and t.error is None
    assert payloads(sessions[1])[-1:] == [b"all here"]


@pytest.mark.matrix("F-5")
def test_members_learn_the_moderator_is_lost_then_close_after_the_grace() -> None:
    net = Net()
    mod, members, _g, sessions = group(net, 2)
    t0 = net.now
    vanish(net, mod)
    net.advance(3 * HB - 0.01)
    assert not any(s.moderator_lost for s in sessions)
    net.advance(0.01)
    assert all(s.moderator_lost for s in sessions) and net.now - t0 <= 3 * HB
    assert all(s.offline == {mod.name} for s in sessions)
    # sending goes on in the grace period; the moderator is reported unreachable
    t = send(members[0], sessions[0], b"still talking", net)
    net.pump()
    assert failures(t) == {mod.name: "unreachable"}
    assert payloads(sessions[1]) == [b"still talking"]
    net.advance(HB_GROUP.moderator_grace - 0.01)
    assert all(s.state is State.ESTABLISHED for s in sessions)
    net.advance(0.01)
    assert all(s.state is State.CLOSED and s.close_reason == "moderator_lost" for s in sessions)
    assert all(s.get_timer() is None for s in sessions)
    assert all(not m.sessions for m in members)


def test_a_moderator_heard_again_within_the_grace_keeps_the_session() -> None:
    net = Net()
    mod, _members, _g, sessions = group(net, 1)
    (s,) = sessions
    net.mutate = lambda d, to: None if d.get("k") == Kind.HEARTBEAT else d
    net.advance(3 * HB)
    assert s.moderator_lost
    net.mutate = None
    net.advance(HB)
    assert not s.moderator_lost and not s.offline
    net.advance(HB_GROUP.moderator_grace + HB)
    assert s.state is State.ESTABLISHED and mod.name in s.roster


def test_a_member_closing_while_the_moderator_is_lost_does_not_wait_for_it() -> None:
    net = Net()
    mod, _members, _g, sessions = group(net, 1)
    vanish(net, mod)
    net.advance(3 * HB)
    t = sessions[0].close(net.now)
    assert t.resolved and sessions[0].state is State.CLOSED


@pytest.mark.matrix("F-4")
def test_the_remove_offline_policy_removes_and_rekeys() -> None:
    net = Net()
    config = SessionConfig.group(timeout=1.0, max_retries=30, mls_enabled=True,
                                 heartbeat_interval=HB, remove_offline=True)
    _mod, members, g, sessions = group(net, 3, config)
    assert g.encryption is not None
    epoch = g.encryption.epoch
    vanish(net, members[2])
    pending = send(members[0], sessions[0], b"before", net)
    net.advance(3 * HB)
    assert members[2].name not in g.roster
    assert all(members[2].name not in s.roster for s in sessions[:2])
    infos = [s.encryption for s in (g, *sessions[:2])]
    assert {i.epoch for i in infos if i} == {epoch + 1}
    assert len({i.authenticator for i in infos if i}) == 1
    assert failures(pending) == {members[2].name: "unreachable"}
    t = send(members[1], sessions[1], b"after", net)
    net.pump()
    assert t.resolved and t.error is None


@pytest.mark.matrix("F-8")
def test_a_member_removed_while_cut_off_learns_it_when_it_answers_again() -> None:
    """F-8, sans-IO: a Remove of another member while one member is cut off."""
    net = Net()
    config = SessionConfig.group(timeout=0.5, max_retries=3, mls_enabled=True,
                                 heartbeat_interval=HB)
    mod, members, g, sessions = group(net, 3, config)
    cut = members[2]
    cut_off(net, cut)
    removal = g.remove(members[0].name, net.now)
    mod.operate(g)
    net.pump()
    assert not removal.resolved  # the commit is retried to the member cut off
    net.advance(2.0)
    # It never answered: removed too (as unreachable), the others rekeyed without it.
    assert removal.resolved and removal.error is None
    assert g.roster == [mod.name, members[1].name] == sessions[1].roster
    assert g.encryption and sessions[1].encryption
    assert g.encryption.authenticator == sessions[1].encryption.authenticator
    assert sessions[2].state is State.ESTABLISHED  # it heard nothing of it
    net.mutate = None
    net.advance(2 * HB)  # it answers a ping; the moderator tells it
    assert sessions[2].state is State.CLOSED and sessions[2].close_reason == "removed"
    # the application may invite it again: everyone ends on the same epoch
    t = g.invite(cut.name.without_id(), net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved and t.error is None
    back = net.announced(cut)[-1]
    auths = {s.encryption.authenticator for s in (g, sessions[1], back) if s.encryption}
    assert len(auths) == 1


def test_the_moderator_does_not_wait_for_offline_or_leaving_members_to_close() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 3)
    vanish(net, members[2])
    net.advance(3 * HB)
    assert g.offline == {members[2].name}
    leave = sessions[0].close(net.now)
    members[0].operate(sessions[0])
    net.pump()
    assert leave.resolved  # its removal now waits for the offline member's ack
    vanish(net, members[0])  # and the app that left is gone
    t = g.close(net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved and g.state is State.CLOSED  # m1 answered; nobody else is waited for
    assert sessions[1].state is State.CLOSED


def test_point_to_point_sessions_have_no_heartbeat_timer() -> None:
    net = Net()
    a, b = net.add_app("alice"), net.add_app("bob")
    net.pump()
    s, _ = a.create_session(Name("org", "ns", "bob"), SessionConfig(), net.now)
    net.pump()
    (r,) = net.announced(b)
    assert s.get_timer() is None and r.get_timer() is None


# -- B-9 over a minute (sans-IO: time is virtual) ----------------------------------------------


@pytest.mark.matrix("B-9")
@pytest.mark.parametrize("config", [SessionConfig(timeout=1.0, max_retries=5),
                                    SessionConfig(mls_enabled=True),
                                    SessionConfig(timeout=1.0, max_retries=5, mls_enabled=True)],
                         ids=["reliable", "e2e-best-effort", "e2e-reliable"])
def test_a_data_frame_replayed_a_minute_later_is_dropped(config: SessionConfig) -> None:
    net = Net()
    a, b = net.add_app("alice"), net.add_app("bob")
    net.pump()
    s, _ = a.create_session(Name("org", "ns", "bob"), config, net.now)
    net.pump()
    (r,) = net.announced(b)
    send(a, s, b"once", net)
    net.pump()
    assert payloads(r) == [b"once"]
    (captured,) = [d for f in net.tapped if (d := decode_frame(f[4:])).get("k") == Kind.MSG]
    net.advance(60.0)
    dups = r._recv[next(iter(r._recv))].duplicates if r._recv else 0
    net.tapped.clear()
    b.receive([copy.deepcopy(captured)], net.now)
    b.flush(net.now)
    net.pump()
    assert list(r.inbox) == []
    if config.reliable:
        assert r._recv[next(iter(r._recv))].duplicates == dups + 1
        acks = [d for f in net.tapped if (d := decode_frame(f[4:])).get("k") == Kind.MSG_ACK]
        assert len(acks) == 1  # acknowledged again, idempotently
    else:
        assert b.counters["e2e:replay"] == 1
    t = send(a, s, b"twice", net)
    net.pump()
    assert payloads(r) == [b"twice"] and t.resolved and t.error is None



# -- through real nodes: helpers ----------------------------------------------------------------

FAST = 0.2  # heartbeat interval of the tests through real nodes (seconds)


@asynccontextmanager
async def checked_node() -> AsyncIterator[Node]:
    """An in-process node that must end the block with nothing leaked and still serving.

    Everything the scenario opens (apps, proxies) lives and ends inside the block.
    """
    async with open_node(NodeConfig(shared_secret=SECRET)) as node, resource_check(node):
        yield node


async def connect(stack: AsyncExitStack, target: str, prefix: str) -> App:
    return await stack.enter_async_context(
        open_app(f"org/ns/{unique(prefix)}", node=target, secret=SECRET))


async def form_group(stack: AsyncExitStack, target: str, config: SessionConfig, n: int, *,
                     targets: Sequence[str] = ()) -> tuple[App, Session, list[App],
                                                           list[Session]]:
    """A moderator and ``n`` members (member ``i`` connects to ``targets[i]`` if given)."""
    mod = await connect(stack, target, "mod")
    apps = [await connect(stack, targets[i] if i < len(targets) else target, f"m{i}")
            for i in range(n)]
    g = await mod.create_session(f"org/ns/{unique('chan')}", config)
    sessions = []
    for member in apps:
        await g.invite(member.name)
        with anyio.fail_after(5):
            sessions.append(await member.listen_for_session())
    return mod, g, apps, sessions


def crash(victim: App) -> None:
    """End an app as kill -9 would: no goodbye to anyone, its connection just drops."""
    victim._closing = True  # its context exit then has nothing left to do
    assert victim._tg is not None
    victim._tg.cancel_scope.cancel()


def tap(victim: App) -> list[dict[str, Any]]:
    """Every frame the app sends from now on, decoded (a wiretap at its socket)."""
    seen: list[dict[str, Any]] = []
    take = victim.core.take_frames

    def tapped() -> list[bytes]:
        frames = take()
        seen.extend(decode_frame(memoryview(f)[4:]) for f in frames)
        return frames

    victim.core.take_frames = tapped  # type: ignore[method-assign]
    return seen


def rewrite(victim: App, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Alter (or drop, with None) the frames the app sends, on their way to the node."""
    take = victim.core.take_frames

    def altered() -> list[bytes]:
        out = []
        for f in take():
            d = change(decode_frame(memoryview(f)[4:]))
            if d is not None:
                out.append(encode_frame(d))
        return out

    victim.core.take_frames = altered  # type: ignore[method-assign]


def inject(sender: App, frame: dict[str, Any] | bytes) -> None:
    """Write a frame on the app's own connection (the node checks its source name)."""
    conn = sender._conn
    assert conn is not None
    conn.outbox.write(frame if isinstance(frame, bytes) else encode_frame(frame))


def of_kind(frames: list[dict[str, Any]], kind: int) -> list[dict[str, Any]]:
    return [d for d in frames if d.get("t") == "pub" and d.get("k") == kind]


def control(sender: App, session: Session, dst: Name, kind: int, body: dict[str, Any],
            **extra: Any) -> bytes:
    """A control message of ``session`` signed with the sender's own (valid) token."""
    return build_frame(sender.core.wire, dst.to_wire(), fanout=1, sid=session.id,
                       st=SessionType.GROUP, kind=kind, mid=sender.core.random_mid(),
                       body=encode_body(body), identity=sender.core.token(), **extra)


def state_of(session: Session) -> tuple[Any, ...]:
    e = session.encryption
    return (session.is_closed, tuple(session.participants),
            (e.epoch, e.authenticator) if e else None)


def process_resources() -> tuple[int, int]:
    """Open fds and event-loop tasks of this process (the client side of a test)."""
    if sniffio.current_async_library() == "trio":
        import trio

        def count(task: trio.lowlevel.Task) -> int:
            return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

        tasks = count(trio.lowlevel.current_root_task())
    else:
        tasks = len(asyncio.all_tasks())
    return len(os.listdir("/proc/self/fd")), tasks


# -- F-4, F-5: crashed members and moderators ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.matrix("F-4")
async def test_f4_a_crashed_member_is_reported_unreachable_without_blocking_others() -> None:
    config = SessionConfig.group(timeout=1.0, max_retries=10, heartbeat_interval=FAST)
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, g, (_a, b, c), (sa, sb, _sc) = await form_group(stack, node.url, config, 3)
        report = await (await sa.publish(b"all here"))
        assert set(report.delivered) == {mod.name, b.name, c.name}
        crash(c)
        crashed_at = anyio.current_time()
        in_flight = await sa.publish(b"in flight")
        # marked offline within 3 heartbeats (the margin is for a loaded machine)
        await wait_until(lambda: c.name in g.offline, timeout=3 * FAST + 0.5,
                         message="the crashed member marked offline")
        detected = anyio.current_time() - crashed_at
        with anyio.fail_after(1), pytest.raises(DeliveryError) as info:
            await in_flight  # not held for its retries (10 s)
        assert dict(info.value.failed) == {c.name: "unreachable"}
        assert set(info.value.report.delivered) == {mod.name, b.name}
        with anyio.fail_after(1), pytest.raises(DeliveryError) as info:
            await (await sb.publish(b"later"))
        assert dict(info.value.failed) == {c.name: "unreachable"}
        with anyio.fail_after(2):
            assert (await sa.get_message()).payload == b"later"
            assert [(await g.get_message()).payload for _ in range(3)] == [
                b"all here", b"in flight", b"later"]
        assert c.name in g.participants and detected < 3 * FAST + 0.5


@pytest.mark.anyio
@pytest.mark.matrix("F-4")
async def test_f4_the_moderator_may_remove_an_offline_member_and_rekey() -> None:
    config = SessionConfig.group(timeout=1.0, max_retries=10, heartbeat_interval=FAST,
                                 mls_enabled=True, remove_offline=True)
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, g, (_a, b, c), (sa, sb, _sc) = await form_group(stack, node.url, config, 3)
        assert g.encryption is not None
        epoch = g.encryption.epoch
        crash(c)
        await wait_until(lambda: c.name not in sa.participants + sb.participants
                         + g.participants, timeout=3 * FAST + 2, message="the removal")
        await wait_until(lambda: len({state_of(s)[2] for s in (g, sa, sb)}) == 1,
                         message="every member on the new epoch")
        assert g.encryption.epoch == epoch + 1
        report = await (await sa.publish(b"without c"))
        assert set(report.delivered) == {mod.name, b.name}
        with anyio.fail_after(2):
            assert (await sb.get_message()).payload == b"without c"


@pytest.mark.anyio
@pytest.mark.matrix("F-5")
async def test_f5_members_see_the_moderator_lost_then_close_after_the_grace() -> None:
    grace = 1.0
    config = SessionConfig.group(timeout=0.5, max_retries=10, heartbeat_interval=FAST,
                                 moderator_grace=grace, mls_enabled=True)
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, _g, (a, b), (sa, sb) = await form_group(stack, node.url, config, 2)
        epoch = state_of(sb)[2]
        crash(mod)
        with anyio.fail_after(3 * FAST + 1):
            await sa.wait_moderator_lost()
            await sb.wait_moderator_lost()
        # Sending goes on in the current epoch; the moderator is reported unreachable.
        with anyio.fail_after(1), pytest.raises(DeliveryError) as info:
            await (await sa.publish(b"in the grace period"))
        assert dict(info.value.failed) == {mod.name: "unreachable"}
        assert info.value.report.delivered == (b.name,)
        with anyio.fail_after(1):
            assert (await sb.get_message()).payload == b"in the grace period"
        # No commit from anyone but the moderator, even now.
        nacks = tap(b)
        inject(a, control(a, sa, b.name, Kind.GROUP_UPDATE,
                          {"op": "remove", "gone": [[mod.name.to_wire(), "x"]]}))
        await wait_until(lambda: bool(of_kind(nacks, Kind.GROUP_NACK)), message="the refusal")
        assert state_of(sb)[2] == epoch and mod.name in sb.participants
        with anyio.fail_after(grace + 1):
            assert await sa.wait_closed() == "moderator_lost"
            assert await sb.wait_closed() == "moderator_lost"
        with pytest.raises(SessionClosedError) as closed:
            await sa.get_message()
        assert closed.value.reason == "moderator_lost"


# -- F-1, F-2: the node killed -----------------------------------------------------------------


def node_args(port: int = 0) -> tuple[str, ...]:
    return ("--endpoint", f"127.0.0.1:{port}", "--shared-secret", SECRET, "--log-level", "warn")


def port_of(node: NodeProcess) -> int:
    return int(node.endpoint.rpartition(":")[2])


def kill(node: NodeProcess) -> None:
    node.process.kill()  # SIGKILL: no goodbye, no drain


@pytest.mark.anyio
@pytest.mark.matrix("F-1")
async def test_f1_node_killed_and_restarted_under_reliable_traffic() -> None:
    total, rate = 1500, 500  # 3 s of traffic at 500 msg/s
    async with AsyncExitStack() as nodes:
        first = await nodes.enter_async_context(open_node_process(node_args()))
        baseline = snapshot(first)
        async with AsyncExitStack() as stack:
            a = await connect(stack, first.url, "sender")
            b = await connect(stack, first.url, "receiver")
            s = await a.create_session(b.name, SessionConfig(timeout=0.2, max_retries=50))
            r = await b.listen_for_session()
            handles: list[Any] = []
            got: list[bytes] = []
            arrived: list[float] = []
            published = anyio.Event()

            async def publish_all() -> None:
                for i in range(total):
                    handles.append(await s.publish(b"%d" % i))
                    if i % 10 == 9:
                        await anyio.sleep(10 / rate)  # paces the traffic
                published.set()

            async def receive_all() -> None:
                while len(got) < total:
                    got.append((await r.get_message()).payload)
                    arrived.append(anyio.current_time())

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_all)
                tg.start_soon(receive_all)
                await wait_until(lambda: len(got) >= 300, message="traffic before the kill")
                kill(first)
                await first.process.wait()
                # restarted at once on the same port (well within the row's 2 s)
                second = await nodes.enter_async_context(open_node_process(node_args(
                    port_of(first))))
                restarted_at = anyio.current_time()
                # traffic resumes within 5 s of the restart
                await wait_until(lambda: bool(arrived) and arrived[-1] > restarted_at,
                                 timeout=5.0, message="traffic after the restart")
                with anyio.fail_after(20):
                    await published.wait()
                    outcomes = []
                    for h in handles:
                        try:
                            outcomes.append(await h)
                        except DeliveryError as exc:
                            outcomes.append(exc)
            # Every message was acknowledged (its budget outlasts the outage) and
            # delivered once, in order: none lost silently, none twice.
            failed = [o for o in outcomes if isinstance(o, Exception)]
            assert failed == []
            assert got == [b"%d" % i for i in range(total)]
            assert a.connects >= 2 and b.connects >= 2
        # The restarted node holds nothing of the session once the apps are gone.
        await wait_for_baseline(second, baseline)
        await health_probe(second.url, SECRET)
        await wait_for_baseline(second, baseline)


@pytest.mark.anyio
@pytest.mark.matrix("F-2")
async def test_f2_node_killed_for_good_reports_failures_and_closes_fast() -> None:
    timeout, retries = 0.1, 5
    fds, tasks = process_resources()
    async with open_node_process(node_args()) as node:
        stack = AsyncExitStack()
        async with stack:
            a = await connect(stack, node.url, "a")
            b = await connect(stack, node.url, "b")
            s = await a.create_session(b.name, SessionConfig(timeout=timeout,
                                                             max_retries=retries))
            await b.listen_for_session()
            plain = await a.create_session(b.name)  # its goodbye would be retried for 11 s
            plain_r = await b.listen_for_session()
            config = SessionConfig.group(timeout=timeout, max_retries=retries,
                                         heartbeat_interval=FAST)
            g = await a.create_session(f"org/ns/{unique('chan')}", config)
            await g.invite(b.name)
            with anyio.fail_after(5):
                gb = await b.listen_for_session()
            await (await s.publish(b"before"))
            kill(node)
            await wait_until(lambda: not a.connected and not b.connected,
                             message="both apps disconnected")
            with anyio.fail_after(1):  # publishing does not block without a node
                handle = await s.publish(b"after")
                group_handle = await g.publish(b"to the group")
            budget = timeout * (retries + 1)
            with anyio.fail_after(budget + 1), pytest.raises(DeliveryTimeoutError) as info:
                await handle
            assert dict(info.value.failed) == {b.name: "timeout"}
            with anyio.fail_after(budget + 1), pytest.raises(DeliveryError) as info:
                await group_handle
            assert set(info.value.failed) == {b.name}
            # closing completes at once: nobody can be told
            with anyio.fail_after(1):
                await plain.close()
                await plain_r.close()
                await gb.close()
                await s.close()
            assert plain.is_closed and plain_r.is_closed and gb.is_closed and s.is_closed
            started = anyio.current_time()
            await stack.aclose()  # the apps close without their node
            assert anyio.current_time() - started < 1.0
    # Nothing of the apps is left in this process.
    await wait_until(lambda: process_resources() == (fds, tasks), timeout=2.0,
                     message=f"fds and tasks back to {(fds, tasks)}")


# -- F-3, F-6, F-8: the network between an app and the node -------------------------------------


@pytest.mark.anyio
@pytest.mark.matrix("F-3")
async def test_f3_a_client_cut_off_then_reconnected_loses_and_duplicates_nothing() -> None:
    total, silence = 600, 1.5
    async with checked_node() as node, AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(open_fault_proxy(node.url, seed=3))
        a = await connect(stack, proxy.url, "sender")
        b = await connect(stack, node.url, "receiver")
        s = await a.create_session(b.name, SessionConfig(timeout=0.1, max_retries=100))
        r = await b.listen_for_session()
        got: list[bytes] = []
        handles: list[Any] = []
        published = anyio.Event()

        async def publish_all() -> None:
            for i in range(total):
                handles.append(await s.publish(b"%d" % i))
                if i % 10 == 9:
                    await anyio.sleep(0.01)  # paces the traffic
            published.set()

        async def receive_all() -> None:
            while len(got) < total:
                got.append((await r.get_message()).payload)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_all)
            tg.start_soon(receive_all)
            await wait_until(lambda: len(got) >= 100, message="traffic before the fault")
            # Silence both ways (the connection stays up), then the connection is cut.
            proxy.up.blackhole = proxy.down.blackhole = True
            await anyio.sleep(silence)  # how long the fault lasts
            proxy.up.blackhole = proxy.down.blackhole = False
            proxy.reset()
            with anyio.fail_after(15):
                await published.wait()
                for h in handles:
                    await h  # every one acknowledged
        assert got == [b"%d" % i for i in range(total)]  # once each, in order
        assert proxy.stats.swallowed > 0 and a.connects == 2
        with pytest.raises(TimeoutError), anyio.fail_after(0.2):
            await r.get_message()


@pytest.mark.anyio
@pytest.mark.matrix("F-6")
async def test_f6_a_reliable_publisher_sees_a_slow_member_unreachable_with_bounded_memory(
        ) -> None:
    total, window = 300, 64
    config = SessionConfig.group(timeout=0.5, max_retries=20, window=window,
                                 heartbeat_interval=FAST, moderator_grace=30)
    async with checked_node() as node, AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(open_fault_proxy(node.url, seed=6))
        # The moderator publishes (the window is a local setting of its config).
        _mod, g, (a, fast, slow), (sa, sf, _ss) = await form_group(
            stack, node.url, config, 3, targets=[node.url, node.url, proxy.url])
        proxy.down.throttle = 2000  # bytes per second: it reads far slower than g sends
        proxy.down.only_publish = False
        most = 0
        handles = []
        started = anyio.current_time()
        with anyio.fail_after(10):
            for i in range(total):
                handles.append(await g.publish(b"%d" % i + b"." * 100))
                most = max(most, g.statistics()["acks_pending"])
            outcomes = []
            for h in handles:
                try:
                    outcomes.append(((await h).delivered, {}))
                except DeliveryError as exc:
                    outcomes.append((exc.report.delivered, dict(exc.failed)))
        elapsed = anyio.current_time() - started
        assert most <= window  # the publisher never holds more than its window
        for delivered, failed in outcomes:
            assert {a.name, fast.name} <= set(delivered)
            assert set(failed) <= {slow.name} and set(failed.values()) <= {"unreachable"}
        assert sum(1 for _, failed in outcomes if failed) >= total - 2 * window
        # it was not held up for the slow member's retries (0.5 s x 20)
        assert elapsed < 5.0 and slow.name in g.offline
        with anyio.fail_after(5):
            got = [(await sf.get_message()).payload for _ in range(total)]
            assert [(await sa.get_message()).payload for _ in range(total)] == got
        assert got == [b"%d" % i + b"." * 100 for i in range(total)]
        proxy.reset()  # let the slow member go


@pytest.mark.anyio
@pytest.mark.matrix("F-8")
async def test_f8_a_member_cut_off_during_a_remove_gets_the_retried_commit() -> None:
    config = SessionConfig.group(timeout=0.3, max_retries=10, mls_enabled=True,
                                 heartbeat_interval=FAST, moderator_grace=30)
    async with checked_node() as node, AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(open_fault_proxy(node.url, seed=8))
        _mod, g, (gone, _b, cut), (sgone, sb, scut) = await form_group(
            stack, node.url, config, 3, targets=[node.url, node.url, proxy.url])
        newcomer = await connect(stack, node.url, "newcomer")
        proxy.up.blackhole = proxy.down.blackhole = True
        removal = g.start_remove(gone.name)
        invite = g.start_invite(newcomer.name)  # its Welcome waits for every ack
        await wait_until(lambda: cut.name in g.offline, timeout=3 * FAST + 0.5,
                         message="the member cut off marked offline")
        await anyio.sleep(0.5)  # the partition lasts a while longer (less than the budget)
        assert not removal.done and not invite.done
        assert not newcomer.sessions  # no Welcome before every ack
        proxy.up.blackhole = proxy.down.blackhole = False
        with anyio.fail_after(5):
            await removal
            await invite
            joined = await newcomer.listen_for_session()
        await wait_until(lambda: sgone.is_closed, message="the removed member closed")
        assert sgone.close_reason == "removed"
        everyone = [g, sb, scut, joined]
        await wait_until(lambda: len({state_of(x) for x in everyone}) == 1,
                         message="one roster and one epoch everywhere")
        assert cut.name in g.participants and not g.offline


@pytest.mark.anyio
@pytest.mark.matrix("F-8")
async def test_f8_a_member_cut_off_too_long_is_removed_then_rejoins_on_the_current_epoch(
        ) -> None:
    config = SessionConfig.group(timeout=0.1, max_retries=5, mls_enabled=True,
                                 heartbeat_interval=FAST, moderator_grace=30)
    async with checked_node() as node, AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(open_fault_proxy(node.url, seed=8))
        mod, g, (gone, b, cut), (_sgone, sb, scut) = await form_group(
            stack, node.url, config, 3, targets=[node.url, node.url, proxy.url])
        proxy.up.blackhole = proxy.down.blackhole = True
        with anyio.fail_after(5):
            await g.remove(gone.name)  # the member cut off never acknowledged: removed too
        assert g.participants == [mod.name, b.name]
        assert state_of(g) == state_of(sb) and not scut.is_closed
        proxy.up.blackhole = proxy.down.blackhole = False
        # Back, it answers a heartbeat and hears that it was removed.
        with anyio.fail_after(3 * FAST + 2):
            assert await scut.wait_closed() == "removed"
        with anyio.fail_after(5):
            await g.invite(cut.name)  # the application invites it again
            back = await cut.listen_for_session()
        everyone = [g, sb, back]
        await wait_until(lambda: len({state_of(x) for x in everyone}) == 1,
                         message="one roster and one epoch everywhere")


# -- B-9 .. B-17: bad inputs at the session level ---------------------------------------------

E2E_GROUP = SessionConfig.group(timeout=0.3, max_retries=5, mls_enabled=True,
                                heartbeat_interval=FAST)


@pytest.mark.anyio
@pytest.mark.matrix("B-9")
@pytest.mark.parametrize("config", [SessionConfig.group(timeout=0.3, max_retries=5),
                                    SessionConfig.group(mls_enabled=True),
                                    E2E_GROUP], ids=["reliable", "e2e", "e2e-reliable"])
async def test_b9_a_replayed_data_frame_is_dropped_and_acknowledged_again(
        config: SessionConfig) -> None:
    async with checked_node() as node, AsyncExitStack() as stack:
        _mod, g, (a, b), (sa, sb) = await form_group(stack, node.url, config, 2)
        sent = tap(a)
        acks = tap(b)
        await (await g.publish(b"warm up"))  # a has everyone's stream state
        with anyio.fail_after(2):
            assert (await sb.get_message()).payload == b"warm up"
        handle = await sa.publish(b"once")
        with anyio.fail_after(2):
            assert (await sb.get_message()).payload == b"once"
            await handle
        (frame,) = of_kind(sent, Kind.MSG)
        acked_before = len(of_kind(acks, Kind.MSG_ACK))
        inject(a, frame)
        inject(a, frame)
        core = sb._core
        if config.reliable:
            stream = core._recv[tuple(a.core.wire)]
            await wait_until(lambda: stream.duplicates == 2, message="both duplicates counted")
            assert sb.statistics()["duplicates"] == 2
            await wait_until(lambda: len(of_kind(acks, Kind.MSG_ACK)) > acked_before,
                             message="the duplicates acknowledged again")
        else:
            await wait_until(lambda: b.core.counters["e2e:replay"] == 2,
                             message="both replays counted")
        await (await sa.publish(b"next"))
        with anyio.fail_after(2):  # the next message from a is the next one seen
            assert (await sb.get_message()).payload == b"next"
        assert not core.inbox


@pytest.mark.anyio
@pytest.mark.matrix("B-10")
async def test_b10_replayed_commits_welcomes_and_key_packages_change_nothing() -> None:
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, g, (a, b), (sa, sb) = await form_group(stack, node.url, E2E_GROUP, 2)
        from_mod = tap(mod)
        newcomer = await connect(stack, node.url, "newcomer")
        from_newcomer = tap(newcomer)
        await g.invite(newcomer.name)
        with anyio.fail_after(2):
            sn = await newcomer.listen_for_session()
        await g.rotate_keys()  # a later epoch: the captured commit is now old
        everyone = [g, sa, sb, sn]
        await wait_until(lambda: len({state_of(x) for x in everyone}) == 1,
                         message="agreement")
        before = [state_of(x) for x in everyone]
        (commit_frame,) = [d for d in of_kind(from_mod, Kind.GROUP_UPDATE)
                           if decode_body(d["body"]).get("op") == "add"
                           and d.get("fan") == 2] or of_kind(from_mod, Kind.GROUP_UPDATE)[:1]
        (welcome,) = of_kind(from_mod, Kind.GROUP_WELCOME)
        (key_package,) = of_kind(from_newcomer, Kind.JOIN_REPLY)
        replies = {x: tap(x) for x in (a, b, newcomer)}
        # Replayed as captured: answered from the cache of answers, nothing applied.
        inject(mod, commit_frame)
        inject(mod, welcome)
        inject(newcomer, key_package)
        # Once more after the members forgot their answers: the old commit (its id
        # behind theirs) is ignored, and the ack tells the current epoch.
        await wait_until(lambda: all(of_kind(replies[x], Kind.GROUP_ACK) for x in (a, b)),
                         message="the cached answers")
        for x in (sa, sb):
            x._core._answered.clear()
        inject(mod, commit_frame)
        await wait_until(lambda: all(len(of_kind(replies[x], Kind.GROUP_ACK)) == 2
                                     for x in (a, b)), message="the fresh answers")
        current = before[0][2][1]
        assert all(decode_body(of_kind(replies[x], Kind.GROUP_ACK)[1]["body"])["auth"] == current
                   for x in (a, b))
        assert of_kind(replies[newcomer], Kind.GROUP_ACK)  # the old Welcome: acked, ignored
        assert [state_of(x) for x in everyone] == before
        report = await (await sn.publish(b"all still agree"))
        assert set(report.delivered) == {mod.name, a.name, b.name}


@pytest.mark.anyio
@pytest.mark.matrix("B-10")
async def test_b10_an_old_welcome_replayed_to_a_member_joining_again_is_ignored() -> None:
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, g, (_a,), (sa,) = await form_group(stack, node.url, E2E_GROUP, 1)
        from_mod = tap(mod)
        again = await connect(stack, node.url, "again")
        await g.invite(again.name)
        with anyio.fail_after(2):
            first = await again.listen_for_session()
        (old_welcome,) = of_kind(from_mod, Kind.GROUP_WELCOME)
        await g.remove(again.name)
        assert first.is_closed

        def replay_first(d: dict[str, Any]) -> dict[str, Any] | None:
            if d.get("k") == Kind.JOIN_REPLY:  # the old Welcome overtakes the new one
                inject(mod, old_welcome)
            return d

        rewrite(again, replay_first)
        await g.invite(again.name)
        with anyio.fail_after(2):
            second = await again.listen_for_session()
        assert again.core.counters["e2e:foreign_welcome"] == 1
        assert state_of(second) == state_of(g) == state_of(sa)


@pytest.mark.anyio
@pytest.mark.matrix("B-12", "B-13")
async def test_b12_b13_a_removed_member_keeping_its_keys_reads_and_writes_nothing() -> None:
    secrets = [b"secret-after-removal-%d" % i for i in range(3)]
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, g, (a, b, v), (sa, sb, sv) = await form_group(stack, node.url, E2E_GROUP, 3)
        keys = sv._core.keys
        assert keys is not None and keys.state is not None
        stolen = copy.deepcopy(keys.state)  # kept against the rules
        v_sent = tap(v)
        await (await sv.publish(b"while a member"))
        heard: list[dict[str, Any]] = []
        receive = v.core.receive

        def listening(envelopes: Any, now: float, **kw: Any) -> None:
            envelopes = list(envelopes)
            heard.extend(envelopes)
            receive(envelopes, now, **kw)

        v.core.receive = listening  # type: ignore[method-assign]
        await g.remove(v.name)
        assert sv.is_closed and sv.close_reason == "removed"
        await v.subscribe(g.dst)  # it listens on the channel again (the ACL allows it)
        rid = v.core._rid
        await wait_until(lambda: any(d.get("t") == "sub_ack" and d.get("rid") == rid
                                     and d.get("ok") for d in heard),
                         message="its subscription accepted")
        await (await g.publish(b"probe"))
        for i, secret in enumerate(secrets):
            await (await [g, sa, sb][i].publish(secret))
        await wait_until(lambda: len(of_kind(heard, Kind.MSG)) > len(secrets),
                         message="the removed member hearing every message")
        # B-12: every message is beyond its keys; the text shows up nowhere.
        for d in of_kind(heard, Kind.MSG):
            aad = SessionKeys.aad(d["src"], d["dst"], d["sid"], d["st"], d["mid"], None, None)
            with pytest.raises(E2EError) as info:
                stolen.decrypt(d["body"], aad, time.time())
            assert info.value.code in ("epoch_pending", "stale_epoch", "bad_tag")
        assert not any(secret in encode_frame(d) for d in heard for secret in secrets)
        assert not sv._core.inbox and not v.sessions and v.core.counters["no_session"] >= 4
        # B-13: what it sends, old epoch or copied new-epoch bodies, is dropped unopened.
        (own,) = of_kind(v_sent, Kind.MSG)
        old_epoch = dict(own, mid=own["mid"] + 1, body=stolen.encrypt(b"still here", b"x"))
        new_epoch = dict(own, mid=own["mid"] + 2, body=of_kind(heard, Kind.MSG)[-1]["body"])
        for frame in (old_epoch, new_epoch):
            inject(v, frame)
        await wait_until(lambda: all(x.core.counters["data_from_non_member"] >= 2
                                     for x in (mod, a, b)), message="both refused")
        for x in (g, sa, sb):  # nothing from it after its removal, not even an error
            from_v = [m for m in x._core.inbox
                      if not isinstance(m, Message) or m.context.source_name == v.name]
            assert [m.payload for m in from_v if isinstance(m, Message)] == [b"while a member"]
            assert len(from_v) == 1


@pytest.mark.anyio
@pytest.mark.matrix("B-14")
async def test_b14_a_member_labelling_its_message_as_another_members_is_refused() -> None:
    config = SessionConfig.group(mls_enabled=True, heartbeat_interval=FAST)
    async with checked_node() as node, AsyncExitStack() as stack:
        _mod, g, (liar, victim, _c), (sl, _sv, sc) = await form_group(
            stack, node.url, config, 3)
        sent = tap(liar)
        await (await sl.publish(b"genuine"))
        with anyio.fail_after(2):
            assert (await sc.get_message()).payload == b"genuine"
            assert (await g.get_message()).payload == b"genuine"
        (genuine,) = of_kind(sent, Kind.MSG)
        state = sl._core.keys.state  # type: ignore[union-attr]
        assert state is not None
        leaf = state.leaf_of(victim.core.subject)
        aad = SessionKeys.aad(genuine["src"], genuine["dst"], genuine["sid"], genuine["st"],
                              genuine["mid"] + 1, None, None)
        forged = seal_app(Chain(bytearray(state._epoch.chain(leaf).key)), state._identity,
                          group_id=state.group_id, epoch=state.epoch, leaf=leaf,
                          plaintext=b"I am the victim", aad=aad, rng=os.urandom)
        inject(liar, dict(genuine, mid=genuine["mid"] + 1, body=forged))
        for receiver in (g, sc):
            with anyio.fail_after(2), pytest.raises(DecryptError) as info:
                await receiver.get_message()
            assert info.value.code == "bad_signature"
        await (await sl.publish(b"honest again"))
        with anyio.fail_after(2):
            assert (await sc.get_message()).payload == b"honest again"


@pytest.mark.anyio
@pytest.mark.matrix("B-15")
@pytest.mark.parametrize("field", ["body", "mid", "pt", "meta", "sid", "dst"])
async def test_b15_a_header_altered_in_transit_is_never_delivered(field: str) -> None:
    async with checked_node() as node, AsyncExitStack() as stack:
        a = await connect(stack, node.url, "a")
        b = await connect(stack, node.url, "b")
        third = await connect(stack, node.url, "third")
        s = await a.create_session(b.name, SessionConfig(timeout=0.2, max_retries=10,
                                                         mls_enabled=True))
        r = await b.listen_for_session()
        altered: list[int] = []

        def tamper(d: dict[str, Any]) -> dict[str, Any]:
            if d.get("k") != Kind.MSG or altered:
                return d
            altered.append(d["mid"])
            if field == "body":
                gk = decode_body(d["body"])
                gk["ct"] = bytes([gk["ct"][0] ^ 1]) + gk["ct"][1:]
                return dict(d, body=encode_body(gk))
            if field == "mid":
                return dict(d, mid=d["mid"] + 1)
            if field == "pt":
                return dict(d, pt="other")
            if field == "meta":
                return dict(d, meta={"k": "forged"})
            if field == "sid":
                return dict(d, sid=d["sid"] ^ 1)
            return dict(d, dst=third.name.to_wire())

        rewrite(a, tamper)
        handle = await s.publish(b"original", payload_type="text", metadata={"k": "v"})
        if field in ("sid", "dst"):  # it reaches no session: dropped there
            who = b if field == "sid" else third
            await wait_until(lambda: who.core.counters["no_session"] >= 1,
                             message="the altered copy dropped")
        else:  # the associated data no longer matches
            with anyio.fail_after(2), pytest.raises(DecryptError) as info:
                await r.get_message()
            assert info.value.code == "bad_tag"
        with anyio.fail_after(3):  # the sender's own copy, resent, is the one delivered
            ctx, payload = await r.get_message()
            await handle
        assert (payload, ctx.payload_type, dict(ctx.metadata)) == (b"original", "text",
                                                                  {"k": "v"})
        assert not third.sessions and altered
        with pytest.raises(TimeoutError), anyio.fail_after(0.3):
            await r.get_message()


@pytest.mark.anyio
@pytest.mark.matrix("B-16")
async def test_b16_a_generation_far_ahead_is_refused_without_deriving_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from slim_agents import _e2e_epoch

    config = SessionConfig.group(mls_enabled=True, heartbeat_interval=FAST)
    async with checked_node() as node, AsyncExitStack() as stack:
        _mod, g, (a, _b), (sa, sb) = await form_group(stack, node.url, config, 2)
        sent = tap(a)
        await (await sa.publish(b"genuine"))
        with anyio.fail_after(2):
            assert (await sb.get_message()).payload == b"genuine"
            assert (await g.get_message()).payload == b"genuine"
        (genuine,) = of_kind(sent, Kind.MSG)
        gk = decode_body(genuine["body"])
        gk["n"] = 0xFFFF_FFFF
        derived = 0
        real = _e2e_epoch.ratchet

        def counting(key: bytes | bytearray, n: int) -> tuple[bytes, bytes]:
            nonlocal derived
            derived += 1
            return real(key, n)

        monkeypatch.setattr(_e2e_epoch, "ratchet", counting)
        keys = sb._core.keys
        assert keys is not None
        spent: list[float] = []
        decrypt = keys.decrypt

        def timed(*args: Any) -> bytes:
            t = time.thread_time()  # CPU time: a preempted test does not count
            try:
                return decrypt(*args)
            finally:
                spent.append(time.thread_time() - t)

        keys.decrypt = timed  # type: ignore[method-assign]
        inject(a, dict(genuine, mid=genuine["mid"] + 1, body=encode_body(gk)))
        for receiver in (g, sb):
            with anyio.fail_after(2), pytest.raises(DecryptError) as info:
                await receiver.get_message()
            assert info.value.code == "too_far_ahead"
        assert derived == 0 and spent and max(spent) < 1e-3


@pytest.mark.anyio
@pytest.mark.matrix("B-17")
@pytest.mark.parametrize("flaw", ["expired", "bad_signature", "reused"])
async def test_b17_a_bad_key_package_fails_the_invite_and_leaves_the_group_alone(
        flaw: str) -> None:
    async with checked_node() as node, AsyncExitStack() as stack:
        _mod, g, (a,), (sa,) = await form_group(stack, node.url, E2E_GROUP, 1)
        x = await connect(stack, node.url, "invitee")
        used: list[bytes] = []
        if flaw == "reused":
            first_kp = tap(x)
            await g.invite(x.name)
            with anyio.fail_after(2):
                await x.listen_for_session()
            await g.remove(x.name)
            used = [decode_body(d["body"])["kp"] for d in of_kind(first_kp, Kind.JOIN_REPLY)]
        before = state_of(g)
        assert state_of(sa) == before

        def bad_package(d: dict[str, Any]) -> dict[str, Any]:
            if d.get("k") != Kind.JOIN_REPLY:
                return d
            body = decode_body(d["body"])
            if flaw == "expired":
                body["kp"], _ = make_key_package(x.core.signing, x.core.token(),
                                                 x.core.subject, time.time() - 700, 600)
            elif flaw == "bad_signature":
                kp = decode_body(body["kp"])
                kp["sig"] = bytes(64)
                body["kp"] = encode_body(kp)
            else:
                body["kp"] = used[0]
            return dict(d, body=encode_body(body))

        rewrite(x, bad_package)
        with anyio.fail_after(3), pytest.raises(JoinFailedError) as info:
            await g.invite(x.name)
        assert info.value.name == x.name and info.value.code == "key_package"
        assert state_of(g) == before == state_of(sa)
        report = await (await g.publish(b"unchanged"))
        assert report.delivered == (a.name,)


# -- authorization: only the moderator changes the group -------------------------------------


@pytest.mark.anyio
@pytest.mark.matrix("AUTH-4.3")
async def test_only_the_moderator_invites_removes_or_closes() -> None:
    async with checked_node() as node, AsyncExitStack() as stack:
        mod, g, (a, b), (sa, sb) = await form_group(stack, node.url, E2E_GROUP, 2)
        outsider = await connect(stack, node.url, "outsider")
        with pytest.raises(NotModeratorError):
            await sa.invite(outsider.name)
        with pytest.raises(NotModeratorError):
            await sa.remove(b.name)
        before = state_of(sb)
        answers = tap(b)
        # The member tries every membership message on another member, signed with
        # its own valid token.
        attempts = [
            (Kind.GROUP_UPDATE, {"op": "remove", "gone": [[mod.name.to_wire(),
                                                          mod.core.subject]]}),
            (Kind.GROUP_UPDATE, {"op": "add", "who": [outsider.name.to_wire(),
                                                      outsider.core.subject]}),
            (Kind.GROUP_UPDATE, {"op": "refresh", "mls": [b"junk"]}),
            (Kind.GROUP_WELCOME, {"roster": []}),
            (Kind.GROUP_CLOSE, {"roster": []}),
            (Kind.LEAVE_REQUEST, {}),  # "you are removed"
            (Kind.GROUP_PROPOSAL, {"kupd": b"junk"}),
        ]
        for kind, body in attempts:
            inject(a, control(a, sa, b.name, kind, body))
        await wait_until(lambda: len(of_kind(answers, Kind.GROUP_NACK)) == len(attempts),
                         message="every attempt refused")
        assert {decode_body(d["body"])["code"] for d in of_kind(answers, Kind.GROUP_NACK)} == {
            "not_moderator"}
        assert state_of(sb) == before and not sb.is_closed
        report = await (await g.publish(b"the group is intact"))
        assert set(report.delivered) == {a.name, b.name}
