"""The node_lite wire format (sans-IO).

A frame is a 4-byte big-endian length followed by one msgpack map. Every map
carries ``v`` (protocol version) and ``t`` (type tag). Invariants:

* a length prefix is checked against ``max_frame_size`` before any buffering;
* a frame is decoded only when it is complete, by ``msgpack.unpackb`` whose
  container limits derive from the frame length; ext types are refused;
* every decoded map is checked against the schema of its type; a violation is
  a :class:`~node_lite.ProtocolError` subclass carrying the wire error code.

This module never does I/O and never reads the clock.
"""

from __future__ import annotations

import contextlib
import enum
import struct
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import msgpack

from ._errors import (
    FrameTooLargeError,
    LimitExceededError,
    MalformedFrameError,
    ProtocolError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._names import MAX_ID, Name

__all__ = [
    "MAX_CARD_SIZE",
    "MAX_GRANT_SIZE",
    "PROTOCOL_VERSION",
    "Announce",
    "Command",
    "CommandResult",
    "DirectoryEntry",
    "Error",
    "ErrorCode",
    "FlowDecoding",
    "FrameDecoder",
    "Hello",
    "HelloAck",
    "Lookup",
    "LookupResult",
    "Message",
    "MessageKind",
    "Ping",
    "Pong",
    "Publish",
    "Register",
    "ReportRequest",
    "ReportResult",
    "RouteAdvert",
    "RouteUpdate",
    "SessionType",
    "Subscribe",
    "SubscribeAck",
    "Unsubscribe",
    "decode_frame",
    "decode_message",
    "encode",
    "encode_frame",
    "frame_prefix",
    "marked",
    "timestamp_marks",
]

PROTOCOL_VERSION = 1
_PREFIX = struct.Struct(">I")
frame_prefix = _PREFIX.pack
_U32 = 0xFFFF_FFFF


class SessionType(enum.IntEnum):
    """Session type carried in a publish header (``st``)."""

    UNSPECIFIED = 0
    POINT_TO_POINT = 1
    GROUP = 2


class MessageKind(enum.IntEnum):
    """Session message type carried in a publish header (``k``).

    The node never interprets it; sessions and traces do.
    """

    UNSPECIFIED = 0
    MSG = 1
    MSG_ACK = 2
    RTX_REQUEST = 3
    RTX_REPLY = 4
    DISCOVERY_REQUEST = 5
    DISCOVERY_REPLY = 6
    JOIN_REQUEST = 7
    JOIN_REPLY = 8
    LEAVE_REQUEST = 9
    LEAVE_REPLY = 10
    GROUP_UPDATE = 11
    GROUP_WELCOME = 12
    GROUP_CLOSE = 13
    GROUP_PROPOSAL = 14
    GROUP_ACK = 15
    GROUP_NACK = 16
    HEARTBEAT = 17


class ErrorCode(enum.StrEnum):
    """Codes carried by error frames."""

    FRAME_TOO_LARGE = "frame_too_large"
    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN_SOURCE = "forbidden_source"
    FORBIDDEN_SUBSCRIBE = "forbidden_subscribe"
    FORBIDDEN_PUBLISH = "forbidden_publish"
    RATE_LIMITED = "rate_limited"
    SLOW_CONSUMER = "slow_consumer"
    LIMIT_EXCEEDED = "limit_exceeded"
    NO_ROUTE = "no_route"
    TTL_EXPIRED = "ttl_expired"
    SHUTTING_DOWN = "shutting_down"
    READ_TIMEOUT = "read_timeout"


# Largest moderator grant a subscribe may carry.
MAX_GRANT_SIZE = 2048

# -- field checks -----------------------------------------------------------------------
# Each returns the checked value or raises MalformedFrameError/LimitExceededError.


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = d.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise MalformedFrameError(f"expected an integer in [{lo}, {hi}], got {value!r}", field=key)
    return value


def _bool(d: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = d.get(key, default)
    if type(value) is not bool:
        raise MalformedFrameError(f"expected a boolean, got {value!r}", field=key)
    return value


def _text(value: object, key: str, limit: int, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if type(value) is not str:
        raise MalformedFrameError(f"expected a string, got {type(value).__name__}", field=key)
    if len(value) > limit or (not value.isascii() and len(value.encode()) > limit):
        raise LimitExceededError(f"field {key!r}", limit, len(value.encode()))
    return value


def _check_name(value: object, key: str, limits: Limits, *, wildcard: bool) -> None:
    if type(value) is not list or len(value) != 4:
        raise MalformedFrameError("expected [org, ns, app, id]", field=key)
    id_ = value[3]
    for i in range(3):
        part = value[i]
        _text(part, key, limits.max_name_component)
        if not part or "/" in part or part != part.strip():
            raise MalformedFrameError(f"invalid name component {part!r}", field=key)
    if id_ is None:
        if not wildcard:
            raise MalformedFrameError("a full name with an instance id is required", field=key)
    elif type(id_) is not int or not 0 <= id_ <= MAX_ID:
        raise MalformedFrameError(f"invalid instance id {id_!r}", field=key)


def _name(value: object, key: str, limits: Limits, *, wildcard: bool) -> Name:
    _check_name(value, key, limits, wildcard=wildcard)
    assert isinstance(value, list)
    try:
        return Name(*value)
    except ValueError as exc:  # same rules as above; kept as a safety net
        raise MalformedFrameError(str(exc), field=key) from exc


def _metadata(value: object, limits: Limits) -> dict[str, str] | None:
    if value is None:
        return None
    if type(value) is not dict:
        raise MalformedFrameError("expected a map of strings", field="meta")
    if len(value) > limits.max_metadata_entries:
        raise LimitExceededError("metadata entries", limits.max_metadata_entries, len(value))
    for k, v in value.items():
        _text(k, "meta", limits.max_name_component)
        _text(v, "meta", limits.max_metadata_value)
    return value


def _bytes(d: Mapping[str, Any], key: str) -> bytes:
    value = d.get(key, b"")
    if type(value) is not bytes:
        raise MalformedFrameError(f"expected binary data, got {type(value).__name__}", field=key)
    return value


def _node_id(value: object, key: str, limits: Limits) -> str:
    text = _text(value, key, limits.max_name_component)
    assert text is not None
    if not text:
        raise MalformedFrameError("empty node id", field=key)
    return text


# -- messages ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """First frame on every connection: who is connecting and its identity token.

    ``role`` is ``"app"`` for an application (``name`` is its full name) or
    ``"peer"`` for another node (``node_id`` names it).
    """

    TYPE: ClassVar[str] = "hello"
    token: str
    role: str = "app"
    name: Name | None = None
    node_id: str | None = None
    caps: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE, "role": self.role,
                             "tok": self.token}
        if self.name is not None:
            d["name"] = self.name.to_wire()
        if self.node_id is not None:
            d["node"] = self.node_id
        if self.caps:
            d["caps"] = self.caps
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Hello:
        role = d.get("role")
        tok = _text(d.get("tok"), "tok", limits.max_token_size)
        assert tok is not None
        caps = d.get("caps", {})
        if type(caps) is not dict:
            raise MalformedFrameError("expected a map", field="caps")
        if len(caps) > limits.max_metadata_entries:
            raise LimitExceededError("capabilities", limits.max_metadata_entries, len(caps))
        for k, v in caps.items():
            _text(k, "caps", limits.max_name_component)
            if type(v) not in (str, int, bool) and v is not None:
                raise MalformedFrameError("capability values are scalars", field="caps")
        if role == "app":
            return cls(token=tok, role=role,
                       name=_name(d.get("name"), "name", limits, wildcard=False), caps=caps)
        if role == "peer":
            return cls(token=tok, role=role, node_id=_node_id(d.get("node"), "node", limits),
                       caps=caps)
        raise MalformedFrameError(f"unknown role {role!r}", field="role")


@dataclass(frozen=True, kw_only=True, slots=True)
class HelloAck:
    """The node accepted a hello; ``conn_id`` identifies the connection in its statistics."""

    TYPE: ClassVar[str] = "hello_ack"
    conn_id: int
    node_id: str
    max_frame_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "conn": self.conn_id,
                "node": self.node_id, "mfs": self.max_frame_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> HelloAck:
        return cls(conn_id=_int(d, "conn", 0, 1 << 63),
                   node_id=_node_id(d.get("node"), "node", limits),
                   max_frame_size=_int(d, "mfs", 1, 1 << 31))


@dataclass(frozen=True, kw_only=True, slots=True)
class Subscribe:
    """Ask the node to route ``name`` to this connection.

    A non-zero ``request_id`` asks for a :class:`SubscribeAck`.
    """

    TYPE: ClassVar[str] = "sub"
    name: Name
    request_id: int = 0
    #: A moderator's Ed25519 public key claiming the channel (see ChannelModerator).
    claim: bytes | None = None
    #: A moderator-signed grant for a moderated channel.
    grant: bytes | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE,
                             "name": self.name.to_wire(), "rid": self.request_id}
        if self.claim is not None:
            d["claim"] = self.claim
        if self.grant is not None:
            d["grant"] = self.grant
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Subscribe:
        claim = d.get("claim")
        if claim is not None and (type(claim) is not bytes or len(claim) != 32):
            raise MalformedFrameError("expected a 32-byte public key", field="claim")
        grant = d.get("grant")
        if grant is not None and type(grant) is not bytes:
            raise MalformedFrameError("expected binary data", field="grant")
        if grant is not None and len(grant) > MAX_GRANT_SIZE:
            raise LimitExceededError("field 'grant'", MAX_GRANT_SIZE, len(grant))
        return cls(name=_name(d.get("name"), "name", limits, wildcard=True),
                   request_id=_int(d, "rid", 0, _U32, 0), claim=claim, grant=grant)


@dataclass(frozen=True, kw_only=True, slots=True)
class Unsubscribe:
    """Withdraw a subscription made by :class:`Subscribe`."""

    TYPE: ClassVar[str] = "unsub"
    name: Name
    request_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "name": self.name.to_wire(),
                "rid": self.request_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Unsubscribe:
        return cls(name=_name(d.get("name"), "name", limits, wildcard=True),
                   request_id=_int(d, "rid", 0, _U32, 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class SubscribeAck:
    """Outcome of a subscribe or unsubscribe that asked for one."""

    TYPE: ClassVar[str] = "sub_ack"
    request_id: int
    ok: bool = True
    code: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id,
                             "ok": self.ok}
        if self.code is not None:
            d["code"] = self.code
        if self.message is not None:
            d["msg"] = self.message
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> SubscribeAck:
        return cls(request_id=_int(d, "rid", 0, _U32), ok=_bool(d, "ok"),
                   code=_text(d.get("code"), "code", 64, optional=True),
                   message=_text(d.get("msg"), "msg", limits.max_metadata_value, optional=True))


@dataclass(frozen=True, kw_only=True, slots=True)
class Publish:
    """A routed frame: source, destination, fan-out, session header and payload.

    ``fanout == 1`` reaches one subscriber of ``destination`` (anycast when the
    destination has no instance id, unicast otherwise); ``fanout > 1`` reaches
    every subscriber (a channel). ``origins`` is set by nodes on links only.
    """

    TYPE: ClassVar[str] = "pub"
    source: Name
    destination: Name
    fanout: int = 1
    ttl: int = 8
    session_id: int = 0
    session_type: int = 0
    kind: int = 0
    message_id: int = 0
    payload_type: str | None = None
    metadata: dict[str, str] | None = None
    identity: str | None = None
    error: bool = False
    origins: tuple[str, ...] | None = None
    payload: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        # Field order is part of the format: the routing header comes first.
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": "pub",
                             "src": self.source.to_wire(), "dst": self.destination.to_wire(),
                             "fan": self.fanout, "ttl": self.ttl, "sid": self.session_id,
                             "st": self.session_type, "k": self.kind, "mid": self.message_id}
        if self.payload_type is not None:
            d["pt"] = self.payload_type
        if self.metadata:
            d["meta"] = self.metadata
        if self.identity is not None:
            d["id"] = self.identity
        if self.error:
            d["err"] = True
        if self.origins is not None:
            d["orig"] = list(self.origins)
        d["body"] = self.payload
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Publish:
        check_publish(d, limits)
        orig = d.get("orig")
        return cls(
            source=Name(*d["src"]), destination=Name(*d["dst"]), fanout=d["fan"], ttl=d["ttl"],
            session_id=d.get("sid", 0), session_type=d.get("st", 0), kind=d.get("k", 0),
            message_id=d.get("mid", 0), payload_type=d.get("pt"), metadata=d.get("meta"),
            identity=d.get("id"), error=d.get("err", False),
            origins=tuple(orig) if orig is not None else None, payload=d.get("body", b""),
        )


def check_publish(d: Mapping[str, Any], limits: Limits,
                  known_names: set[tuple[Any, ...]] | None = None) -> bool:
    """Validate a decoded publish map in place (the node's hot path uses the map).

    ``known_names`` caches names already found valid (as 4-tuples); checks
    are inlined because this runs once per routed frame. Returns True when
    the short path for a common frame with known names decided.
    """
    get = d.get
    if known_names is not None:
        # The common frame (known names, no optional fields) in one expression;
        # anything else, valid or not, takes the full walk below.
        src, dst, fan, ttl = get("src"), get("dst"), get("fan"), get("ttl")
        sid, mid, st, k = get("sid", 0), get("mid", 0), get("st", 0), get("k", 0)
        if (type(src) is list and type(dst) is list and len(src) == 4 and len(dst) == 4
                # bool and float ids equal ints: only an int may match a cached id
                and type(src[3]) is int and (dst[3] is None or type(dst[3]) is int)
                and type(fan) is int and type(ttl) is int and type(sid) is int
                and type(mid) is int and type(st) is int and type(k) is int
                and 1 <= fan <= _U32 and 0 <= ttl <= 255 and 0 <= sid <= _U32
                and 0 <= mid <= _U32 and 0 <= st <= 255 and 0 <= k <= 255
                and type(get("body", b"")) is bytes
                and "pt" not in d and "meta" not in d and "id" not in d and "err" not in d
                and "orig" not in d):
            try:
                if tuple(src) in known_names and tuple(dst) in known_names:
                    return True
            except TypeError:
                pass  # an unhashable name component: the full walk below names it
    for key, wildcard in (("src", False), ("dst", True)):
        name = get(key)
        if known_names is not None and type(name) is list and len(name) == 4:
            id_ = name[3]
            if (id_ is not None or wildcard) and (type(id_) is int or id_ is None):
                try:
                    if (name[0], name[1], name[2], id_) in known_names:
                        continue
                except TypeError:
                    pass
            _check_name(name, key, limits, wildcard=wildcard)
            if len(known_names) < 4096:
                known_names.add((name[0], name[1], name[2], id_))
        else:
            _check_name(name, key, limits, wildcard=wildcard)
    fan, ttl = get("fan"), get("ttl")
    if type(fan) is not int or not 1 <= fan <= _U32:
        raise MalformedFrameError(f"expected an integer in [1, {_U32}], got {fan!r}", field="fan")
    if type(ttl) is not int or not 0 <= ttl <= 255:
        raise MalformedFrameError(f"expected an integer in [0, 255], got {ttl!r}", field="ttl")
    for key, hi in (("sid", _U32), ("mid", _U32), ("st", 255), ("k", 255)):
        v = get(key, 0)
        if type(v) is not int or not 0 <= v <= hi:
            raise MalformedFrameError(f"expected an integer in [0, {hi}], got {v!r}", field=key)
    if type(get("body", b"")) is not bytes:
        raise MalformedFrameError("expected binary data", field="body")
    if "pt" in d or "meta" in d or "id" in d or "err" in d or "orig" in d:
        _text(get("pt"), "pt", limits.max_name_component, optional=True)
        _metadata(get("meta"), limits)
        _text(get("id"), "id", limits.max_token_size, optional=True)
        _bool(d, "err")
        orig = get("orig")
        if orig is not None:
            if type(orig) is not list or len(orig) > 256:
                raise MalformedFrameError("expected a list of node ids", field="orig")
            for o in orig:
                _node_id(o, "orig", limits)
    return False


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    """An error reported by a node (or a peer) about an earlier frame or the connection.

    ``ref`` is the request or message id concerned; ``name`` the name concerned
    (the destination for ``no_route``); ``session_id`` the session of the frame.
    """

    TYPE: ClassVar[str] = "err"
    code: str
    message: str = ""
    ref: int | None = None
    name: Name | None = None
    session_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE, "code": self.code,
                             "msg": self.message}
        if self.ref is not None:
            d["ref"] = self.ref
        if self.name is not None:
            d["name"] = self.name.to_wire()
        if self.session_id is not None:
            d["sid"] = self.session_id
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Error:
        code = _text(d.get("code"), "code", 64)
        assert code is not None
        msg = _text(d.get("msg", ""), "msg", limits.max_metadata_value)
        assert msg is not None
        name = d.get("name")
        return cls(code=code, message=msg,
                   ref=_int(d, "ref", 0, _U32) if "ref" in d else None,
                   name=_name(name, "name", limits, wildcard=True) if name is not None else None,
                   session_id=_int(d, "sid", 0, _U32) if "sid" in d else None)


@dataclass(frozen=True, kw_only=True, slots=True)
class Ping:
    """Liveness probe; the receiver answers with a :class:`Pong` carrying the same nonce."""

    TYPE: ClassVar[str] = "ping"
    nonce: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "n": self.nonce}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Ping:
        return cls(nonce=_int(d, "n", 0, (1 << 64) - 1, 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong:
    """Answer to a :class:`Ping`."""

    TYPE: ClassVar[str] = "pong"
    nonce: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "n": self.nonce}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Pong:
        return cls(nonce=_int(d, "n", 0, (1 << 64) - 1, 0))


@dataclass(frozen=True, slots=True)
class RouteAdvert:
    """One reachable name behind a link: ``path`` lists node ids, the origin first."""

    name: Name
    path: tuple[str, ...]

    @property
    def origin(self) -> str:
        return self.path[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class RouteUpdate:
    """Subscription propagation between linked nodes.

    ``full`` replaces everything the sender advertised before (sent when a link
    comes up); otherwise ``add`` and ``remove`` are deltas. ``remove`` holds
    ``(name, origin)`` pairs.
    """

    TYPE: ClassVar[str] = "routes"
    full: bool = False
    add: tuple[RouteAdvert, ...] = ()
    remove: tuple[tuple[Name, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "full": self.full,
                "add": [[a.name.to_wire(), list(a.path)] for a in self.add],
                "del": [[n.to_wire(), o] for n, o in self.remove]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> RouteUpdate:
        add_raw, del_raw = d.get("add", []), d.get("del", [])
        if type(add_raw) is not list or type(del_raw) is not list:
            raise MalformedFrameError("expected lists", field="add")
        add = []
        for item in add_raw:
            if type(item) is not list or len(item) != 2 or type(item[1]) is not list \
                    or not 1 <= len(item[1]) <= 255:
                raise MalformedFrameError("expected [name, path]", field="add")
            name = _name(item[0], "add", limits, wildcard=True)
            add.append(RouteAdvert(name, tuple(_node_id(p, "add", limits) for p in item[1])))
        remove = []
        for item in del_raw:
            if type(item) is not list or len(item) != 2:
                raise MalformedFrameError("expected [name, origin]", field="del")
            remove.append((_name(item[0], "del", limits, wildcard=True),
                           _node_id(item[1], "del", limits)))
        return cls(full=_bool(d, "full"), add=tuple(add), remove=tuple(remove))


def _args(value: object, key: str, limits: Limits) -> dict[str, Any]:
    """A small map of scalars and lists of strings (command arguments and results)."""
    if value is None:
        return {}
    if type(value) is not dict:
        raise MalformedFrameError("expected a map", field=key)
    if len(value) > limits.max_metadata_entries:
        raise LimitExceededError(f"field {key!r} entries", limits.max_metadata_entries,
                                 len(value))
    for k, v in value.items():
        _text(k, key, limits.max_name_component)
        if type(v) is list:
            if len(v) > 4096:
                raise LimitExceededError(f"field {key!r} list", 4096, len(v))
            for item in v:
                _text(item, key, limits.max_metadata_value)
        elif type(v) is str:
            _text(v, key, limits.max_metadata_value)
        elif v is not None and type(v) not in (int, bool):
            raise MalformedFrameError("values are strings, integers, booleans or lists "
                                      "of strings", field=key)
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class Command:
    """A management operation: controller -> node (``target`` names the app), node -> app.

    Operations are strings such as ``create_channel``; ``args`` is a small map.
    """

    TYPE: ClassVar[str] = "cmd"
    request_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    target: Name | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id,
                             "op": self.op, "args": self.args}
        if self.target is not None:
            d["target"] = self.target.to_wire()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Command:
        op = _text(d.get("op"), "op", 64)
        assert op is not None
        target = d.get("target")
        return cls(request_id=_int(d, "rid", 0, _U32), op=op,
                   args=_args(d.get("args"), "args", limits),
                   target=_name(target, "target", limits, wildcard=True)
                   if target is not None else None)


@dataclass(frozen=True, kw_only=True, slots=True)
class CommandResult:
    """The outcome of a :class:`Command` (same ``request_id``)."""

    TYPE: ClassVar[str] = "cmd_res"
    request_id: int
    ok: bool = True
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id,
                             "ok": self.ok, "result": self.result}
        if self.error is not None:
            d["error"] = self.error
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> CommandResult:
        return cls(request_id=_int(d, "rid", 0, _U32), ok=_bool(d, "ok"),
                   error=_text(d.get("error"), "error", limits.max_metadata_value,
                               optional=True),
                   result=_args(d.get("result"), "result", limits))


@dataclass(frozen=True, kw_only=True, slots=True)
class Register:
    """A node announcing itself to a controller (first frame on the southbound link)."""

    TYPE: ClassVar[str] = "register"
    node_id: str
    endpoints: tuple[str, ...] = ()
    token: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "node": self.node_id,
                "endpoints": list(self.endpoints), "tok": self.token}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Register:
        eps = d.get("endpoints", [])
        if type(eps) is not list or len(eps) > 64:
            raise MalformedFrameError("expected a list of endpoints", field="endpoints")
        tok = _text(d.get("tok", ""), "tok", limits.max_token_size)
        assert tok is not None
        return cls(node_id=_node_id(d.get("node"), "node", limits),
                   endpoints=tuple(_node_id(e, "endpoints", limits) for e in eps), token=tok)


# Largest card an app may announce (the node keeps it; discovery returns it).
MAX_CARD_SIZE = 64 * 1024
# Most entries one lookup returns.
MAX_LOOKUP = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class Announce:
    """An app describing itself to its node; ``card`` is opaque to the node.

    Discovery (:class:`Lookup`) returns the card with the app's name. An empty
    card withdraws it. A new announce replaces the previous one.
    """

    TYPE: ClassVar[str] = "announce"
    card: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "card": self.card}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Announce:
        card = _bytes(d, "card")
        if len(card) > MAX_CARD_SIZE:
            raise LimitExceededError("card", MAX_CARD_SIZE, len(card))
        return cls(card=card)


@dataclass(frozen=True, kw_only=True, slots=True)
class Lookup:
    """Ask the node who is reachable: names (and cards) starting with ``prefix``.

    ``prefix`` holds up to three leading components (org, namespace, app).
    """

    TYPE: ClassVar[str] = "lookup"
    request_id: int
    prefix: tuple[str, ...] = ()
    limit: int = 256

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id,
                "prefix": list(self.prefix), "limit": self.limit}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> Lookup:
        prefix = d.get("prefix", [])
        if type(prefix) is not list or len(prefix) > 3:
            raise MalformedFrameError("expected up to three name components", field="prefix")
        parts = tuple(_text(p, "prefix", limits.max_name_component) or "" for p in prefix)
        return cls(request_id=_int(d, "rid", 0, _U32), prefix=parts,
                   limit=_int(d, "limit", 1, MAX_LOOKUP, 256))


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """One reachable app: its name, the node it is on ("" = this node), its card."""

    name: Name
    node: str = ""
    card: bytes | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LookupResult:
    """The answer to a :class:`Lookup` (same ``request_id``)."""

    TYPE: ClassVar[str] = "lookup_res"
    request_id: int
    entries: tuple[DirectoryEntry, ...] = ()
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id,
                "entries": [[e.name.to_wire(), e.node, e.card] for e in self.entries],
                "more": self.truncated}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> LookupResult:
        raw = d.get("entries", [])
        if type(raw) is not list or len(raw) > MAX_LOOKUP:
            raise MalformedFrameError(f"expected at most {MAX_LOOKUP} entries", field="entries")
        entries = []
        for item in raw:
            if type(item) is not list or len(item) != 3:
                raise MalformedFrameError("an entry is [name, node, card]", field="entries")
            name, node, card = item
            if card is not None and (type(card) is not bytes or len(card) > MAX_CARD_SIZE):
                raise MalformedFrameError("a card is binary data or nil", field="entries")
            entries.append(DirectoryEntry(
                name=_name(name, "entries", limits, wildcard=False),
                node=_text(node, "entries", limits.max_name_component) or "", card=card))
        return cls(request_id=_int(d, "rid", 0, _U32), entries=tuple(entries),
                   truncated=_bool(d, "more"))


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportRequest:
    """An app asking its node for a report of itself (statistics, links, channels)."""

    TYPE: ClassVar[str] = "report"
    request_id: int

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> ReportRequest:
        return cls(request_id=_int(d, "rid", 0, _U32))


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportResult:
    """A node's report (see :meth:`node_lite.Node.report`), same ``request_id``."""

    TYPE: ClassVar[str] = "report_res"
    request_id: int
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "t": self.TYPE, "rid": self.request_id,
                "report": self.report}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], limits: Limits) -> ReportResult:
        report = d.get("report", {})
        if type(report) is not dict:
            raise MalformedFrameError("expected a map", field="report")
        return cls(request_id=_int(d, "rid", 0, _U32), report=report)


Message: TypeAlias = (
    Hello | HelloAck | Subscribe | Unsubscribe | SubscribeAck | Publish | Error | Ping | Pong
    | RouteUpdate | Command | CommandResult | Register | Announce | Lookup | LookupResult
    | ReportRequest | ReportResult
)

_TYPES: dict[str, Any] = {
    cls.TYPE: cls
    for cls in (Hello, HelloAck, Subscribe, Unsubscribe, SubscribeAck, Publish, Error, Ping,
                Pong, RouteUpdate, Command, CommandResult, Register, Announce, Lookup,
                LookupResult, ReportRequest, ReportResult)
}


# -- codec ------------------------------------------------------------------------------


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedFrameError(f"ext type {code} is not allowed")


def _has_timestamp(value: object) -> bool:
    # A walk with its own stack: msgpack nests up to 1024 deep, past Python's recursion.
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, msgpack.Timestamp):
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


