"""Session flows on the sans-IO harness: handshakes, groups, errors, reliability."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_lite import Name, NoRouteError
from node_lite.wire import decode_frame
from slim_agents._config import SessionConfig
from slim_agents._errors import (
    DeliveryTimeoutError,
    NotModeratorError,
    ParticipantError,
    SessionClosedError,
    SessionRejectedError,
)
from slim_agents._protocol import Kind
from slim_agents._reports import Message
from slim_agents._session_core import State
from tests.slim_agents.harness import FaultInjector, Faults, Net

RELIABLE = {"timeout": 1.0, "max_retries": 5}
CHAN = Name("org", "ns", "chan")


def payloads(session) -> list[bytes]:  # type: ignore[no-untyped-def]
    out = [m.payload for m in session.inbox if isinstance(m, Message)]
    session.inbox.clear()
    return out


def p2p(net: Net, config: SessionConfig | None = None):  # type: ignore[no-untyped-def]
    a, b = net.add_app("alice"), net.add_app("bob")
    net.pump()
    s, ticket = a.create_session(Name("org", "ns", "bob"), config or SessionConfig(**RELIABLE),
                                 net.now)
    net.pump()
    assert ticket.resolved and ticket.error is None, ticket.error
    (r,) = net.announced(b)
    return a, b, s, r


def send(app, session, payload: bytes, net: Net, **kw):  # type: ignore[no-untyped-def]
    ticket = session.publish(payload, net.now, **kw)
    app.operate(session)
    return ticket


def group(net: Net, n: int, config: SessionConfig | None = None):  # type: ignore[no-untyped-def]
    mod = net.add_app("moderator")
    members = [net.add_app(f"m{i}") for i in range(n)]
    net.pump()
    g, ticket = mod.create_session(CHAN, config or SessionConfig.group(**RELIABLE), net.now)
    assert ticket.resolved
    sessions = []
    for m in members:
        t = g.invite(m.name.without_id(), net.now)
        mod.operate(g)
        net.pump()
        assert t.resolved and t.error is None, t.error
        sessions.append(net.announced(m)[-1])
        # every member, old and new, shares the roster after each invite
        rosters = {frozenset(s.roster) for s in [g, *sessions]}
        assert len(rosters) == 1, rosters
    return mod, members, g, sessions


def test_point_to_point_handshake_and_round_trip() -> None:
    net = Net()
    a, b, s, r = p2p(net)
    assert s.sid == r.sid
    assert s.peer == b.name and r.peer == a.name
    assert s.state is r.state is State.ESTABLISHED
    t = send(a, s, b"hello", net, payload_type="text", metadata={"k": "v"})
    net.pump()
    (msg,) = list(r.inbox)
    assert msg.payload == b"hello"
    assert (msg.context.payload_type, dict(msg.context.metadata)) == ("text", {"k": "v"})
    assert msg.context.source_name == a.name and msg.context.session_id == s.sid
    assert t.resolved and t.result.delivered == (b.name,)
    # reply to the sender with publish_to semantics (p2p: the peer)
    send(b, r, b"back", net, to=msg.context.source_name)
    net.pump()
    assert payloads(s) == [b"back"]


def test_a_reply_carries_the_acks_of_what_it_answers() -> None:
    from node_lite.wire import decode_frame, encode_frame
    from slim_agents._protocol import Kind, decode_body
    from tests.slim_agents.harness import split

    net = Net()
    a, b, s, r = p2p(net)
    asked = [send(a, s, f"q{i}".encode(), net) for i in range(3)]
    # Bob's read loop takes the batch but acknowledges only after its tasks ran.
    net.node.data_received(net.conn_of(a), b"".join(a.take_frames()), net.now)
    down = split(net.sinks[net.conn_of(b)].take())
    b.receive([decode_frame(f[4:]) for f in down], net.now, ack=False)
    assert b.acks_due and payloads(r) == [b"q0", b"q1", b"q2"]
    answered = send(b, r, b"answer", net)
    b.flush(net.now)
    (frame,) = [decode_frame(f[4:]) for f in b.take_frames()]  # no ack frame of its own
    assert frame["k"] == Kind.MSG and frame["body"] == b"answer"
    assert decode_body(frame["ack"]) == {"a": [[1, 3]], "at": 3}
    assert b.counters["acks_carried"] == 1 and not b.acks_due
    net.node.data_received(net.conn_of(b), encode_frame(frame), net.now)
    net.pump()
    assert all(t.resolved and t.error is None for t in asked)
    assert payloads(s) == [b"answer"]
    net.pump()
    assert answered.resolved and answered.error is None
    assert s._send is not None and s._send.retransmissions == 0


def test_an_ack_riding_on_a_message_is_checked() -> None:
    from node_lite.wire import decode_frame, encode_frame

    net = Net()
    a, b, s, r = p2p(net)
    send(a, s, b"q", net)
    net.pump()
    payloads(r)
    # Alice's next message carries junk where its acks go: refused, counted, nothing
    # delivered (the sender's retransmission, with its own acks, still gets through).
    ticket = send(a, s, b"x", net)
    (frame,) = [decode_frame(f[4:]) for f in a.take_frames()]
    frame["ack"] = "not bytes"
    net.node.data_received(net.conn_of(a), encode_frame(frame), net.now)
    net.pump()
    assert b.counters["malformed:ProtocolViolation"] == 1 and payloads(r) == []
    net.advance(1.5)
    net.pump()
    assert payloads(r) == [b"x"] and ticket.resolved and ticket.error is None


def test_session_metadata_reaches_the_receiver() -> None:
    net = Net()
    _, _, _, r = p2p(net, SessionConfig(metadata={"a": "1", "k": "session"}))
    assert dict(r.metadata) == {"a": "1", "k": "session"}


def test_best_effort_reports_immediately() -> None:
    net = Net()
    a, _b, s, r = p2p(net, SessionConfig())
    t = send(a, s, b"x", net)
    assert t.resolved and not t.result.reliable
    net.pump()
    assert payloads(r) == [b"x"]


def test_group_invite_publish_publish_to_remove_close() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 3)
    assert len(g.roster) == 4
    t = send(mod, g, b"to all", net)
    net.pump()
    assert t.result.ok and set(t.result.delivered) == {m.name for m in members}
    assert all(payloads(s) == [b"to all"] for s in sessions)
    # a member's publish reaches everyone else
    send(members[0], sessions[0], b"from m0", net)
    net.pump()
    assert payloads(g) == [b"from m0"]
    assert payloads(sessions[1]) == payloads(sessions[2]) == [b"from m0"]
    assert payloads(sessions[0]) == []
    # publish_to reaches one member
    send(members[1], sessions[1], b"just m2", net, to=members[2].name)
    net.pump()
    assert payloads(sessions[2]) == [b"just m2"]
    assert payloads(sessions[0]) == payloads(g) == []
    # remove m1
    t = g.remove(members[1].name, net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved and t.error is None
    assert sessions[1].state is State.CLOSED and sessions[1].close_reason == "removed"
    for s in (g, sessions[0], sessions[2]):
        assert members[1].name not in s.roster and len(s.roster) == 3
    # close: everyone is told
    t = g.close(net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved
    assert all(s.state is State.CLOSED for s in (g, sessions[0], sessions[2]))
    assert sessions[0].close_reason == "closed by moderator"


def test_member_leaving_updates_the_others() -> None:
    net = Net()
    _mod, members, g, sessions = group(net, 3)
    t = sessions[0].close(net.now)
    members[0].operate(sessions[0])
    net.pump()
    assert t.resolved and sessions[0].state is State.CLOSED
    assert all(members[0].name not in s.roster for s in (g, sessions[1], sessions[2]))


def test_point_to_point_close_by_either_side_closes_both() -> None:
    for closer in (0, 1):
        net = Net()
        a, b, s, r = p2p(net)
        sides = [(a, s), (b, r)]
        app, session = sides[closer]
        session.close(net.now)
        app.operate(session)
        net.pump()
        assert s.state is r.state is State.CLOSED
        with pytest.raises(SessionClosedError, match="session closed"):
            s.publish(b"late", net.now)


def test_operation_errors_are_typed() -> None:
    net = Net()
    _mod, members, g, sessions = group(net, 2)
    with pytest.raises(NotModeratorError):
        sessions[0].invite(Name("org", "ns", "x"), net.now)
    with pytest.raises(ParticipantError):
        g.remove(Name("org", "ns", "nobody", 1), net.now)
    t = g.invite(members[0].name, net.now)
    assert t.resolved and isinstance(t.error, ParticipantError)


def test_no_route_fails_fast() -> None:
    net = Net()
    a = net.add_app("alice")
    net.pump()
    _, t = a.create_session(Name("org", "ns", "nobody"), SessionConfig(**RELIABLE), net.now)
    net.pump()
    assert t.resolved and isinstance(t.error, NoRouteError)


def test_wrong_secret_is_refused_and_the_sender_told() -> None:
    net = Net(node_secret=None)
    a = net.add_app("alice")
    net.add_app("bob", secret="another-secret-that-is-long-enough-012345678")
    net.pump()
    _, t = a.create_session(Name("org", "ns", "bob"), SessionConfig(**RELIABLE), net.now)
    net.pump()
    assert isinstance(t.error, SessionRejectedError) and t.error.code == "unauthenticated"


def test_invite_policy_can_decline() -> None:
    net = Net()
    mod = net.add_app("moderator")
    net.add_app("picky", policy=lambda info: "not today")
    net.pump()
    g, _ = mod.create_session(CHAN, SessionConfig.group(**RELIABLE), net.now)
    t = g.invite(Name("org", "ns", "picky"), net.now)
    mod.operate(g)
    net.pump()
    assert isinstance(t.error, SessionRejectedError) and t.error.code == "declined"
    assert len(g.roster) == 1


def test_peer_gone_gives_a_delivery_failure_report() -> None:
    net = Net()
    a, b, s, _r = p2p(net)
    conn = net.conn_of(b)
    net.node.connection_lost(conn)  # bob's connection is gone
    del net.apps[conn], net.sinks[conn]
    t = send(a, s, b"into the void", net)
    net.settle(30)
    assert isinstance(t.error, DeliveryTimeoutError)
    assert dict(t.error.failed) == {b.name: "timeout"}


def check_exactly_once_in_order(received: list[bytes], sent: list[bytes]) -> None:
    assert received == sent


@settings(max_examples=int(__import__("os").environ.get("SLIM_FUZZ_EXAMPLES", 60)), deadline=None)
@given(seed=st.integers(0, 10_000), drop=st.floats(0, 0.3), dup=st.floats(0, 0.3),
       reorder=st.floats(0, 0.3), n=st.integers(1, 40))
def test_reliable_p2p_is_exactly_once_in_order_under_faults(seed: int, drop: float,
                                                          dup: float, reorder: float,
                                                          n: int) -> None:
    net = Net(seed=seed)
    a, _b, s, r = p2p(net, SessionConfig(timeout=1.0, max_retries=30))
    net.faults = Faults(seed=seed, drop=drop, dup=dup, reorder=reorder)
    sent = [f"m{i}".encode() for i in range(n)]
    tickets = [send(a, s, p, net) for p in sent]
    net.settle(120)
    assert payloads(r) == sent
    assert all(t.resolved and t.error is None for t in tickets), [t.error for t in tickets]


@settings(max_examples=int(__import__("os").environ.get("SLIM_FUZZ_EXAMPLES", 30)), deadline=None)
@given(seed=st.integers(0, 10_000), drop=st.floats(0, 0.2), dup=st.floats(0, 0.2),
       reorder=st.floats(0, 0.2))
def test_reliable_group_is_exactly_once_in_order_per_sender_under_faults(
        seed: int, drop: float, dup: float, reorder: float) -> None:
    net = Net(seed=seed)
    mod, members, g, sessions = group(net, 3, SessionConfig.group(timeout=1.0, max_retries=30))
    net.faults = Faults(seed=seed, drop=drop, dup=dup, reorder=reorder)
    everyone = [(mod, g), *zip(members, sessions, strict=True)]
    sent: dict[int, list[bytes]] = {}
    for i, (app, session) in enumerate(everyone):
        sent[i] = [f"{i}:{k}".encode() for k in range(8)]
        for p in sent[i]:
            send(app, session, p, net)
    net.settle(120)
    for j, (_, session) in enumerate(everyone):
        got = payloads(session)
        for i in sent:
            if i != j:
                assert [p for p in got if p.startswith(f"{i}:".encode())] == sent[i]


def test_closing_while_an_operation_waits_on_a_silent_member() -> None:
    net = Net()
    mod, members, g, _sessions = group(net, 3)
    silent = net.conn_of(members[0])
    net.node.connection_lost(silent)  # m0 vanishes without a word
    del net.apps[silent], net.sinks[silent]
    removal = g.remove(members[1].name, net.now)
    invite = g.invite(Name("org", "ns", "late"), net.now)  # queued behind the removal
    mod.operate(g)
    net.pump()
    assert not removal.resolved  # waiting for m0's ack
    g._finish_close("app closed", net.now)  # as App.aclose does when giving up
    assert isinstance(removal.error, SessionClosedError)
    assert isinstance(invite.error, SessionClosedError)
    assert g.state is State.CLOSED
    net.settle(30)  # nothing left running
    assert g.get_timer() is None


class _DropUp:
    """Loses every frame one app sends while ``on``."""

    def __init__(self, conn: int) -> None:
        self.conn, self.on, self.lost = conn, True, 0

    def apply(self, lane: object, frames: list[bytes]) -> list[bytes]:
        if self.on and lane == ("up", self.conn):
            self.lost += len(frames)
            return []
        return frames

    def any_held(self) -> bool:
        return False


def test_a_later_ack_stands_in_for_lost_ones() -> None:
    net = Net()
    a, b, s, r = p2p(net, SessionConfig(timeout=1.0, max_retries=5))
    net.faults = drop = _DropUp(net.conn_of(b))  # type: ignore[assignment]
    first = [send(a, s, f"m{i}".encode(), net) for i in range(3)]
    net.pump()  # delivered; bob's acknowledgements are lost
    assert drop.lost > 0 and not any(t.resolved for t in first)
    drop.on = False
    last = send(a, s, b"m3", net)
    net.pump()  # no time passes: nothing is retransmitted
    assert payloads(r) == [b"m0", b"m1", b"m2", b"m3"]
    assert all(t.resolved and t.error is None for t in [*first, last])
    assert s._send is not None and s._send.retransmissions == 0


def test_a_message_given_up_on_is_never_acknowledged_as_received() -> None:
    from slim_agents._reliability import ReceiveStream

    stream: ReceiveStream[bytes] = ReceiveStream(timeout=1.0, max_retries=0)
    assert stream.receive(1, b"a", 0.0) == [b"a"]
    assert stream.receive(3, b"c", 0.0) == []
    assert stream.received_through == 1  # 2 is missing
    again, lost, released = stream.due(2.0)
    assert (again, lost, released) == ([], [2], [b"c"])
    assert stream.next == 4
    assert stream.received_through == 1  # 2 was lost, not received
    assert stream.receive(4, b"d", 2.0) == [b"d"]
    assert stream.received_through == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["receive", "give_up", "due"]), st.integers(1, 12)),
                max_size=30))
def test_taking_the_next_message_is_receive_where_it_applies(
        steps: list[tuple[str, int]]) -> None:
    import copy

    from slim_agents._reliability import ReceiveStream

    def state(x: ReceiveStream[int]) -> tuple[object, ...]:
        return (x.next, x.held, x.missing, x.to_ack, x.lost_ids, x.first_lost, x.duplicates)

    stream: ReceiveStream[int] = ReceiveStream(timeout=1.0, max_retries=1)
    now = 0.0
    for op, mid in steps:
        # Whatever the state: take_next either does exactly what receive does and
        # delivers the message alone, or does nothing.
        other = copy.deepcopy(stream)
        before = state(stream)
        if stream.take_next(mid):
            assert other.receive(mid, mid, now) == [mid]
            assert state(stream) == state(other)
        else:
            assert state(stream) == before
            stream = other
        if op == "receive":
            stream.receive(mid, mid, now)
        elif op == "give_up":
            stream.give_up([mid])
        else:
            now += 1.5
            stream.due(now)


def test_acks_through_an_id_count_each_member_once_and_bound_the_work() -> None:
    from slim_agents._reliability import SendStream

    a, b = Name("org", "ns", "a", 1), Name("org", "ns", "b", 2)
    stream: SendStream[str] = SendStream(timeout=1.0, max_retries=3)
    for _ in range(5):
        mid = stream.allocate()
        stream.track(mid, f"m{mid}", 10, [a, b], 0.0)
    assert stream.ack_through(a, 3, 0.0) == []  # b still owes them
    assert [p.mid for p in stream.ack_through(b, 2, 0.0)] == [1, 2]
    assert stream.ack_through(b, 2, 0.0) == []  # nothing new
    assert stream.ack_through(a, 2**32 - 1, 0.0) == []  # a hostile id: no huge walk
    assert [p.mid for p in stream.ack_through(b, 5, 0.0)] == [3, 4, 5]
    assert not stream.pending


def _stream_of_four(max_retries: int = 3):  # type: ignore[no-untyped-def]
    from slim_agents._reliability import SendStream

    a, b = Name("org", "ns", "a", 1), Name("org", "ns", "b", 2)
    stream: SendStream[str] = SendStream(timeout=1.0, max_retries=max_retries)
    for _ in range(4):
        mid = stream.allocate()
        stream.track(mid, f"m{mid}", 10, [a, b], 0.0)
    return stream, a, b


def test_a_recipient_still_acknowledging_earlier_messages_gets_no_copy() -> None:
    stream, a, b = _stream_of_four()
    stream.ack(a, [1, 2, 3, 4], 0.9)
    stream.ack_through(b, 1, 0.9)  # b is slow, not gone: 2-4 queue behind 1
    assert stream.due(1.0) == ([], [])
    assert stream.retransmissions == 0
    resend, expired = stream.due(2.0)  # b went quiet
    assert [(p.mid, names) for p, names in resend] == [(2, [b]), (3, [b]), (4, [b])]
    assert expired == [] and stream.retransmissions == 3


def test_a_recipient_that_acknowledged_a_later_message_gets_the_one_it_missed() -> None:
    stream, a, b = _stream_of_four()
    stream.ack(a, [1, 2, 3, 4], 0.9)
    stream.ack(b, [1, 3], 0.9)
    resend, _ = stream.due(1.0)
    assert [(p.mid, names) for p, names in resend] == [(2, [b])]


def test_retries_run_out_only_for_the_recipients_that_went_quiet() -> None:
    stream, a, b = _stream_of_four(max_retries=1)
    resend, _ = stream.due(1.0)
    assert [p.mid for p, names in resend] == [1, 2, 3, 4]
    assert all(set(names) == {a, b} for _, names in resend)
    stream.ack_through(b, 1, 1.5)
    resend, expired = stream.due(2.0)
    assert resend == []
    assert [(p.mid, p.failed, p.delivered) for p in expired] == [(1, {a: "timeout"}, (b,))]
    assert sorted(stream.pending) == [2, 3, 4]  # b is still working through them
    (done,) = stream.ack_through(b, 2, 2.5)
    assert (done.mid, done.failed, done.delivered) == (2, {a: "timeout"}, (b,))


def test_a_dropped_recipient_fails_and_a_stranger_acknowledges_nothing() -> None:
    stream, a, b = _stream_of_four()
    stranger = Name("org", "ns", "c", 3)
    assert stream.ack(stranger, [1, 2], 0.5) == []
    assert [p.mid for p in stream.drop_recipient(b, "left")] == []  # a still owes them
    assert [(p.mid, p.failed, p.delivered) for p in stream.ack(a, [1, 2], 0.5)] == [
        (1, {b: "left"}, (a,)), (2, {b: "left"}, (a,))]
    # b comes back: new messages wait for it again, old ones do not.
    mid = stream.allocate()
    stream.track(mid, "m5", 10, [a, b], 0.6)
    assert stream.ack(b, [3, 4], 0.7) == []
    assert [(p.mid, p.failed) for p in stream.ack(a, [3, 4], 0.7)] == [
        (3, {b: "left"}), (4, {b: "left"})]
    assert [(p.mid, p.delivered) for p in stream.ack(b, [mid], 0.8)] == []
    assert [(p.mid, p.delivered) for p in stream.ack(a, [mid], 0.8)] == [(5, (a, b))]


def test_abandoning_a_stream_fails_what_each_recipient_had_not_acknowledged() -> None:
    stream, a, b = _stream_of_four()
    stream.ack(a, [1], 0.5)
    done = stream.abandon("closed")
    assert [(p.mid, p.failed, p.delivered) for p in done] == [
        (1, {b: "closed"}, (a,)), (2, {a: "closed", b: "closed"}, ()),
        (3, {a: "closed", b: "closed"}, ()), (4, {a: "closed", b: "closed"}, ())]
    assert not stream.pending and stream.pending_bytes == 0


@dataclass
class _Trickle(FaultInjector):
    """Holds the data messages going down one lane; the test lets them out one by one."""

    lane: Any = None
    queue: list[bytes] = field(default_factory=list)

    def on_publish(self, lane: Any, frame: bytes) -> list[bytes]:
        if lane == self.lane and decode_frame(frame[4:]).get("k") == Kind.MSG:
            self.queue.append(frame)
            return []
        return [frame]


def test_a_member_slower_than_the_timeout_but_still_acknowledging_gets_no_copies() -> None:
    net = Net()
    mod, (_, slow), g, (fast_s, slow_s) = group(net, 2)
    trickle = net.faults = _Trickle(lane=("down", net.conn_of(slow)))
    sent = [f"m{i}".encode() for i in range(40)]
    tickets = [send(mod, g, p, net) for p in sent]
    net.pump()
    assert payloads(fast_s) == sent
    while trickle.queue:  # 0.1 s per message: the last one is 4 s behind, the timeout 1 s
        net.advance(0.1)
        frame = trickle.queue.pop(0)
        slow.receive(net._rewrite([frame], slow), net.now)
        net.pump()
    assert payloads(slow_s) == sent
    assert all(t.resolved and t.error is None for t in tickets)
    assert g._send is not None and g._send.retransmissions == 0


def test_acks_by_range_look_at_pending_ids_only_and_bound_the_work() -> None:
    stream, a, b = _stream_of_four()
    # A hostile range as wide as the id space walks the four pending ids, not 2**32.
    assert stream.ack_ranges(a, [[1, 2**32 - 1]], 0.0) == []
    assert [p.mid for p in stream.ack_ranges(b, [[2, 3], [9, 9]], 0.0)] == [2, 3]
    assert [p.mid for p in stream.ack_ranges(b, [[1, 1], [4, 4]], 0.0, limit=1)] == [1]
    assert sorted(stream.pending) == [4]  # past the limit: not looked at
    # A wide range counts as the pending ids it walks: many of them stop early too.
    assert stream.ack_ranges(b, [[5, 2**32 - 1]] * 3 + [[4, 4]], 0.0, limit=3) == []
    assert sorted(stream.pending) == [4]
    assert [p.mid for p in stream.ack_ranges(b, [[5, 2**32 - 1], [4, 4]], 0.0, limit=3)] == [4]
