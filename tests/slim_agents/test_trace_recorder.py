"""The trace recorder's undecoded path writes what decoding every frame would."""

from __future__ import annotations

import io

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from node_lite.wire import Name, Ping, Publish, encode_frame
from slim_agents._protocol import DataTemplate
from slim_agents._trace import MAX_SHAPES, TraceRecorder, load_trace

A = Name("org", "ns", "a", 1)
B = Name("org", "ns", "b", 2)
CHAN = Name("org", "ns", "chan", None)


def _publish(sid: int, kind: int, mid: int, size: int, extra: int, group: bool) -> bytes:
    src, dst = (A, CHAN) if group else (A, B)
    options: dict[str, object] = {}
    if extra == 1:
        options["payload_type"] = "text"
    elif extra == 2:
        options["metadata"] = {"k": "v"}
    elif extra == 3:
        options["error"] = True
    return encode_frame(Publish(source=src, destination=dst, session_id=sid,
                                session_type=2 if group else 1, kind=kind, message_id=mid,
                                payload=bytes(size), **options))  # type: ignore[arg-type]


def _odd_frame(mid: int) -> bytes:
    # A publish whose id is packed wider than needed: valid, but not canonical.
    head = b"".join(msgpack.packb(x) for x in (
        "v", 1, "t", "pub", "src", A.to_wire(), "dst", B.to_wire(), "fan", 1, "ttl", 8,
        "sid", 9, "st", 1, "k", 1, "mid"))
    body = b"\x8b" + head + b"\xce" + mid.to_bytes(4, "big") + b"\xa4body" + msgpack.packb(b"x")
    return len(body).to_bytes(4, "big") + body


frames = st.one_of(
    st.builds(_publish, st.sampled_from([7, 8, 70_000]), st.sampled_from([1, 2, 3, 4, 20]),
              st.sampled_from([0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1]),
              st.sampled_from([0, 3, 255, 256, 70_000]), st.sampled_from([0, 0, 0, 1, 2, 3]),
              st.booleans()),
    st.builds(lambda sid, mid: DataTemplate(A.to_wire(), B.to_wire(), fanout=1, sid=sid, st=1,
                                            kind=1).frame(mid, b"y" * 10),
              st.sampled_from([7, 8]), st.integers(0, 300)),
    st.builds(_odd_frame, st.integers(0, 300)),
    st.just(encode_frame(Ping(nonce=3))),
    st.just(b"\x00\x00\x00\x02\xc1\xc1"),  # not msgpack
)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _without_ts(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in e.items() if k != "ts"} for e in events]


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=60), st.lists(st.integers(0, 10**7), max_size=8),
       st.sampled_from([None, {7}, {8, 70_000}]))
def test_a_file_trace_equals_decoding_every_frame(stream: list[bytes], points: list[int],
                                                  sessions: set[int] | None) -> None:
    data = b"".join(stream * 2)  # twice: the second time, shapes are known
    out = io.StringIO()
    fast = TraceRecorder(out, sessions=sessions, clock=lambda: 5.0)
    slow = TraceRecorder(sessions=sessions, clock=lambda: 5.0)  # keeps events: decodes all
    for chunk in _cuts(data, points):
        fast.feed_bytes(1, chunk)
    slow.feed_bytes(1, data)
    written = load_trace(out.getvalue().splitlines())
    assert _without_ts(written) == _without_ts(slow.events)
    assert {e["ts"] for e in written} <= {5.0}
    assert fast.dropped == slow.dropped


def test_runs_of_alike_frames_become_one_line_each() -> None:
    template = DataTemplate(A.to_wire(), B.to_wire(), fanout=1, sid=7, st=1, kind=1)
    data = b"".join(template.frame(mid, b"z" * 64) for mid in range(300, 400))
    out = io.StringIO()
    recorder = TraceRecorder(out, clock=lambda: 1.0)
    recorder.feed_bytes(1, data)
    recorder.feed_bytes(1, data)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # the first frame decoded, then the rest of each chunk as a run
    events = load_trace(lines)
    assert [e["mid"] for e in events] == [*range(300, 400), *range(300, 400)]
    assert {(e["sid"], e["kind"], e["src"], e["dst"], e["size"]) for e in events} == {
        (7, "msg", "org/ns/a/1", "org/ns/b/2", 64)}


def test_shapes_are_bounded_per_connection_and_forgotten_with_it() -> None:
    recorder = TraceRecorder(io.StringIO())
    for sid in range(MAX_SHAPES * 2):
        recorder.feed_bytes(1, _publish(sid, 1, 0, 3, 0, False))
    assert len(recorder._shapes[1]) == MAX_SHAPES
    recorder.feed_bytes(1, b"\x00\x00")  # part of a frame, held
    recorder.tap(1, None)
    assert 1 not in recorder._shapes and 1 not in recorder._held
