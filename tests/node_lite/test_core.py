"""NodeCore driven directly: bytes and `now` in, frames written to fake sinks out."""

from __future__ import annotations

import itertools
import random
import time

import msgpack
import pytest

from node_lite import Limits, Name, NodeCore, SharedSecretProvider, SharedSecretVerifier
from node_lite import SlowConsumerPolicy as Policy
from node_lite._core import MALFORMED_WINDOW, PRE_AUTH_MAX_FRAME, ConnKind
from node_lite.wire import (
    Error,
    FrameDecoder,
    Hello,
    HelloAck,
    Message,
    Ping,
    Pong,
    Publish,
    RouteUpdate,
    Subscribe,
    SubscribeAck,
    Unsubscribe,
    decode_frame,
    decode_message,
    encode_frame,
    frame_prefix,
)
from tests.helpers import SECRET, identity

CHAN = Name("org", "ns", "chan")
OTHER_SECRET = "another-secret-that-is-also-long-enough-0123456789"


class FakeSink:
    """A driver outbox that records everything the core does with it."""

    def __init__(self, *, pending_bytes: int = 0, pending_frames: int = 0) -> None:
        self._pending_bytes = pending_bytes
        self._pending_frames = pending_frames
        self.data: list[bytes] = []
        self.closes: list[tuple[str | None, str]] = []

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_frames(self) -> int:
        return self._pending_frames

    def write(self, data: bytes | memoryview, frames: int = 1) -> None:
        self.data.append(bytes(data))

    @property
    def closed(self) -> tuple[str | None, str] | None:
        """The first close: (code, message)."""
        return self.closes[0] if self.closes else None

    def close(self, code: str | None, message: str) -> None:
        self.closes.append((code, message))

    def take(self) -> bytes:
        out = b"".join(self.data)
        self.data.clear()
        return out


def decode_all(sink: FakeSink, *, clear: bool = True) -> list[Message]:
    """Every message written to ``sink`` (and forget them unless ``clear`` is false)."""
    raw = b"".join(sink.data)
    decoder = FrameDecoder(64 << 20)
    frames = decoder.feed(raw)
    assert decoder.buffered == 0, "a partial frame was written"
    if clear:
        sink.data.clear()
    return [decode_message(decode_frame(f[4:])) for f in frames]


def errors(sink: FakeSink) -> list[Error]:
    msgs = decode_all(sink)
    assert all(isinstance(m, Error) for m in msgs), msgs
    return msgs  # type: ignore[return-value]


def new_core(node_id: str = "n1", **kwargs: object) -> NodeCore:
    kwargs.setdefault("verifier", SharedSecretVerifier(SECRET))
    kwargs.setdefault("rng", random.Random(0))
    return NodeCore(node_id, **kwargs)  # type: ignore[arg-type]


_conn_ids = itertools.count(1)


def connect_app(core: NodeCore, app: str, now: float, *, conn_id: int | None = None,
                sink: FakeSink | None = None) -> tuple[int, FakeSink, Name]:
    """An app connection whose hello was accepted; its sink is emptied."""
    provider, name = identity(app)
    conn_id = next(_conn_ids) if conn_id is None else conn_id
    sink = sink or FakeSink()
    core.connection_made(conn_id, sink, now)
    core.data_received(conn_id, encode_frame(Hello(token=provider.get_token(now=now),
                                                   name=name)), now)
    [ack] = decode_all(sink)
    assert isinstance(ack, HelloAck), ack
    assert sink.closed is None
    return conn_id, sink, name


def publish(src: Name, dst: Name, *, fanout: int = 1, mid: int = 1, sid: int = 0,
            ttl: int = 8, body: bytes = b"payload") -> bytes:
    return encode_frame(Publish(source=src, destination=dst, fanout=fanout, message_id=mid,
                                session_id=sid, ttl=ttl, payload=body))


def subscribe(core: NodeCore, conn: int, sink: FakeSink, name: Name, now: float,
              rid: int = 1) -> SubscribeAck:
    core.data_received(conn, encode_frame(Subscribe(name=name, request_id=rid)), now)
    [ack] = decode_all(sink)
    assert isinstance(ack, SubscribeAck), ack
    return ack


# -- hello ------------------------------------------------------------------------------


def test_hello_with_a_valid_token_is_acked_and_the_name_routable() -> None:
    now = time.time()
    core = new_core()
    provider, name = identity("alice")
    sink = FakeSink()
    core.connection_made(1, sink, now)
    assert core.connection_kind(1) is ConnKind.PENDING
    core.data_received(1, encode_frame(Hello(token=provider.get_token(now=now), name=name)), now)
    [ack] = decode_all(sink)
    assert ack == HelloAck(conn_id=1, node_id="n1", max_frame_size=core.limits.max_frame_size)
    assert sink.closed is None
    assert core.connection_kind(1) is ConnKind.APP
    assert core.table.match_one(name) == 1
    assert core.table.match_one(name.without_id()) == 1
    assert core.accepted == 1
    assert core.refused == 0
    stats = core.connection_statistics(1)
    assert stats.name == str(name)
    assert stats.subject == provider.subject
    assert stats.kind == "app"
    # The hello deadline is gone.
    assert core.get_timer() is None


