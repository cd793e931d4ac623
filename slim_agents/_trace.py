# Session traces: the frames a node forwards (or an agent sends and gets),
# recorded as JSON lines and drawn as Mermaid sequence diagrams.
#
# A trace never holds an encrypted body, and holds a message's text only
# when asked to and when the session is known to be unencrypted (its join
# request carried no key material).
from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import msgpack

from node_lite import Node
from node_lite.wire import MessageKind

from .hookspecs import hookimpl

__all__ = ["TracePlugin", "TraceRecorder", "load_trace", "record_node", "render_mermaid"]

# What each session message kind is called in a trace and a diagram.
KIND_LABELS = {
    MessageKind.MSG: "msg",
    MessageKind.MSG_ACK: "ack",
    MessageKind.RTX_REQUEST: "rtx request",
    MessageKind.RTX_REPLY: "rtx reply",
    MessageKind.DISCOVERY_REQUEST: "discovery request",
    MessageKind.DISCOVERY_REPLY: "discovery reply",
    MessageKind.JOIN_REQUEST: "join request",
    MessageKind.JOIN_REPLY: "join reply",
    MessageKind.LEAVE_REQUEST: "leave request",
    MessageKind.LEAVE_REPLY: "leave reply",
    MessageKind.GROUP_UPDATE: "group update",
    MessageKind.GROUP_WELCOME: "welcome",
    MessageKind.GROUP_CLOSE: "close",
    MessageKind.GROUP_PROPOSAL: "proposal",
    MessageKind.GROUP_ACK: "group ack",
    MessageKind.GROUP_NACK: "group nack",
    MessageKind.HEARTBEAT: "heartbeat",
}
_LABELS = {int(k): v for k, v in KIND_LABELS.items()}
# Frames the recorder keeps in memory when it writes to no file.
MAX_EVENTS = 100_000
# Frame shapes remembered per connection (see TraceRecorder.feed_bytes).
MAX_SHAPES = 32
_SHAPE_KEYS = ["v", "t", "src", "dst", "fan", "ttl", "sid", "st", "k", "mid"]
_PREFIX = _U32 = struct.Struct(">I")


@dataclass(slots=True)
class _Shape:
    head: bytes  # the frame body up to the message id's value
    line: str | None  # the JSON line from "sid" up to "mid": (None: not recorded)
    tail: str  # what follows the size


def _id_and_body(buf: bytes, pos: int, end: int) -> tuple[int, int, int] | None:
    """Message id, its encoded length, and body size of a frame whose id starts
    at ``pos``, when nothing but the body follows the id (else None: decode it)."""
    b = buf[pos]
    if b < 0x80:
        mid, enc = b, 1
    elif b == 0xCD:
        mid, enc = buf[pos + 1] << 8 | buf[pos + 2], 3
    elif b == 0xCE:
        mid, enc = _U32.unpack_from(buf, pos + 1)[0], 5
    elif b == 0xCC:
        mid, enc = buf[pos + 1], 2
    else:
        return None
    pos += enc
    # "body" and a bin header whose length reaches exactly the frame's end
    if end - pos < 7 or buf[pos] != 0xA4 or buf[pos + 1:pos + 5] != b"body":
        return None
    b = buf[pos + 5]
    if b == 0xC4:
        body = end - pos - 7
        ok = buf[pos + 6] == body
    elif b == 0xC5:
        body = end - pos - 8
        ok = buf[pos + 6] << 8 | buf[pos + 7] == body
    elif b == 0xC6:
        body = end - pos - 10
        ok = _U32.unpack_from(buf, pos + 6)[0] == body
    else:
        return None
    return (mid, enc, body) if ok else None


def _run(buf: bytes, pos: int, end: int, first: tuple[int, int, int], shape: _Shape,
         lines: list[str], ts: str) -> int:
    """Record the frame at ``pos`` (ending at ``end``, of ``shape``) and the frames
    of the same size and shape right after it, as one line; return where they end."""
    mid, enc, body = first
    ids = [mid]
    at = 4 + len(shape.head)  # the id, from a frame's start
    step = end - pos
    size = len(buf)
    tail = buf[pos + at + enc:end - body]  # "body" and its bin header
    q = end
    if enc == 1:
        lead = buf[pos:pos + at]
        while size - q >= step and buf.startswith(lead, q) and buf[q + at] < 0x80 \
                and buf.startswith(tail, q + at + 1):
            ids.append(buf[q + at])
            q += step
    else:
        lead = buf[pos:pos + at + 1]  # with the id's type byte
        while size - q >= step and buf.startswith(lead, q) \
                and buf.startswith(tail, q + at + enc):
            ids.append(int.from_bytes(buf[q + at + 1:q + at + enc], "big"))
            q += step
    text = str(mid) if len(ids) == 1 else f"[{','.join(map(str, ids))}]"
    lines.append(f'{ts}{shape.line}{text},"size":{body}{shape.tail}')
    return q


