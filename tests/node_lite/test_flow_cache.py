"""The node's flow cache must never change what is delivered."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_lite import Name, NodeCore
from node_lite.wire import (
    FrameDecoder,
    Hello,
    Publish,
    Subscribe,
    Unsubscribe,
    decode_frame,
    encode_frame,
)

NOW = time.time()


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: tuple[str | None, str] | None = None
        self.frames_told = 0  # frames the core said it wrote

    @property
    def pending_bytes(self) -> int:
        return 0

    @property
    def pending_frames(self) -> int:
        return 0

    def write(self, data: bytes | memoryview, frames: int = 1) -> None:
        self.data += bytes(data)
        self.frames_told += frames

    def close(self, code: str | None, message: str) -> None:
        self.closed = (code, message)

    def frames(self) -> list[bytes]:
        return [bytes(f) for f in FrameDecoder().feed(bytes(self.data))]


APPS = [Name("o", "n", f"a{i}", i + 1) for i in range(4)]
CHAN = Name("o", "n", "chan")


def make_core(flow_cache: bool) -> tuple[NodeCore, list[Sink]]:
    core = NodeCore("n", flow_cache=flow_cache)
    sinks = [Sink() for _ in APPS]
    for i, (name, sink) in enumerate(zip(APPS, sinks, strict=True)):
        core.connection_made(i + 1, sink, NOW)
        core.data_received(i + 1, encode_frame(Hello(token="t", name=name)), NOW)
    return core, sinks


# An action: (sender index, kind, argument)
actions = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from(["uni", "chan", "any", "sub", "unsub", "garbage"]),
        st.integers(0, 3),
    ),
    max_size=60,
)


def frame_for(sender: int, kind: str, arg: int, seq: int) -> bytes:
    src = APPS[sender]
    if kind == "uni":
        return encode_frame(Publish(source=src, destination=APPS[arg], message_id=seq,
                                    payload=b"u" * (seq % 3) * 40))
    if kind == "chan":
        return encode_frame(Publish(source=src, destination=CHAN, fanout=2, message_id=seq,
                                    payload=b"c" * (seq % 2) * 300))
    if kind == "any":
        return encode_frame(Publish(source=src, destination=APPS[arg].without_id(),
                                    message_id=seq))
    if kind == "sub":
        return encode_frame(Subscribe(name=CHAN))
    if kind == "unsub":
        return encode_frame(Unsubscribe(name=CHAN))
    assert kind == "garbage"
    return b"\x00\x00\x00\x03\xc1\xc1\xc1"


@given(actions, st.integers(1, 8))
def test_flow_cache_delivers_exactly_what_the_slow_path_delivers(
        script: list[tuple[int, str, int]], batch: int) -> None:
    # Anycast picks at random; give both cores one instance per service.
    outputs = []
    for flow_cache in (False, True):
        core, sinks = make_core(flow_cache)
        pending: dict[int, bytes] = {}
        for seq, (sender, kind, arg) in enumerate(script):
            pending[sender] = pending.get(sender, b"") + frame_for(sender, kind, arg, seq)
            if len(pending[sender]) >= batch * 60:
                core.data_received(sender + 1, pending.pop(sender), NOW)
        for sender, data in pending.items():
            core.data_received(sender + 1, data, NOW)
        outputs.append([s.frames() for s in sinks])
        # Runs count as the frames they hold (the consumer's max_pending_frames).
        assert [s.frames_told for s in sinks] == [len(f) for f in outputs[-1]]
    assert outputs[0] == outputs[1]


def test_repeated_frames_are_forwarded_in_runs_without_decoding() -> None:
    core, sinks = make_core(True)
    frame = encode_frame(Publish(source=APPS[0], destination=APPS[1], payload=b"p" * 10))
    core.data_received(1, frame, NOW)  # slow path, installs the flow
    before = len(sinks[1].frames())
    core.data_received(1, frame * 100, NOW)
    assert len(sinks[1].frames()) == before + 100
    assert sinks[1].frames_told == before + 100  # one write of 100 frames counts 100
    assert all(bytes(f) == frame for f in sinks[1].frames()[-100:])
    stats = core.connection_statistics(2)
    assert stats.frames_out == 1 + 101  # hello_ack + frames


def test_routing_change_invalidates_flows() -> None:
    core, sinks = make_core(True)
    to_chan = encode_frame(Publish(source=APPS[0], destination=CHAN, fanout=2))
    core.data_received(2, encode_frame(Subscribe(name=CHAN)), NOW)
    core.data_received(1, to_chan * 3, NOW)
    assert len(sinks[1].frames()) == 1 + 3
    core.data_received(3, encode_frame(Subscribe(name=CHAN)), NOW)
    core.data_received(1, to_chan * 2, NOW)
    assert len(sinks[2].frames()) == 1 + 2  # the new member gets the next frames
    core.connection_lost(2)
    core.data_received(1, to_chan, NOW)
    assert len(sinks[2].frames()) == 1 + 3


def test_repeated_keys_are_refused_by_every_decoder() -> None:
    import msgpack

    forged = (msgpack.packb({"v": 1, "t": "ping"})[:1].replace(b"\x82", b"\x83")
              + msgpack.packb({"v": 1, "t": "ping"})[1:] + msgpack.packb("t")
              + msgpack.packb("pong"))
    with pytest.raises(ValueError, match="repeated key"):
        decode_frame(forged)


def test_a_known_flow_with_a_broken_tail_is_refused_by_the_receiver() -> None:
    """Documented trade-off: the node checks a flow's header once; receivers check every frame."""
    from node_lite import MalformedFrameError

    core, sinks = make_core(True)
    good = encode_frame(Publish(source=APPS[0], destination=APPS[1], payload=b"ok"))
    broken = good[:-3] + b"\xc1\xc1\xc1"
    core.data_received(1, good + broken, NOW)
    delivered = sinks[1].frames()[1:]
    assert delivered == [good, broken]
    decode_frame(delivered[0][4:])
    with pytest.raises(MalformedFrameError):
        decode_frame(delivered[1][4:])
    # Without a flow (first frame of a destination), the node refuses it itself.
    core2, sinks2 = make_core(True)
    core2.data_received(1, broken, NOW)
    assert len(sinks2[1].frames()) == 1  # hello_ack only


def test_a_short_frame_never_matches_a_flow_with_the_next_frames_bytes() -> None:
    core, sinks = make_core(True)
    good = encode_frame(Publish(source=APPS[0], destination=APPS[1], payload=b"ok"))
    core.data_received(1, good, NOW)  # installs the flow
    header = good[4:30]
    short = len(header[:10]).to_bytes(4, "big") + header[:10]  # a frame cut inside the prefix
    core.data_received(1, short + header[10:] + good, NOW)
    # the short frame is malformed (slow path); the garbage after it is not a frame start
    delivered = sinks[1].frames()[1:]
    assert all(f == good for f in delivered)