def test_first_frame_other_than_hello_is_refused() -> None:
    now = time.time()
    core = new_core()
    sink = FakeSink()
    core.connection_made(1, sink, now)
    core.data_received(1, encode_frame(Ping(nonce=1)), now)
    [err] = errors(sink)
    assert err.code == "unauthenticated"
    assert sink.closed is not None
    assert sink.closed[0] == "unauthenticated"
    assert core.refused == 1
    # Nothing more is processed once closed.
    core.data_received(1, encode_frame(Subscribe(name=CHAN, request_id=1)), now)
    assert sink.data == []
    assert core.table.match_all(CHAN) == {}


def test_publish_before_hello_is_refused() -> None:
    now = time.time()
    core = new_core()
    _, name = identity("x")
    sink = FakeSink()
    core.connection_made(1, sink, now)
    core.data_received(1, publish(name, name), now)
    [err] = errors(sink)
    assert err.code == "unauthenticated"
    assert sink.closed is not None


def test_forged_hello_is_refused() -> None:
    now = time.time()
    core = new_core()
    provider, name = identity("mallory", secret=OTHER_SECRET)
    sink = FakeSink()
    core.connection_made(1, sink, now)
    core.data_received(1, encode_frame(Hello(token=provider.get_token(now=now), name=name)), now)
    [err] = errors(sink)
    assert err.code == "unauthenticated"
    assert sink.closed is not None
    assert sink.closed[0] == "unauthenticated"
    assert core.table.match_one(name) is None
    assert core.refused == 1
    assert core.accepted == 0


def test_refused_connection_is_counted_once_when_the_deadline_passes() -> None:
    now = time.time()
    core = new_core()
    provider, name = identity("mallory", secret=OTHER_SECRET)
    sink = FakeSink()
    core.connection_made(1, sink, now)
    core.data_received(1, encode_frame(Hello(token=provider.get_token(now=now), name=name)), now)
    assert core.refused == 1
    sink.data.clear()
    # The driver has not reported the connection lost yet when the timer fires.
    core.handle_timer(now + core.limits.hello_timeout + 1)
    assert core.refused == 1
    assert sink.data == []
    assert len(sink.closes) == 1


def test_expired_token_is_refused() -> None:
    now = time.time()
    core = new_core()
    provider, name = identity("late")
    sink = FakeSink()
    core.connection_made(1, sink, now)
    token = provider.get_token(now=now - 7200)
    core.data_received(1, encode_frame(Hello(token=token, name=name)), now)
    [err] = errors(sink)
    assert err.code == "unauthenticated"
    assert sink.closed is not None


def test_hello_with_a_name_not_matching_the_token_is_forbidden() -> None:
    now = time.time()
    core = new_core()
    provider, name = identity("bob")
    wrong = name.with_id((name.id or 0) ^ 1)
    sink = FakeSink()
    core.connection_made(1, sink, now)
    core.data_received(1, encode_frame(Hello(token=provider.get_token(now=now), name=wrong)),
                       now)
    [err] = errors(sink)
    assert err.code == "forbidden_source"
    assert sink.closed is not None
    assert sink.closed[0] == "forbidden_source"
    assert core.table.match_one(wrong) is None


def test_hello_bound_by_a_name_claim() -> None:
    now = time.time()
    core = new_core()
    bound = Name("org", "ns", "svc", 42)
    provider = SharedSecretProvider("org/ns/svc", SECRET, claims={"name": str(bound)})
    ok = FakeSink()
    core.connection_made(1, ok, now)
    core.data_received(1, encode_frame(Hello(token=provider.get_token(now=now), name=bound)),
                       now)
    assert isinstance(decode_all(ok)[0], HelloAck)
    bad = FakeSink()
    core.connection_made(2, bad, now)
    core.data_received(2, encode_frame(Hello(token=provider.get_token(now=now),
                                             name=bound.with_id(43))), now)
    [err] = errors(bad)
    assert err.code == "forbidden_source"


def test_hello_timeout_closes_a_pending_connection() -> None:
    now = time.time()
    core = new_core()
    sink = FakeSink()
    core.connection_made(1, sink, now)
    deadline = now + core.limits.hello_timeout
    assert core.get_timer() == deadline
    core.handle_timer(deadline - 0.5)
    assert sink.closed is None
    assert sink.data == []
    core.handle_timer(now + core.limits.hello_timeout + 1)
    [err] = errors(sink)
    assert err.code == "unauthenticated"
    assert sink.closed is not None
    assert sink.closed[0] == "unauthenticated"
    assert core.refused == 1
    core.connection_lost(1)
    assert core.get_timer() is None


def test_get_timer_is_the_earliest_hello_deadline() -> None:
    now = time.time()
    core = new_core(limits=Limits(hello_timeout=2.0))
    assert core.get_timer() is None
    core.connection_made(1, FakeSink(), now + 1)
    core.connection_made(2, FakeSink(), now)
    assert core.get_timer() == now + 2.0
    core.connection_lost(2)
    assert core.get_timer() == now + 3.0