# The byte before the type byte of an ext that msgpack can turn into a Timestamp: it
# takes only 4, 8 and 12 data bytes (any other size fails to decode), so fixext 4 and 8,
# or the low byte of an ext 8/16/32 length of 4, 8 or 12.
_BEFORE_TYPE = frozenset((0xD6, 0xD7, 4, 8, 12))


def timestamp_marks(data: bytes, start: int = 0, end: int | None = None) -> list[int]:
    """Offsets in ``data[start:end]`` where a msgpack timestamp could be encoded, ascending.

    msgpack decodes ext type -1 itself, without calling ``ext_hook``, in every
    ext encoding (fixext 4 and 8, ext 8, 16 and 32), so a frame holding none
    of these marks needs no walk for Timestamp objects. The mark is the
    position of the type byte, which lies in the same frame as the rest.
    Random bytes (ciphertext) hold a 0xff in every 256: each costs one test.
    """
    marks = []
    find = data.find
    if end is None:
        end = len(data)
    i = find(b"\xff", start + 1, end)  # a type byte has at least one byte before it
    while i > 0:
        # (Near start, the bytes before it are read too: at worst a spurious mark, one walk.)
        if (before := data[i - 1]) in _BEFORE_TYPE and (
                before >= 0xD6 or data[i - 2] == 0xC7
                or data[i - 3:i - 1] == b"\xc8\x00" or data[i - 5:i - 1] == b"\xc9\x00\x00\x00"):
            marks.append(i)
        i = find(b"\xff", i + 1, end)
    return marks


