# The session protocol on top of node_lite publish frames (sans-IO).
#
# A session message is a publish whose header carries the session id (sid),
# the session type (st), the message kind (k) and a message id (mid). Data
# (MSG, RTX_REPLY) carries the application payload as the body; control
# messages carry a msgpack map, checked here against its schema. Control
# requests use random message ids; their replies and acks reuse them. Data
# uses per-sender sequence numbers.
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from node_lite import Name
from node_lite.wire import MessageKind, SessionType, encode_frame

from ._errors import SessionError

__all__ = ["Kind", "ProtocolViolation", "SessionType", "build_frame", "decode_body"]

Kind = MessageKind

#: Metadata marking a message sent to one member of a group (``publish_to``).
META_PUBLISH_TO = "PUBLISH_TO"
#: Metadata of a leave request sent by a member that leaves on its own.
META_LEAVING = "LEAVING_SESSION"
TRUE = "TRUE"
# Room kept below 2**32 for "unspecified" ids, as upstream.
MAX_SESSION_ID = 0xFFFF_FFFF - 1000
MAX_ROSTER = 4096


class ProtocolViolation(SessionError):
    """A session message does not follow the session protocol (it is dropped)."""

    code = "malformed"


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolViolation(f"ext type {code} in a control body")


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a control body: a msgpack map with string keys."""
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ProtocolViolation:
        raise
    except Exception as exc:  # msgpack signals bad input with several types
        raise ProtocolViolation(f"control body: {exc or type(exc).__name__}") from exc
    if type(d) is not dict:
        raise ProtocolViolation("control body is not a map")
    return d


def encode_body(d: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(d, use_bin_type=True)
    return body


def build_frame(src: list[Any], dst: list[Any], *, fanout: int, sid: int, st: int, kind: int,
                mid: int, body: bytes = b"", payload_type: str | None = None,
                metadata: Mapping[str, str] | None = None, identity: str | None = None,
                error: bool = False, ack: bytes | None = None) -> bytes:
    """Encode a session message (fields in the canonical order the node's flow cache keys on).

    ``ack`` (a data message only) carries acknowledgements for the destination's
    own messages, encoded as a MSG_ACK body, so that a reply needs no ack frame.
    """
    d: dict[str, Any] = {"v": 1, "t": "pub", "src": src, "dst": dst, "fan": fanout, "ttl": 8,
                         "sid": sid, "st": st, "k": kind, "mid": mid}
    if payload_type is not None:
        d["pt"] = payload_type
    if metadata:
        d["meta"] = dict(metadata)
    if identity is not None:
        d["id"] = identity
    if error:
        d["err"] = True
    if ack is not None:
        d["ack"] = ack
    d["body"] = body
    return encode_frame(d)


class DataTemplate:
    """Pre-encoded header of one session's data messages to one destination.

    The fields before ``mid`` never change for a (source, destination, kind)
    so they are packed once; each message packs only its id, optional
    fields and payload. The result is byte-identical to :func:`build_frame`.
    """

    __slots__ = ("_head", "_packb")

    def __init__(self, src: list[Any], dst: list[Any], *, fanout: int, sid: int, st: int,
                 kind: int) -> None:
        pack = msgpack.Packer(use_bin_type=True).pack
        self._packb = pack
        self._head = b"".join(pack(x) for x in (
            "v", 1, "t", "pub", "src", src, "dst", dst, "fan", fanout, "ttl", 8,
            "sid", sid, "st", st, "k", kind, "mid"))

    def frame(self, mid: int, body: bytes, payload_type: str | None = None,
              metadata: Mapping[str, str] | None = None, ack: bytes | None = None) -> bytes:
        pack = self._packb
        count = 11
        parts = [b"", self._head, pack(mid)]
        if payload_type is not None:
            parts.append(b"\xa2pt" + pack(payload_type))
            count += 1
        if metadata:
            parts.append(b"\xa4meta" + pack(dict(metadata)))
            count += 1
        if ack is not None:
            parts.append(b"\xa3ack" + pack(ack))
            count += 1
        parts.append(b"\xa4body")
        parts.append(pack(body))
        parts[0] = bytes([0x80 | count])
        data = b"".join(parts)
        return len(data).to_bytes(4, "big") + data


# -- field checks ---------------------------------------------------------------------


def name_of(value: object, field: str, *, wildcard: bool = False) -> Name:
    if type(value) is not list or len(value) != 4:
        raise ProtocolViolation(f"{field}: expected a name")
    try:
        name = Name(*value)
    except (TypeError, ValueError) as exc:
        raise ProtocolViolation(f"{field}: {exc}") from exc
    if name.id is None and not wildcard:
        raise ProtocolViolation(f"{field}: a full name is required")
    return name


def int_of(value: object, field: str, lo: int = 0, hi: int = 0xFFFF_FFFF) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolViolation(f"{field}: expected an integer in [{lo}, {hi}]")
    return value


def str_of(value: object, field: str, limit: int = 8192) -> str:
    if type(value) is not str or len(value) > limit:
        raise ProtocolViolation(f"{field}: expected a string")
    return value


def ranges_of(value: object, field: str) -> list[list[int]]:
    if value is None:
        return []
    if type(value) is not list or len(value) > 4096:
        raise ProtocolViolation(f"{field}: expected a list of ranges")
    out = []
    for r in value:
        if type(r) is not list or len(r) != 2:
            raise ProtocolViolation(f"{field}: expected [lo, hi]")
        lo, hi = int_of(r[0], field, 1), int_of(r[1], field, 1)
        if hi < lo or hi - lo > 1 << 20:
            raise ProtocolViolation(f"{field}: bad range")
        out.append([lo, hi])
    return out


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a session: its full name and the identity subject it proved."""

    name: Name
    subject: str

    def to_wire(self) -> list[Any]:
        return [self.name.to_wire(), self.subject]


def members_of(value: object, field: str) -> list[Member]:
    if type(value) is not list or len(value) > MAX_ROSTER:
        raise ProtocolViolation(f"{field}: expected a roster")
    out = []
    for item in value:
        if type(item) is not list or len(item) != 2:
            raise ProtocolViolation(f"{field}: expected [name, subject]")
        out.append(Member(name_of(item[0], field), str_of(item[1], field, 1024)))
    return out


def member_of(value: object, field: str) -> Member:
    (m,) = members_of([value], field)
    return m


def reliability_of(value: object) -> tuple[float, int] | None:
    if value is None:
        return None
    if type(value) is not list or len(value) != 2:
        raise ProtocolViolation("rel: expected [timeout_ms, max_retries]")
    return int_of(value[0], "rel", 1, 3_600_000) / 1000.0, int_of(value[1], "rel", 0, 1000)


def heartbeat_of(value: object) -> tuple[float, int, float] | None:
    """A join request's ``hb``: (interval, misses, moderator grace), or None (no heartbeats)."""
    if value is None:
        return None
    if type(value) is not list or len(value) != 3:
        raise ProtocolViolation("hb: expected [interval_ms, misses, grace_ms]")
    return (int_of(value[0], "hb", 10, 3_600_000) / 1000.0, int_of(value[1], "hb", 1, 100),
            int_of(value[2], "hb", 1, 86_400_000) / 1000.0)