def test_development_mode_accepts_any_name() -> None:
    now = time.time()
    core = new_core(verifier=None)
    provider, _ = identity("dev")
    for conn, (token, name) in enumerate([
        ("anything", Name("a", "b", "c", 1)),
        (provider.get_token(now=now), Name("x", "y", "z", 7)),
        (SharedSecretProvider("o/n/a", OTHER_SECRET).get_token(now=now), Name("o", "n", "a", 3)),
    ], start=1):
        sink = FakeSink()
        core.connection_made(conn, sink, now)
        core.data_received(conn, encode_frame(Hello(token=token, name=name)), now)
        [ack] = decode_all(sink)
        assert isinstance(ack, HelloAck)
        assert core.table.match_one(name) == conn
    assert core.accepted == 3


# -- publish ----------------------------------------------------------------------------


def test_unicast_reaches_exactly_the_named_app_as_the_bytes_sent() -> None:
    now = time.time()
    core = new_core()
    a, sa, na = connect_app(core, "alice", now)
    _, sb, nb = connect_app(core, "bob", now)
    _, sc, _ = connect_app(core, "carol", now)
    frame = publish(na, nb, mid=5, body=b"hi bob")
    assert core.data_received(a, frame, now) == []
    assert sb.data == [frame]
    assert sa.data == []
    assert sc.data == []


def test_anycast_reaches_one_instance_of_the_service() -> None:
    now = time.time()
    core = new_core()
    a, sa, na = connect_app(core, "client", now)
    workers = [connect_app(core, "worker", now) for _ in range(3)]
    service = workers[0][2].without_id()
    assert all(w[2].without_id() == service for w in workers)
    frames = [publish(na, service, mid=i) for i in range(60)]
    for f in frames:
        core.data_received(a, f, now)
    got = [s.data for _, s, _ in workers]
    assert sorted(f for d in got for f in d) == sorted(frames)
    assert all(d for d in got), "each instance gets some of the frames"
    assert sa.data == []


def test_channel_reaches_every_subscriber_but_not_the_sender() -> None:
    now = time.time()
    core = new_core()
    apps = [connect_app(core, f"member{i}", now) for i in range(4)]
    for conn, sink, _ in apps:
        assert subscribe(core, conn, sink, CHAN, now).ok
    _, outsider_sink, _ = connect_app(core, "outsider", now)
    sender, sender_sink, sender_name = apps[0]
    frame = publish(sender_name, CHAN, fanout=2, mid=9)
    core.data_received(sender, frame, now)
    for _, sink, _ in apps[1:]:
        assert sink.data == [frame]
    assert sender_sink.data == []  # no echo
    assert outsider_sink.data == []


def test_channel_without_other_subscribers_is_no_route() -> None:
    now = time.time()
    core = new_core()
    conn, sink, name = connect_app(core, "lonely", now)
    subscribe(core, conn, sink, CHAN, now)
    core.data_received(conn, publish(name, CHAN, fanout=2, mid=3), now)
    [err] = errors(sink)
    assert err.code == "no_route"


def test_publish_with_a_foreign_source_is_forbidden() -> None:
    now = time.time()
    core = new_core()
    a, sa, _ = connect_app(core, "alice", now)
    _, sb, nb = connect_app(core, "bob", now)
    _, sc, nc = connect_app(core, "carol", now)
    core.data_received(a, publish(nc, nb, mid=77, sid=4), now)
    [err] = errors(sa)
    assert err.code == "forbidden_source"
    assert err.ref == 77
    assert err.session_id == 4
    assert sb.data == []
    assert sc.data == []
    assert sa.closed is None
    assert core.drops["forbidden_source"] == 1


def test_no_route_reports_the_destination_message_and_session() -> None:
    now = time.time()
    core = new_core()
    a, sa, na = connect_app(core, "alice", now)
    dst = Name("org", "ns", "nobody", 12345)
    core.data_received(a, publish(na, dst, mid=4242, sid=31), now)
    [err] = errors(sa)
    assert err.code == "no_route"
    assert err.name == dst
    assert err.ref == 4242
    assert err.session_id == 31
    assert sa.closed is None
    assert core.drops["no_route"] == 1
    # Anycast and channel destinations too.
    core.data_received(a, publish(na, dst.without_id(), mid=1), now)
    core.data_received(a, publish(na, dst.without_id(), fanout=5, mid=2), now)
    assert [(e.code, e.name, e.ref) for e in errors(sa)] == [
        ("no_route", dst.without_id(), 1), ("no_route", dst.without_id(), 2)]


def test_unicast_to_self_is_no_route() -> None:
    now = time.time()
    core = new_core()
    a, sa, na = connect_app(core, "narcissus", now)
    core.data_received(a, publish(na, na), now)
    [err] = errors(sa)
    assert err.code == "no_route"


def test_frames_split_and_coalesced_arbitrarily_are_all_delivered() -> None:
    now = time.time()
    core = new_core()
    a, _, na = connect_app(core, "alice", now)
    _, sb, nb = connect_app(core, "bob", now)
    frames = [publish(na, nb, mid=i, body=bytes([i]) * i) for i in range(1, 30)]
    stream = b"".join(frames)
    rng = random.Random(5)
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 40)
        core.data_received(a, stream[pos:pos + step], now)
        pos += step
    assert sb.data == frames