def marked(marks: list[int], start: int, end: int) -> bool:
    """Whether one of :func:`timestamp_marks` lies in ``[start, end)``."""
    i = bisect_left(marks, start)
    return i < len(marks) and marks[i] < end


def _map_size(body: bytes | memoryview) -> int:
    """Entry count announced by a map16 or map32 header at the start of ``body``
    (-1 if none); :func:`decode_frame` reads a fixmap's count itself."""
    first = body[0]
    if first == 0xDE and len(body) >= 3:
        return int(body[1]) << 8 | body[2]
    if first == 0xDF and len(body) >= 5:
        return int.from_bytes(bytes(body[1:5]), "big")
    return -1


class SharedEnvelope(dict[str, Any]):
    """A decoded frame map handed to several readers (the client decodes a group
    frame once for all the apps of an event loop), which must not change it.

    ``checked`` holds the :class:`Limits` a reader validated the map under (None
    before), so the next reader with those same limits can skip
    :func:`check_publish`: its verdict depends on the map and the limits alone.
    ``memo`` is None while one reader alone gets the map; once it is kept for
    several, ``()`` until the first of them stores what it derived from the map,
    under a key of its choosing, for the next ones to reuse.
    """

    __slots__ = ("checked", "memo")
    checked: Limits | None
    memo: tuple[Any, ...] | None