def _name(value: Any) -> str:
    if isinstance(value, list) and len(value) == 4:
        org, ns, app, i = value
        return f"{org}/{ns}/{app}" if i is None else f"{org}/{ns}/{app}/{i}"
    return "?"


class TraceRecorder:
    """Turns the frames it is fed into trace events (dicts), kept or written as JSON lines.

    :param out: a text file to write one JSON object per line to (else kept in
        :attr:`events`, at most ``MAX_EVENTS``).
    :param sessions: record only these session ids (None: all).
    :param text: characters of a message's text to keep, for sessions known to be
        unencrypted (0: none).
    """

    def __init__(self, out: IO[str] | None = None, *, sessions: Iterable[int] | None = None,
                 text: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.out = out
        self.sessions = set(sessions) if sessions is not None else None
        self.text = text
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.dropped = 0
        # connection -> an incomplete frame: [bytes it needs (0: unknown), bytes held, pieces]
        self._held: dict[int, list[Any]] = {}
        self._plain: dict[int, bool] = {}  # session id -> known unencrypted
        self._names: dict[Any, str] = {}  # wire name -> its JSON text
        self._shapes: dict[int, list[_Shape]] = {}  # connection -> shapes, latest first

    # -- feeding --------------------------------------------------------------------------

    def feed_bytes(self, conn_id: int, data: bytes) -> None:
        """Bytes as read from one connection, in any chunking.

        The hot path of a recording node. A frame whose header up to the
        message id matches one seen before on its connection (a *shape*: the
        same session, kind and route) is recorded without decoding: its id and
        body size are read from their places. A run of such frames of one size
        becomes one line listing their ids (:func:`load_trace` expands it).
        Other frames are decoded.
        """
        held = self._held.get(conn_id)
        if held is not None:  # an incomplete frame: wait until its last byte arrives
            held[2].append(data)
            held[1] += len(data)
            if held[1] < held[0]:
                return
            del self._held[conn_id]
            data = b"".join(held[2])
        buf = data
        shapes = self._shapes.setdefault(conn_id, [])
        fast = self.out is not None
        now = round(self.clock(), 6)
        ts = f'{{"ts":{now}'
        lines: list[str] = []
        size = len(buf)
        pos = 0
        last: _Shape | None = None
        unpack_from = _PREFIX.unpack_from
        while size - pos >= 4:
            start = pos + 4
            end = start + unpack_from(buf, pos)[0]
            if end > size:
                break
            if fast:
                shape = last
                if shape is None or not buf.startswith(shape.head, start, end):
                    for shape in shapes:
                        if buf.startswith(shape.head, start, end):
                            break
                    else:
                        shape = None
                if shape is not None:
                    last = shape
                    if shape.line is None:  # a session not being recorded
                        pos = end
                        continue
                    first = _id_and_body(buf, start + len(shape.head), end)
                    if first is not None:
                        pos = _run(buf, pos, end, first, shape, lines, ts)
                        continue
            if lines:  # keep the file in frame order
                self.out.write("".join(lines))  # type: ignore[union-attr]
                lines.clear()
            self._feed_frame(buf, start, end, shapes, now)
            pos = end
        if pos < size:
            rest = buf[pos:]
            need = 4 + unpack_from(rest, 0)[0] if len(rest) >= 4 else 0
            self._held[conn_id] = [need, len(rest), [rest]]
        if lines:
            self.out.write("".join(lines))  # type: ignore[union-attr]

    def _feed_frame(self, buf: bytes, start: int, end: int, shapes: list[_Shape],
                    ts: float) -> None:
        try:
            d = msgpack.unpackb(buf[start:end], raw=False, strict_map_key=False,
                                ext_hook=_no_ext)
        except Exception:  # not ours to judge: the node answers bad frames itself
            self.dropped += 1
            return
        if type(d) is not dict or d.get("t") != "pub":
            return
        self.feed_envelope(d, ts)
        if self.out is not None:
            shape = self._shape(d, buf, start, end)
            if shape is not None:
                shapes.insert(0, shape)
                del shapes[MAX_SHAPES:]  # the least recently made ones go

    def _shape(self, d: dict[str, Any], buf: bytes, start: int, end: int) -> _Shape | None:
        """The shape of a decoded frame, if later frames like it can skip decoding."""
        if list(d)[:10] != _SHAPE_KEYS:
            return None
        k, sid = d["k"], d["sid"]
        if self.text or type(k) is not int or k == MessageKind.JOIN_REQUEST:
            return None
        pack = msgpack.Packer(use_bin_type=True).pack
        try:
            head = bytes([buf[start]]) + b"".join(
                pack(key) + pack(d[key]) for key in _SHAPE_KEYS[:9]) + pack("mid")
        except (TypeError, ValueError):
            return None
        if not buf.startswith(head, start, end):
            return None  # not packed the canonical way: keep decoding
        if self.sessions is not None and sid not in self.sessions:
            return _Shape(head, None, "")
        line = (f',"sid":{sid},"kind":"{_LABELS.get(k, "other")}",'
                f'"src":{self._json_name(d["src"])},"dst":{self._json_name(d["dst"])},'
                f'"fanout":{json.dumps(d["fan"])},"mid":')
        return _Shape(head, line, ',"group":true}\n' if d.get("st") == 2 else "}\n")

    def _json_name(self, value: Any) -> str:
        key = tuple(value) if type(value) is list else value
        try:
            return self._names[key]
        except (KeyError, TypeError):
            text = json.dumps(_name(value))
            if len(self._names) < 10_000:
                try:
                    self._names[key] = text
                except TypeError:
                    pass
            return text

    def tap(self, conn_id: int, data: bytes | None) -> None:
        """A node tap (see ``NodeCore.taps``): bytes read, or None once the connection closed."""
        if data is None:
            self._held.pop(conn_id, None)
            self._shapes.pop(conn_id, None)
        else:
            self.feed_bytes(conn_id, data)

    def feed_envelope(self, d: dict[str, Any], ts: float | None = None) -> None:
        """One decoded frame (publishes are recorded; control frames are not)."""
        if d.get("t") != "pub":
            return
        sid = d.get("sid", 0)
        if self.sessions is not None and sid not in self.sessions:
            return
        try:
            kind = MessageKind(d.get("k", 0))
        except ValueError:
            kind = MessageKind.UNSPECIFIED
        body = d.get("body", b"")
        if kind == MessageKind.JOIN_REQUEST:
            self._plain[sid] = not _has_keys(body)
        event: dict[str, Any] = {
            "ts": round(self.clock(), 6) if ts is None else ts, "sid": sid,
            "kind": KIND_LABELS.get(kind, "other"),
            "src": _name(d.get("src")), "dst": _name(d.get("dst")), "fanout": d.get("fan", 1),
            "mid": d.get("mid", 0), "size": len(body) if isinstance(body, bytes | bytearray) else 0,
        }
        if d.get("st") == 2:
            event["group"] = True
        if d.get("pt"):
            event["type"] = d["pt"]
        if d.get("err"):
            event["error"] = True
        if "ack" in d:  # a data message that also acknowledges
            event["acks"] = True
        if kind == MessageKind.MSG and self.text and self._plain.get(sid) \
                and isinstance(body, bytes):
            event["text"] = body[:self.text * 4].decode(errors="replace")[:self.text]
        self.add(event)

    def add(self, event: dict[str, Any]) -> None:
        if self.out is not None:
            self.out.write(json.dumps(event, separators=(",", ":")) + "\n")
        elif len(self.events) < MAX_EVENTS:
            self.events.append(event)
        else:
            self.dropped += 1


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("ext types are not part of the protocol")


def _has_keys(body: Any) -> bool:
    """Whether a join request carries key material (an encrypted session)."""
    if not isinstance(body, bytes):
        return True
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # undecodable: assume the worst, never show text
        return True
    return not isinstance(d, dict) or d.get("mls") is not None


@contextmanager
def record_node(node: Node, recorder: TraceRecorder) -> Iterator[TraceRecorder]:
    """Record what ``node`` reads from its connections for the duration of the block."""
    taps = node.core.taps
    taps.append(recorder.tap)
    try:
        yield recorder
    finally:
        taps.remove(recorder.tap)


def load_trace(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Events from a JSON-lines trace (blank lines skipped).

    A line whose ``mid`` is a list stands for a run of frames alike but for
    their ids; it becomes one event per id.
    """
    events: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            continue
        event = json.loads(line)
        ids = event.get("mid")
        if type(ids) is list:
            events.extend({**event, "mid": i} for i in ids)
        else:
            events.append(event)
    return events


# -- rendering --------------------------------------------------------------------------


def _short(name: str) -> str:
    parts = name.split("/")
    if len(parts) == 4:
        return f"{parts[2]}/{parts[3][:6]}"
    return parts[-1] if parts else name


def render_mermaid(events: Iterable[dict[str, Any]], *, title: str | None = None,
                   acks: bool = True, heartbeats: bool = False) -> str:
    """A Mermaid ``sequenceDiagram`` of trace events, in their order.

    Participants are the apps and channels in order of first appearance;
    group messages go to their channel; message text appears only if the
    trace holds it (see :class:`TraceRecorder`).
    """
    lines = ["sequenceDiagram"]
    if title:
        lines.append(f"    title {title}")
    ids: dict[str, str] = {}
    body: list[str] = []

    def who(name: str) -> str:
        if name not in ids:
            ids[name] = f"p{len(ids)}"
            kind = "participant"
            label = _short(name) if name.count("/") == 3 else name
            lines.append(f"    {kind} {ids[name]} as {label}")
        return ids[name]

    for e in events:
        kind = e.get("kind", "other")
        if kind == "heartbeat" and not heartbeats:
            continue
        if kind in ("ack", "group ack") and not acks:
            continue
        src, dst = who(e.get("src", "?")), who(e.get("dst", "?"))
        label = kind
        if kind in ("msg", "ack", "rtx request", "rtx reply"):
            label = f"{kind} #{e.get('mid', 0)}"
        if "text" in e:
            text = str(e["text"]).replace('"', "'").replace("\n", " ").replace(";", ",")
            label += f": {text}"
        elif kind == "msg":
            label += f" ({e.get('size', 0)} B)"
        if e.get("acks"):
            label += " +ack"
        if e.get("error"):
            label += " [error]"
        arrow = "-->>" if kind.endswith(("reply", "ack", "nack")) else "->>"
        body.append(f"    {src}{arrow}{dst}: {label}")
    return "\n".join(lines + body) + "\n"


def phases(events: Iterable[dict[str, Any]]) -> list[str]:
    """The kinds of a trace in order, consecutive repeats collapsed (for checks)."""
    out: list[str] = []
    for e in events:
        k = e.get("kind", "other")
        if not out or out[-1] != k:
            out.append(k)
    return out


# -- the `slim-agents trace` command ----------------------------------------------------


def add_trace_arguments(parser: Any) -> None:
    from node_lite._process import add_node_arguments

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    record = sub.add_parser("record", help="run a node that records every session's frames")
    add_node_arguments(record)
    record.add_argument("--out", required=True, help="trace file to write (JSON lines)")
    record.add_argument("--session", type=int, action="append", default=None,
                        help="record only this session id (repeatable)")
    record.add_argument("--text", type=int, default=0,
                        help="keep up to N characters of unencrypted messages (default 0)")
    render = sub.add_parser("render", help="draw a trace as a Mermaid sequence diagram")
    render.add_argument("trace", help="trace file (JSON lines), - for stdin")
    render.add_argument("--session", type=int, default=None, help="only this session id")
    render.add_argument("--no-acks", action="store_true", help="leave acknowledgements out")
    render.add_argument("--title", default=None)


def run_trace(args: Any) -> int:
    import sys

    if args.action == "render":
        with (open(args.trace) if args.trace != "-" else sys.stdin) as f:
            events = load_trace(f)
        if args.session is not None:
            events = [e for e in events if e.get("sid") == args.session]
        print("```mermaid")
        print(render_mermaid(events, title=args.title, acks=not args.no_acks), end="")
        print("```")
        return 0
    return _record(args)


def _record(args: Any) -> int:
    import signal
    import sys

    import anyio

    from node_lite import ConfigError, SlimError, open_node
    from node_lite._process import READY_PREFIX, config_from_args, configure_logging

    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)

    async def main(out: IO[str]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            recorder = TraceRecorder(out, sessions=args.session, text=args.text)
            async with open_node(cfg) as node:
                with record_node(node, recorder):
                    print(f"{READY_PREFIX} {' '.join(node.endpoints)}", flush=True)
                    async for _ in signals:
                        break

    try:
        with open(args.out, "w", buffering=1) as out:
            anyio.run(main, out, backend=args.backend)
    except SlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class TracePlugin:
    """A plugin recording an agent's own messages (through the message hooks).

    Register it on an agent's plugin manager; it sees the payloads the agent
    sends and receives after decryption, so it records sizes and types, and
    text only when ``recorder.text`` asks for it.
    """

    def __init__(self, recorder: TraceRecorder) -> None:
        self.recorder = recorder

    @hookimpl
    def slim_before_send(self, agent: Any, session: Any, payload: bytes,
                         metadata: dict[str, str]) -> None:
        self._add(str(agent.name), str(session.dst), session, "send", payload)

    @hookimpl
    def slim_after_receive(self, agent: Any, session: Any, message: Any) -> None:
        self._add(str(message.context.source_name), str(agent.name), session, "receive",
                  message.payload, message.context.payload_type)

    def _add(self, src: str, dst: str, session: Any, direction: str, payload: bytes,
             payload_type: str | None = None) -> None:
        event: dict[str, Any] = {"ts": round(self.recorder.clock(), 6), "sid": session.id,
                                 "kind": "msg", "src": src, "dst": dst, "size": len(payload),
                                 "dir": direction}
        if payload_type and payload_type != "msg":
            event["type"] = payload_type
        if self.recorder.text:
            event["text"] = payload[:self.recorder.text * 4].decode(
                errors="replace")[:self.recorder.text]
        self.recorder.add(event)