# -- malformed input --------------------------------------------------------------------

MALFORMED = [
    frame_prefix(3) + b"\xc1\xc1\xc1",  # not msgpack
    encode_frame({"v": 1}),  # no type tag
    encode_frame({"v": 1, "t": "sub", "name": "org/ns/x"}),  # wrong field type
]


def test_malformed_frames_get_errors_and_the_third_closes() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "sloppy", now)
    core.data_received(conn, MALFORMED[0], now)
    [err] = errors(sink)
    assert err.code == "malformed"
    assert sink.closed is None
    core.data_received(conn, MALFORMED[1], now + 1)
    [err] = errors(sink)
    assert err.code == "malformed"
    assert sink.closed is None
    core.data_received(conn, MALFORMED[2], now + 2)
    [err] = errors(sink)
    assert err.code == "malformed"
    assert sink.closed is not None
    assert sink.closed[0] == "malformed"
    assert core.drops["malformed"] == 3


def test_a_deeply_nested_frame_with_a_timestamp_is_malformed_not_a_crash() -> None:
    # Found by fuzzing: nested some 500 deep, the walk for Timestamp objects raised
    # RecursionError out of the node's input path.
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "deep", now)
    body = b"\x83\xa1v\x01\xa1t\xa3pub\xa1x" + b"\x91" * 900 + b"\xd6\xff" + bytes(4)
    core.data_received(conn, frame_prefix(len(body)) + body + encode_frame(Ping(nonce=4)), now)
    err, pong = decode_all(sink)
    assert isinstance(err, Error) and err.code == "malformed" and "timestamp" in err.message
    assert pong == Pong(nonce=4)  # and the frames after it are read
    assert sink.closed is None and core.drops["malformed"] == 1


def test_malformed_frames_spread_over_the_window_do_not_close() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "occasional", now)
    for i in range(6):
        core.data_received(conn, MALFORMED[i % 3], now + i * (MALFORMED_WINDOW / 2 + 0.1))
    assert [e.code for e in errors(sink)] == ["malformed"] * 6
    assert sink.closed is None
    core.data_received(conn, encode_frame(Ping(nonce=3)), now + 100)
    assert decode_all(sink) == [Pong(nonce=3)]


def test_three_malformed_frames_in_one_chunk_close() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "burst", now)
    core.data_received(conn, b"".join(MALFORMED) + encode_frame(Ping(nonce=1)), now)
    assert [e.code for e in errors(sink)] == ["malformed"] * 3
    assert sink.closed is not None


def test_bad_publish_fields_count_as_malformed() -> None:
    now = time.time()
    core = new_core()
    conn, sink, name = connect_app(core, "typo", now)
    body = Publish(source=name, destination=name).to_dict()
    body["fan"] = 0
    core.data_received(conn, encode_frame(body), now)
    [err] = errors(sink)
    assert err.code == "malformed"


def test_an_unhashable_name_component_is_malformed_not_a_crash() -> None:
    # Found by fuzzing: once a name was known, check_publish's short path hashed
    # the components and raised TypeError out of the node's input path.
    now = time.time()
    core = new_core()
    conn, sink, name = connect_app(core, "unhashable", now)
    core.data_received(conn, encode_frame(Publish(source=name, destination=name)), now)
    decode_all(sink)  # the first frame makes the names known
    body = Publish(source=name, destination=name).to_dict()
    body["dst"] = ["org", ["ns"], "x", 1]
    core.data_received(conn, encode_frame(body) + encode_frame(Ping(nonce=5)), now)
    err, pong = decode_all(sink)
    assert isinstance(err, Error) and err.code == "malformed"
    assert pong == Pong(nonce=5) and sink.closed is None


def test_unsupported_version_is_reported() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "future", now)
    core.data_received(conn, encode_frame({"v": 99, "t": "ping"}), now)
    [err] = errors(sink)
    assert err.code == "unsupported_version"
    assert sink.closed is None


def test_unknown_type_is_reported_and_the_connection_stays_open() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "newer", now)
    for i in range(5):
        core.data_received(conn, encode_frame({"v": 1, "t": "teleport", "n": i}), now)
    errs = errors(sink)
    assert [e.code for e in errs] == ["unknown_type"] * 5
    assert sink.closed is None
    core.data_received(conn, encode_frame(Ping(nonce=8)), now)
    assert decode_all(sink) == [Pong(nonce=8)]


def test_frame_over_max_frame_size_closes() -> None:
    now = time.time()
    limits = Limits(max_frame_size=1024)
    core = new_core(limits=limits)
    conn, sink, name = connect_app(core, "big", now)
    ok = publish(name, name, body=b"x" * 900)
    assert len(ok) <= 1024 + 4
    core.data_received(conn, ok, now)  # within the limit: a no_route, not a close
    assert [e.code for e in errors(sink)] == ["no_route"]
    core.data_received(conn, frame_prefix(1025), now)
    [err] = errors(sink)
    assert err.code == "frame_too_large"
    assert sink.closed is not None
    assert sink.closed[0] == "frame_too_large"