def decode_frame(body: bytes | memoryview, *, check_ext: bool = True) -> dict[str, Any]:
    """Decode one frame body (without its length prefix) into a checked envelope map.

    Checks the version and that the type tag is a string; the fields of the
    type are checked by :func:`decode_message` (or by the node's hot path).
    ``check_ext=False`` skips the walk for timestamps when the caller knows the
    bytes hold no timestamp marker (see :func:`timestamp_marks`).

    :raises ProtocolError: on any violation.
    """
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack signals bad input with several types
        raise MalformedFrameError(str(exc) or type(exc).__name__) from exc
    if check_ext and _has_timestamp(d):
        raise MalformedFrameError("ext type -1 (timestamp) is not allowed")
    if type(d) is not dict:
        raise MalformedFrameError("a frame holds a map")
    first = body[0]
    if len(d) != (first & 0x0F if 0x80 <= first <= 0x8F else _map_size(body)):
        # A repeated key would let a later value override the one a node checked.
        raise MalformedFrameError("repeated key in the frame's map")
    version = d.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise UnsupportedVersionError(version)
    if type(d.get("t")) is not str:
        raise MalformedFrameError("missing type tag", field="t")
    return d


# A FlowDecoding remembers up to _FLOW_MAX headers of up to _FLOW_LENGTHS lengths,
# then starts over. Every _FLOW_CHECK frames decoded whole, fewer hits than that
# (a new flow per frame) leaves the next _FLOW_PAUSE frames to decode_frame.
_FLOW_MAX = 256
_FLOW_LENGTHS = 8
_FLOW_CHECK = 1024
_FLOW_PAUSE = 16384
#: Larger frames decode in place: the tail would be copied twice.
_FLOW_FRAME_MAX = 65536
#: Tail fields a hit checks itself; any other sends the map through check_publish.
_FLOW_TAIL = frozenset(("mid", "body", "ack"))
_flow_pack = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb


class _Flow:
    __slots__ = ("fields", "prefix", "tail")

    def __init__(self, fields: dict[str, Any], prefix: bytes, tail: bytes) -> None:
        self.fields = fields  # the header's fields, decoded
        self.prefix = prefix  # their bytes, from the map's size through the "mid" key
        self.tail = tail  # an array header for the values and pairs after "mid"


class FlowDecoding:
    """:func:`decode_frame` for one connection, which decodes a flow's header once.

    Every publish of a session to one destination starts with the same bytes:
    the map's size and each field before ``mid``. Once a frame has decoded and
    passed :func:`check_publish` under ``limits``, those fields are kept by their
    bytes, and a later frame starting with the same bytes unpacks only the rest.
    A publish comes back as a :class:`SharedEnvelope` whose ``checked`` is
    ``limits`` when all of it passed those checks (a header's fields passed them
    in the same bytes); otherwise, unchecked, for its reader to check and report.
    Whatever does not unpack cleanly takes :func:`decode_frame`, which raises
    the precise error; a tail repeating a header's key is one of those.
    """

    __slots__ = ("_flows", "_hits", "_known", "_last", "_lengths", "_limits", "_misses",
                 "paused")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._known: set[tuple[Any, ...]] = set()
        self._flows: dict[bytes, _Flow] = {}
        self._lengths: list[int] = []
        self._last: _Flow | None = None
        self._hits = self._misses = 0
        #: Frames left to decode without looking for their flow.
        self.paused = 0

    def decode(self, buf: bytes, start: int, end: int, *,
               check_ext: bool | None = None) -> dict[str, Any]:
        """The checked envelope map of the frame body ``buf[start:end]``.

        ``check_ext``: True walks the whole map for timestamps, False says the
        caller's :func:`timestamp_marks` found none. None, the default: a frame of a
        known flow has its tail values checked here (its header's bytes were checked
        when the flow was learned); any other frame is scanned.

        :raises ProtocolError: as :func:`decode_frame`.
        """
        paused = self.paused > 0
        if paused:
            self.paused -= 1
        if paused or check_ext or end - start > _FLOW_FRAME_MAX:  # check_ext: the full walk
            if check_ext is None:
                check_ext = bool(timestamp_marks(buf, start, end))
            return decode_frame(memoryview(buf)[start:end], check_ext=check_ext)
        flow = self._last
        if flow is None or not buf.startswith(flow.prefix, start, end):
            flows = self._flows
            for n in self._lengths:
                flow = flows.get(buf[start:start + n])
                if flow is not None:
                    break
            else:
                flow = None
        if flow is not None:
            d = self._rest(flow, buf, start, end, check_ext)
            if d is not None:
                self._last = flow
                self._hits += 1
                return d
        d = decode_frame(memoryview(buf)[start:end],
                         check_ext=check_ext is None and bool(timestamp_marks(buf, start, end)))
        self._misses += 1
        if self._misses >= _FLOW_CHECK:
            if self._hits < self._misses:
                self.paused = _FLOW_PAUSE
            self._hits = self._misses = 0
        if d.get("t") != "pub" or "mid" not in d:
            return d
        try:
            check_publish(d, self._limits, self._known)
        except ProtocolError:
            return d  # its reader reports it
        checked = SharedEnvelope(d)
        checked.checked = self._limits
        checked.memo = None
        self._learn(checked, buf, start, end)
        return checked

    def _rest(self, flow: _Flow, buf: bytes, start: int, end: int,
              check_ext: bool | None) -> dict[str, Any] | None:
        """A frame of ``flow`` with its tail unpacked; None when the tail is not clean
        (or may hold a timestamp, with ``check_ext`` None)."""
        try:
            # msgpack's defaults since 1.0: str as text, only str keys in maps.
            values = _unpackb(flow.tail + buf[start + len(flow.prefix):end],
                              ext_hook=_refuse_ext)
        except Exception:  # msgpack signals bad input with several types
            return None
        d = SharedEnvelope(flow.fields)
        d.memo = None
        d["mid"] = mid = values[0]
        plain = True
        for i in range(1, len(values), 2):
            key = values[i]
            if type(key) is not str or key in d:
                return None
            d[key] = values[i + 1]
            if key not in _FLOW_TAIL:
                plain = False
        if plain and type(mid) is int and 0 <= mid <= _U32 \
                and type(d.get("body", b"")) is bytes \
                and (check_ext is False or type(d.get("ack", b"")) is bytes):
            d.checked = self._limits
            return d
        if check_ext is None and _has_timestamp(values):
            return None  # the full decoding refuses it, and says why
        d.checked = None
        if not plain:
            with contextlib.suppress(ProtocolError):  # its reader reports it
                check_publish(d, self._limits, self._known)
                d.checked = self._limits
        return d

    def _learn(self, d: dict[str, Any], buf: bytes, start: int, end: int) -> None:
        keys = list(d)  # in the frame's order: repeated keys were refused
        at = keys.index("mid")
        if "v" not in keys[:at] or "t" not in keys[:at]:
            return  # decode_frame's own checks must stay in the header
        first = buf[start]
        size = 1 if first <= 0x8F else 3 if first == 0xDE else 5
        pack = _flow_pack
        prefix = buf[start:start + size] + b"".join(
            pack(k) + pack(d[k]) for k in keys[:at]) + b"\xa3mid"
        if not buf.startswith(prefix, start, end):
            return  # not the shortest encoding of its values
        n = len(prefix)
        lengths = self._lengths
        if len(self._flows) >= _FLOW_MAX or (n not in lengths and len(lengths) >= _FLOW_LENGTHS):
            self._flows.clear()
            lengths.clear()
        if n not in lengths:
            lengths.append(n)
        count = 2 * (len(keys) - at) - 1
        tail = bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
        self._last = self._flows[prefix] = _Flow({k: d[k] for k in keys[:at]}, prefix, tail)