def test_large_frame_before_hello_is_refused() -> None:
    now = time.time()
    core = new_core()
    sink = FakeSink()
    core.connection_made(1, sink, now)
    core.data_received(1, frame_prefix(PRE_AUTH_MAX_FRAME + 1), now)
    [err] = errors(sink)
    assert err.code == "frame_too_large"
    assert sink.closed is not None


def test_hello_after_the_handshake_is_malformed() -> None:
    now = time.time()
    core = new_core()
    provider, name = identity("twice")
    conn, sink, _ = connect_app(core, "twice", now)
    core.data_received(conn, encode_frame(Hello(token=provider.get_token(now=now), name=name)),
                       now)
    [err] = errors(sink)
    assert err.code == "malformed"
    assert sink.closed is None


def test_route_updates_from_an_app_are_malformed() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "sneaky", now)
    core.data_received(conn, encode_frame(RouteUpdate(full=True)), now)
    [err] = errors(sink)
    assert err.code == "malformed"
    assert [kind for _, kind, _ in core.table.entries()] == ["local"]


# -- subscriptions and control ----------------------------------------------------------


def test_subscribe_acks_with_the_request_id() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "sub", now)
    ack = subscribe(core, conn, sink, CHAN, now, rid=1234)
    assert ack == SubscribeAck(request_id=1234, ok=True)
    assert core.table.has_local(CHAN, conn)
    # request_id 0 asks for no ack.
    core.data_received(conn, encode_frame(Subscribe(name=Name("o", "n", "quiet"))), now)
    assert sink.data == []
    assert core.table.has_local(Name("o", "n", "quiet"), conn)
    assert core.connection_statistics(conn).subscriptions == 3  # its own name, and two


def test_max_subscriptions_is_enforced() -> None:
    now = time.time()
    core = new_core(limits=Limits(max_subscriptions=3))
    conn, sink, _ = connect_app(core, "greedy", now)
    acks = [subscribe(core, conn, sink, Name("o", "n", f"c{i}"), now, rid=i + 1)
            for i in range(4)]
    refused = [a for a in acks if not a.ok]
    assert refused
    assert all(a.code == "limit_exceeded" for a in refused)
    assert core.connection_statistics(conn).subscriptions == 3
    # The refused names are not routed; the accepted ones are.
    for i, ack in enumerate(acks):
        assert core.table.has_local(Name("o", "n", f"c{i}"), conn) == ack.ok
    # An unsubscribe frees a slot.
    first = next(i for i, a in enumerate(acks) if a.ok)
    core.data_received(conn, encode_frame(Unsubscribe(name=Name("o", "n", f"c{first}"),
                                                      request_id=50)), now)
    assert decode_all(sink) == [SubscribeAck(request_id=50)]
    assert subscribe(core, conn, sink, Name("o", "n", "again"), now, rid=51).ok


def test_unsubscribe_of_an_unknown_name_is_acked_not_ok() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "unsub", now)
    core.data_received(conn, encode_frame(Unsubscribe(name=CHAN, request_id=9)), now)
    [ack] = decode_all(sink)
    assert isinstance(ack, SubscribeAck)
    assert ack.request_id == 9
    assert ack.ok is False
    assert ack.code == "not_subscribed"
    subscribe(core, conn, sink, CHAN, now)
    core.data_received(conn, encode_frame(Unsubscribe(name=CHAN, request_id=10)), now)
    assert decode_all(sink) == [SubscribeAck(request_id=10, ok=True)]
    assert not core.table.has_local(CHAN, conn)


def test_ping_gets_pong_with_the_same_nonce() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "pinger", now)
    core.data_received(conn, encode_frame(Ping(nonce=2**40 + 7)), now)
    assert decode_all(sink) == [Pong(nonce=2**40 + 7)]


def test_connection_lost_withdraws_the_app_routes() -> None:
    now = time.time()
    core = new_core()
    conn, sink, _ = connect_app(core, "leaver", now)
    subscribe(core, conn, sink, CHAN, now)
    core.connection_lost(conn)
    assert core.table.entries() == []
    assert core.connection_kind(conn) is None
    core.connection_lost(conn)  # idempotent
    core.data_received(conn, encode_frame(Ping()), now)  # ignored
    assert sink.data == []


# -- slow consumers ---------------------------------------------------------------------


def _slow_consumer_setup(policy: Policy, *, frames: bool = False
                         ) -> tuple[NodeCore, int, FakeSink, Name, int, FakeSink, Name, float]:
    now = time.time()
    limits = Limits(slow_consumer=policy)
    core = new_core(limits=limits)
    a, sa, na = connect_app(core, "producer", now)
    slow = (FakeSink(pending_frames=limits.max_pending_frames) if frames
            else FakeSink(pending_bytes=limits.max_pending_bytes))
    b, sb, nb = connect_app(core, "consumer", now, sink=slow)
    return core, a, sa, na, b, sb, nb, now


@pytest.mark.parametrize("frames", [False, True])
def test_slow_consumer_drop(frames: bool) -> None:
    core, a, sa, na, b, sb, nb, now = _slow_consumer_setup(Policy.DROP, frames=frames)
    assert core.data_received(a, publish(na, nb), now) == []
    assert core.data_received(a, publish(na, nb, mid=2), now) == []
    assert sb.data == []
    assert sb.closed is None
    assert sa.data == []  # the producer is not told
    assert core.drops["queue_full"] == 2
    assert core.connection_statistics(b).drops == {"queue_full": 2}
    assert core.connection_statistics(b).frames_out == 1  # the hello_ack only


def test_slow_consumer_disconnect() -> None:
    core, a, sa, na, _, sb, nb, now = _slow_consumer_setup(Policy.DISCONNECT)
    frame = publish(na, nb)
    assert core.data_received(a, frame, now) == []
    assert sb.closed is not None
    assert sb.closed[0] == "slow_consumer"
    assert frame not in sb.data
    assert [m.code for m in decode_all(sb) if isinstance(m, Error)] == ["slow_consumer"]
    assert sa.data == []
    assert sa.closed is None


def test_slow_consumer_wait_writes_and_reports_congestion() -> None:
    core, a, _, na, _, sb, nb, now = _slow_consumer_setup(Policy.WAIT)
    frame = publish(na, nb)
    congested = core.data_received(a, frame + frame, now)
    assert congested == [sb]  # reported once, however many frames
    assert sb.data == [frame, frame]
    assert sb.closed is None
    assert core.drops["queue_full"] == 0
    # A sink with room is not reported.
    _, sc, nc = connect_app(core, "fast", now)
    assert core.data_received(a, publish(na, nc), now) == []
    assert len(sc.data) == 1


# -- statistics -------------------------------------------------------------------------


def test_statistics_count_a_scripted_exchange() -> None:
    now = time.time()
    core = new_core()
    pa, na = identity("alice")
    pb, nb = identity("bob")
    sa, sb = FakeSink(), FakeSink()
    core.connection_made(1, sa, now)
    core.connection_made(2, sb, now)
    hello_a = encode_frame(Hello(token=pa.get_token(now=now), name=na))
    hello_b = encode_frame(Hello(token=pb.get_token(now=now), name=nb))
    sub = encode_frame(Subscribe(name=CHAN, request_id=1))
    ping = encode_frame(Ping(nonce=5))
    # bob: hello, then subscribe and ping in one chunk split in the middle of a frame
    core.data_received(2, hello_b, now)
    rest = sub + ping
    core.data_received(2, rest[:5], now)
    core.data_received(2, rest[5:], now)
    # alice: hello and two publishes in one chunk
    pub1 = publish(na, CHAN, fanout=2, mid=1)
    pub2 = publish(na, nb, mid=2)
    core.data_received(1, hello_a + pub1 + pub2, now)
    a = core.connection_statistics(1)
    b = core.connection_statistics(2)
    ack_a = encode_frame(HelloAck(conn_id=1, node_id="n1",
                                  max_frame_size=core.limits.max_frame_size))
    ack_b = encode_frame(HelloAck(conn_id=2, node_id="n1",
                                  max_frame_size=core.limits.max_frame_size))
    sub_ack = encode_frame(SubscribeAck(request_id=1))
    pong = encode_frame(Pong(nonce=5))
    assert (a.frames_in, a.bytes_in) == (3, len(hello_a) + len(pub1) + len(pub2))
    assert (a.frames_out, a.bytes_out) == (1, len(ack_a))
    assert (b.frames_in, b.bytes_in) == (3, len(hello_b) + len(sub) + len(ping))
    assert (b.frames_out, b.bytes_out) == (
        5, len(ack_b) + len(sub_ack) + len(pong) + len(pub1) + len(pub2))
    assert sb.data == [ack_b, sub_ack, pong, pub1, pub2]
    assert b.subscriptions == 2
    assert b.pending_bytes == 0
    assert b.drops == {}
    core.connection_lost(1)
    core.connection_lost(2)
    assert core.closed_totals["frames_in"] == 6
    assert core.closed_totals["frames_out"] == 6
    assert core.closed_totals["bytes_in"] == a.bytes_in + b.bytes_in
    assert core.closed_totals["bytes_out"] == a.bytes_out + b.bytes_out
    assert list(core.all_statistics()) == []


# -- links between two cores ------------------------------------------------------------


def pump(*pairs: tuple[FakeSink, NodeCore, int], now: float, limit: int = 100) -> int:
    """Carry bytes written to each sink into ``core.data_received(conn)`` until quiet."""
    rounds = 0
    while any(sink.data for sink, _, _ in pairs):
        rounds += 1
        assert rounds < limit, "the exchange does not settle"
        for sink, core, conn in pairs:
            if sink.data and sink.closed is None:
                core.data_received(conn, sink.take(), now)
            else:
                sink.data.clear()
    return rounds