def decode_message(d: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Turn a decoded envelope map into its typed message.

    :raises UnknownMessageTypeError: for a type tag this version does not know.
    :raises ProtocolError: when fields violate the schema or the limits.
    """
    cls = _TYPES.get(d["t"])
    if cls is None:
        raise UnknownMessageTypeError(d["t"])
    message: Message = cls.from_dict(d, limits)
    return message


def encode(message: Message) -> bytes:
    """Encode a message as a frame body (no length prefix)."""
    body: bytes = msgpack.packb(message.to_dict(), use_bin_type=True)
    return body


def encode_frame(message: Message | Mapping[str, Any]) -> bytes:
    """Encode a message, or an envelope map, as a complete frame with its length prefix."""
    d = message if type(message) is dict or isinstance(message, Mapping) \
        else message.to_dict()
    body: bytes = msgpack.packb(d, use_bin_type=True)
    return _PREFIX.pack(len(body)) + body


class FrameDecoder:
    """Split a byte stream, in any chunking, into complete frames.

    :meth:`feed` returns whole frames *including* their 4-byte prefix so that a
    relay can forward them unchanged; ``frame[4:]`` is the msgpack body. The
    returned objects are read-only views of immutable buffers.
    """

    __slots__ = ("_chunks", "_have", "_need", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_LIMITS.max_frame_size) -> None:
        self.max_frame_size = max_frame_size
        self._chunks: list[bytes] = []  # an incomplete frame, in pieces
        self._have = 0
        self._need = 0  # total size of the incomplete frame, once its prefix is known

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return self._have

    def feed(self, data: bytes) -> list[memoryview]:
        """Add received bytes; return every frame they complete.

        :raises FrameTooLargeError: as soon as a prefix announces too large a frame.
        """
        buf, bounds = self.feed_spans(data)
        view = memoryview(buf)
        return [view[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]

    def feed_spans(self, data: bytes) -> tuple[bytes, list[int]]:
        """Like :meth:`feed`, but return a buffer and frame boundaries.

        Frame ``i`` is ``buf[bounds[i]:bounds[i + 1]]``; frames are contiguous,
        so a relay can forward a run of them as one slice.
        """
        buf = self.prepare(data)
        if buf is None:
            return b"", [0]
        bounds = [0]
        append = bounds.append
        size = len(buf)
        pos = 0
        limit = self.max_frame_size
        unpack_from = _PREFIX.unpack_from
        while size - pos >= 4:
            length = unpack_from(buf, pos)[0]
            if length > limit:
                raise FrameTooLargeError(length, limit)
            end = pos + 4 + length
            if end > size:
                break
            append(end)
            pos = end
        self.keep(buf, pos)
        return buf, bounds

    def prepare(self, data: bytes) -> bytes | None:
        """Join ``data`` with a held incomplete frame.

        Returns a buffer that starts at a frame boundary, or ``None`` while the
        held frame is still incomplete. The caller walks the frames (checking
        each length against ``max_frame_size``) and hands the incomplete tail
        back with :meth:`keep`.

        :raises FrameTooLargeError: when a held prefix announces too large a frame.
        """
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._need == 0 and self._have >= 4:
                self._need = self._frame_size(b"".join(self._chunks)[:4], 0)
            if self._need == 0 or self._have < self._need:
                return None
            data = b"".join(self._chunks)
            self._chunks = []
            self._have = self._need = 0
        return data

    def keep(self, buf: bytes, pos: int) -> None:
        """Hold ``buf[pos:]`` (an incomplete frame) until more bytes arrive.

        :raises FrameTooLargeError: when its prefix announces too large a frame.
        """
        if pos < len(buf):
            rest = buf[pos:]
            self._chunks = [rest]
            self._have = len(rest)
            self._need = self._frame_size(rest, 0) if len(rest) >= 4 else 0

    def _frame_size(self, head: bytes, pos: int) -> int:
        length: int = _PREFIX.unpack_from(head, pos)[0]
        if length > self.max_frame_size:
            raise FrameTooLargeError(length, self.max_frame_size)
        return length + 4