class Linked:
    """Two cores joined by one link: n1 dials (conn 100), n2 accepts (conn 200)."""

    def __init__(self, now: float, **limits: object) -> None:
        lim = Limits(**limits)  # type: ignore[arg-type]
        self.c1 = new_core("n1", limits=lim, peer_token=SharedSecretProvider("node/n1", SECRET))
        self.c2 = new_core("n2", limits=lim, peer_token=SharedSecretProvider("node/n2", SECRET))
        self.s1, self.s2 = FakeSink(), FakeSink()  # n1's outbox to n2, n2's outbox to n1
        self.c1.connection_made(100, self.s1, now, dial=True)
        self.c2.connection_made(200, self.s2, now)
        self.now = now

    def pump(self, now: float | None = None) -> int:
        return pump((self.s1, self.c2, 200), (self.s2, self.c1, 100),
                    now=self.now if now is None else now)


def test_two_cores_complete_the_peer_hello() -> None:
    now = time.time()
    net = Linked(now)
    [hello] = decode_all(net.s1, clear=False)
    assert isinstance(hello, Hello)
    assert hello.role == "peer"
    assert hello.node_id == "n1"
    assert net.c1.connection_kind(100) is ConnKind.DIALING
    net.pump()
    assert net.c1.connection_kind(100) is ConnKind.PEER
    assert net.c2.connection_kind(200) is ConnKind.PEER
    assert net.c1.peer_of(100) == "n2"
    assert net.c2.peer_of(200) == "n1"
    assert net.s1.closed is None
    assert net.s2.closed is None
    assert net.c2.accepted == 1
    assert net.c2.connection_statistics(200).subject == net.c1.peer_token.subject  # type: ignore[union-attr]


def test_peer_hello_with_a_bad_token_is_refused_and_the_dialer_gives_up() -> None:
    now = time.time()
    c1 = new_core("n1", peer_token=SharedSecretProvider("node/n1", OTHER_SECRET))
    c2 = new_core("n2")
    s1, s2 = FakeSink(), FakeSink()
    c1.connection_made(100, s1, now, dial=True)
    c2.connection_made(200, s2, now)
    c2.data_received(200, s1.take(), now)
    assert s2.closed is not None
    assert s2.closed[0] == "unauthenticated"
    c1.data_received(100, s2.take(), now)
    assert s1.closed == (None, "refused by peer")
    # The refused link is done with: the hello deadline must not close it again.
    c1.handle_timer(now + c1.limits.hello_timeout + 1)
    assert s1.closes == [(None, "refused by peer")]
    assert s1.data == []


def test_a_node_cannot_link_to_itself() -> None:
    now = time.time()
    c1 = new_core("n1", peer_token=SharedSecretProvider("node/n1", SECRET))
    c1b = new_core("n1")
    s1, s2 = FakeSink(), FakeSink()
    c1.connection_made(100, s1, now, dial=True)
    c1b.connection_made(200, s2, now)
    c1b.data_received(200, s1.take(), now)
    assert s2.closed is not None
    assert s2.closed[0] == "unauthenticated"
    assert c1b.connection_ids(ConnKind.PEER) == []
    assert c1b.table.entries() == []
    assert (c1b.accepted, c1b.refused) == (0, 1)


def test_subscription_propagates_and_unicast_crosses_the_link() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    a, sa, na = connect_app(net.c1, "alice", now)
    _, sb, nb = connect_app(net.c2, "bob", now)
    net.pump()
    assert net.c1.table.match_one(nb) == 100
    assert net.c2.table.match_one(na) == 200
    net.c1.data_received(a, publish(na, nb, mid=11, ttl=8, body=b"over the link"), now)
    net.pump()
    [msg] = decode_all(sb)
    assert isinstance(msg, Publish)
    assert msg.source == na
    assert msg.destination == nb
    assert msg.message_id == 11
    assert msg.payload == b"over the link"
    assert msg.ttl == 7  # one link crossed
    assert sa.data == []


def test_channel_crosses_the_link_with_origins() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    a, sa, na = connect_app(net.c1, "alice", now)
    a2, sa2, _ = connect_app(net.c1, "alice2", now)
    b, sb, nb = connect_app(net.c2, "bob", now)
    subscribe(net.c1, a, sa, CHAN, now)
    subscribe(net.c1, a2, sa2, CHAN, now)
    subscribe(net.c2, b, sb, CHAN, now)
    net.pump()
    frame = publish(na, CHAN, fanout=2, mid=21, body=b"to all")
    net.c1.data_received(a, frame, now)
    net.pump()
    assert sa.data == []
    assert sa2.take() == frame  # local copy: the exact bytes
    [msg] = decode_all(sb)
    assert isinstance(msg, Publish)
    assert msg.payload == b"to all"
    assert msg.origins == ("n2",)
    # From the other side: one copy each, none back to bob.
    frame = publish(nb, CHAN, fanout=2, mid=22)
    net.c2.data_received(b, frame, now)
    net.pump()
    assert len(decode_all(sa)) == 1
    assert len(decode_all(sa2)) == 1
    assert sb.data == []


def test_unsubscribe_withdraws_across_the_link() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    a, sa, na = connect_app(net.c1, "alice", now)
    b, sb, _ = connect_app(net.c2, "bob", now)
    subscribe(net.c2, b, sb, CHAN, now)
    net.pump()
    assert net.c1.table.match_all(CHAN) == {100: ["n2"]}
    net.c2.data_received(b, encode_frame(Unsubscribe(name=CHAN)), now)
    net.pump()
    assert net.c1.table.match_all(CHAN) == {}
    net.c1.data_received(a, publish(na, CHAN, fanout=2, mid=5), now)
    [err] = errors(sa)
    assert err.code == "no_route"


def test_link_loss_withdraws_routes_learned_over_it() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    _, _, nb = connect_app(net.c2, "bob", now)
    net.pump()
    assert net.c1.table.match_one(nb) == 100
    net.c1.connection_lost(100)
    net.c2.connection_lost(200)
    assert net.c1.table.entries() == []
    assert [e[1] for e in net.c2.table.entries()] == ["local"]


def test_static_route_over_a_link_delivers_channel_frames() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    a, sa, na = connect_app(net.c1, "alice", now)
    b, sb, _ = connect_app(net.c2, "bob", now)
    subscribe(net.c2, b, sb, CHAN, now)
    net.pump()
    net.c1.set_route(CHAN, 100)
    net.c1.data_received(a, publish(na, CHAN, fanout=2, mid=6, body=b"static"), now)
    net.pump()
    assert sa.data == []
    msgs = decode_all(sb)
    assert [m.payload for m in msgs if isinstance(m, Publish)] == [b"static"]


def test_ttl_runs_out_over_a_chain_of_links() -> None:
    now = time.time()
    # n1 -> n2 -> n3: n2 relays between two links.
    lim = Limits()
    c1 = new_core("n1", limits=lim, peer_token=SharedSecretProvider("node/n1", SECRET))
    c2 = new_core("n2", limits=lim, peer_token=SharedSecretProvider("node/n2", SECRET))
    c3 = new_core("n3", limits=lim, peer_token=SharedSecretProvider("node/n3", SECRET))
    s12, s21, s23, s32 = FakeSink(), FakeSink(), FakeSink(), FakeSink()
    c1.connection_made(1, s12, now, dial=True)
    c2.connection_made(1, s21, now)
    c2.connection_made(2, s23, now, dial=True)
    c3.connection_made(1, s32, now)
    pairs = ((s12, c2, 1), (s21, c1, 1), (s23, c3, 1), (s32, c2, 2))
    pump(*pairs, now=now)
    a, sa, na = connect_app(c1, "alice", now, conn_id=10)
    _, sc, nc = connect_app(c3, "carol", now, conn_id=10)
    pump(*pairs, now=now)
    assert c1.table.match_one(nc) == 1
    c1.data_received(a, publish(na, nc, ttl=8, mid=1), now)
    pump(*pairs, now=now)
    [msg] = decode_all(sc)
    assert isinstance(msg, Publish)
    assert msg.ttl < 8
    assert msg.message_id == 1
    # A frame whose ttl runs out on the way is dropped, silently for the sender.
    c1.data_received(a, publish(na, nc, ttl=1, mid=2), now)
    pump(*pairs, now=now)
    assert sc.data == []
    assert c1.drops["ttl_expired"] + c2.drops["ttl_expired"] == 1
    assert sa.data == []


# -- keepalive --------------------------------------------------------------------------


def test_link_keepalive_pings_then_times_out() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    k = net.c1.limits.keepalive
    assert net.c1.get_timer() == now + k
    net.c1.handle_timer(now + k / 2)
    assert net.s1.data == []
    t = now
    pings = 0
    while net.s1.closed is None:
        timer = net.c1.get_timer()
        assert timer is not None
        assert timer <= now + 4 * k
        t = timer
        net.c1.handle_timer(t)
        for m in decode_all(net.s1):
            if isinstance(m, Ping):
                pings += 1
            else:
                assert isinstance(m, Error)
                assert m.code == "link_timeout"
    assert pings == 3
    assert t - now > 3 * k
    assert net.s1.closed[0] == "link_timeout"
    assert net.c1.drops["link_timeout"] == 1


def test_link_keepalive_answered_keeps_the_link() -> None:
    now = time.time()
    net = Linked(now)
    net.pump()
    k = net.c1.limits.keepalive
    for i in range(1, 20):
        t = now + i * k
        net.c1.handle_timer(t)
        net.c2.handle_timer(t)
        net.pump(t)  # pings are answered with pongs, which count as traffic
    assert net.s1.closed is None
    assert net.s2.closed is None
    assert net.c1.connection_kind(100) is ConnKind.PEER


def test_app_connections_get_no_keepalive() -> None:
    now = time.time()
    core = new_core()
    connect_app(core, "quiet", now)
    assert core.get_timer() is None
    core.handle_timer(now + 3600)
    assert core.drops == {}


def test_publish_bytes_are_not_reencoded_for_local_delivery() -> None:
    now = time.time()
    core = new_core()
    a, _, na = connect_app(core, "alice", now)
    _, sb, nb = connect_app(core, "bob", now)
    # A non-canonical but valid encoding (msgpack map with extra unknown key).
    d = Publish(source=na, destination=nb, message_id=3).to_dict()
    d["x-extension"] = [1, 2, 3]
    body = msgpack.packb(d, use_bin_type=True)
    frame = frame_prefix(len(body)) + body
    core.data_received(a, frame, now)
    assert sb.data == [frame]
