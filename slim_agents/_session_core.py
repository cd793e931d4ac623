# One session (sans-IO): point-to-point or group, moderator or participant.
#
# Invariants:
# * The moderator (the creator) alone changes membership, one operation at a
#   time: discovery -> join -> group update (existing members ack) ->
#   welcome (the new member acks). Members learn the roster only from the
#   moderator's signed-by-token control messages.
# * A point-to-point session is a group of two without a channel: data goes
#   to the peer's full name, and either side's close ends both.
# * Control messages are always retried (interval, retries) until answered;
#   replies and acks carry the request's message id. Duplicate requests get
#   the cached reply.
# * Data is best effort, or reliable when configured (see _reliability): one
#   stream per sender for messages to the group, one per (sender, recipient)
#   for directed messages.
# * Liveness (groups with heartbeats): the moderator pings the channel every
#   interval and each member answers it alone. Members silent for `misses`
#   intervals are offline: the moderator lists them in its pings, and every
#   sender stops waiting for them (reported "unreachable"). A member that stops
#   hearing the moderator for as long sees `moderator_lost`, then closes after a
#   grace period. Nothing of this touches the data path.
# * Inputs are frames (decoded maps) and `now`; outputs go through the owner
#   (frames to send, events); nothing here does I/O or reads a clock.
from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from node_lite import AuthenticationError, Name, NoRouteError
from node_lite.wire import SharedEnvelope, decode_frame, encode_frame

from ._config import SessionConfig, SessionKind
from ._e2e import E2EError
from ._errors import (
    DeliveryError,
    DeliveryTimeoutError,
    JoinFailedError,
    MessageLostError,
    NotModeratorError,
    ParticipantError,
    SessionClosedError,
    SessionError,
    SessionRejectedError,
    SessionTimeoutError,
)
from ._protocol import (
    MAX_ROSTER,
    META_LEAVING,
    META_PUBLISH_TO,
    TRUE,
    DataTemplate,
    Kind,
    Member,
    ProtocolViolation,
    SessionType,
    build_frame,
    decode_body,
    encode_body,
    int_of,
    member_of,
    members_of,
    name_of,
    ranges_of,
)
from ._reliability import ReceiveStream, SendStream, to_ranges
from ._reports import DeliveryReport, Message, MessageContext, Ticket
from ._session_e2e import (
    REFRESH_INTERVAL,
    REFRESH_MESSAGES,
    DecryptError,
    Encryption,
    SessionKeys,
    aad_head,
    aad_tail,
)

if TYPE_CHECKING:
    from ._app_core import AppCore

Key = tuple[Any, ...]
# Remembered answers to control requests, to answer retransmissions alike.
ANSWER_CACHE = 256
# Data frames a joining member keeps until its welcome arrives.
EARLY_FRAMES = 1024
# Members a moderator removed lately, told so again if they answer a heartbeat
# (they were unreachable when it happened).
REMEMBER_GONE = 256
_NO_METADATA: Mapping[str, str] = MappingProxyType({})
_NO_FAILURES: Mapping[Name, str] = MappingProxyType({})


class State(enum.Enum):
    CONNECTING = "connecting"  # initiator of a point-to-point session, handshake running
    JOINING = "joining"  # invited, waiting for the welcome
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


# Members the per-message paths compare with, as module globals: reading an enum
# class's attribute costs about five times more (Python 3.11).
_MSG, _RTX_REPLY = Kind.MSG, Kind.RTX_REPLY
_JOINING, _ESTABLISHED, _CLOSED = State.JOINING, State.ESTABLISHED, State.CLOSED


# -- events -----------------------------------------------------------------------------


@dataclass(slots=True)
class Established:
    session: SessionCore


@dataclass(slots=True)
class InboxReady:
    session: SessionCore


@dataclass(slots=True)
class Closed:
    session: SessionCore
    reason: str


@dataclass(slots=True)
class WindowOpen:
    session: SessionCore


@dataclass(slots=True)
class Unreachable:
    """The node found no route to the peer of a point-to-point session."""

    session: SessionCore


@dataclass(slots=True)
class RosterChanged:
    session: SessionCore
    added: tuple[Name, ...] = ()
    removed: tuple[Name, ...] = ()


@dataclass(slots=True)
class ModeratorLost:
    """A member stopped hearing the moderator (or heard it again: see ``moderator_lost``)."""

    session: SessionCore


@dataclass(slots=True)
class TicketDone:
    ticket: Ticket


class WindowFull(Exception):
    """The reliable send window is full: wait for WindowOpen, then publish again."""


@dataclass(slots=True)
class _Outgoing:
    payload: bytes
    payload_type: str | None
    metadata: Mapping[str, str] | None
    ticket: Ticket
    direct_to: Name | None = None


@dataclass(slots=True)
class _Control:
    mid: int
    frame: bytes
    kind: int
    waiting: set[Key] | None  # None: the first reply from anyone
    targets: dict[Key, list[Any]]  # where to resend (name wire per waiting member)
    deadline: float
    on_reply: Callable[[Key, dict[str, Any], Member | None], None]
    on_done: Callable[[], None]
    on_fail: Callable[[BaseException, set[Key]], None]
    attempts: int = 0
    multicast: list[Any] | None = None  # resend once to this name instead of per member
    frames: dict[Key, bytes] | None = None  # one frame per member (its own envelope)


# Builds a NamedTuple in C: their __new__ is a Python function, too dear per message.
_new = tuple.__new__


def _key(wire: list[Any]) -> Key:
    return (wire[0], wire[1], wire[2], wire[3])


def _take_acks(stream: ReceiveStream[Any], direct: bool, body: dict[str, Any]) -> None:
    """Add the acknowledgements ``stream`` owes to an ack ``body``."""
    mids = stream.take_acks()
    if mids:
        body["d" if direct else "a"] = to_ranges(mids)
        # Also all received so far: a later ack covers one that was lost.
        through = stream.received_through
        if through > 0:
            body["dt" if direct else "at"] = through


class SessionCore:
    """State of one session in one app."""

    def __init__(self, owner: AppCore, sid: int, config: SessionConfig, *,
                 initiator: bool, destination: Name, now: float) -> None:
        self.owner = owner
        self.sid = sid
        self.config = config
        self.kind = config.kind
        self.initiator = initiator
        self.group = config.kind is SessionKind.GROUP
        self.st = SessionType.GROUP if self.group else SessionType.POINT_TO_POINT
        self.local = owner.name
        self.local_wire = owner.name.to_wire()
        self.local_key = _key(self.local_wire)
        # A group's destination is its channel; a point-to-point one is the peer (pinned later).
        self.destination = destination
        self.channel: Name | None = destination if self.group else None
        self._channel_key = _key(destination.to_wire()) if self.group else None
        self.moderator: Member | None = Member(owner.name, owner.subject) if initiator else None
        self.members: dict[Key, Member] = {}
        if initiator:
            self.members[self.local_key] = Member(owner.name, owner.subject)
        self.state = State.CONNECTING if initiator and not self.group else (
            State.ESTABLISHED if initiator else State.JOINING)
        self.metadata: Mapping[str, str] = dict(config.metadata)
        self.close_reason: str | None = None
        self.inbox: deque[Message | BaseException] = deque()
        self.dropped = 0
        self._controls: dict[int, _Control] = {}
        self._answered: OrderedDict[tuple[Key, int], bytes] = OrderedDict()
        self._ops: deque[tuple[Callable[[float], None], Ticket]] = deque()
        self._op_running = False
        self._running: Ticket | None = None
        self._close_ticket: Ticket | None = None
        self._deadline: float | None = None  # joining: give up without a welcome
        self._early: list[dict[str, Any]] = []
        self._first_mid: dict[Key, int] = {}
        reliable = config.reliable
        self.reliable = reliable
        t, r = (config.timeout or 1.0), (config.max_retries or 0)
        self._send: SendStream[_Outgoing] | None = (
            SendStream(timeout=t, max_retries=r, window=config.window) if reliable else None)
        self._send_direct: dict[Key, SendStream[_Outgoing]] = {}
        self._recv: dict[Key, ReceiveStream[Message | BaseException]] = {}
        self._recv_direct: dict[Key, ReceiveStream[Message | BaseException]] = {}
        self._dirty_recv: set[tuple[Key, bool]] = set()
        self._next_mid = 1  # best-effort message ids
        self._window_waiting = False
        self.published = 0
        self.received = 0
        self.state_subscribed = False
        self._names_cache: tuple[Name, ...] | None = None
        self._template: DataTemplate | None = None
        self._peer_key: Key | None = None  # the peer of a point-to-point session
        if not initiator:
            self._deadline = now + config.control_interval * (config.control_retries + 1)
        # End-to-end encryption (mls_enabled): the group keys.
        self.keys: SessionKeys | None = None
        self._refresh_queued = False
        self._catchup: list[list[Any]] | None = None
        # Fixed parts of the associated data, per flow (see _session_e2e.aad_head).
        self._aad_send: bytes | None = None
        self._aad_recv: dict[tuple[Key, bool], bytes] = {}
        self._joiner = ""
        # Liveness (see the module comment). `_hb_at` is the next heartbeat of a
        # moderator, or when a member gives up on hearing the moderator.
        self._hb_at: float | None = None
        self._hb_seq = 0
        self._heard: dict[Key, float] = {}
        self._gone: OrderedDict[Key, float] = OrderedDict()
        self._reported_off: set[Name] = set()  # a member: what the moderator's pings say
        self._leaving: set[Key] = set()  # moderator: members that left, removal pending
        #: Members this side does not wait for (publishes report them unreachable).
        self.offline: frozenset[Name] = frozenset()
        self.moderator_lost = False
        if initiator and config.heartbeats:
            assert config.heartbeat_interval is not None
            self._hb_at = now + config.heartbeat_interval
        if config.mls_enabled:
            self.keys = SessionKeys(
                owner.signing, owner.identity_of, window=config.window, now=now,
                sender_auth=config.sender_auth or ("signature" if self.group else "group"))
            if initiator:
                self.keys.create(owner.token(), owner.subject, now)

    # -- properties ----------------------------------------------------------------------

    @property
    def peer(self) -> Name | None:
        """The other side of a point-to-point session, once known."""
        if self.group:
            return None
        for key, m in self.members.items():
            if key != self.local_key:
                return m.name
        return None

    @property
    def is_moderator(self) -> bool:
        return self.moderator is not None and self.moderator.name == self.local

    @property
    def roster(self) -> list[Name]:
        return [m.name for m in self.members.values()]

    @property
    def encryption(self) -> Encryption | None:
        """The end-to-end encryption state, when on and established."""
        return self.keys.info() if self.keys is not None else None

    def _control_dst(self) -> tuple[list[Any], int]:
        # Group updates go to the channel; in a point-to-point session, to the peer.
        if self.group:
            assert self.channel is not None
            return self.channel.to_wire(), 2
        peer = self.peer
        assert peer is not None
        return peer.to_wire(), 1

    def _recipients(self) -> list[Key]:
        return [k for k in self.members if k != self.local_key]

    def _data_dst(self) -> tuple[list[Any], int]:
        if self.group:
            assert self.channel is not None
            return self.channel.to_wire(), 2
        peer = self.peer
        assert peer is not None
        return peer.to_wire(), 1

    # -- sending helpers -------------------------------------------------------------------

    def _frame(self, dst: list[Any], kind: int, mid: int, *, fanout: int = 1, body: bytes = b"",
               metadata: Mapping[str, str] | None = None, payload_type: str | None = None,
               control: bool = True, error: bool = False, ack: bytes | None = None) -> bytes:
        return build_frame(self.local_wire, dst, fanout=fanout, sid=self.sid, st=self.st,
                           kind=kind, mid=mid, body=body, payload_type=payload_type,
                           metadata=metadata, identity=self.owner.token() if control else None,
                           error=error, ack=ack)

    def _control(self, kind: int, dst: list[Any], body: Mapping[str, Any], now: float, *,
                 waiting: Iterable[Key] | None, on_reply: Callable[..., None],
                 on_done: Callable[[], None], on_fail: Callable[[BaseException, set[Key]], None],
                 fanout: int = 1, metadata: Mapping[str, str] | None = None,
                 bodies: Mapping[Key, Mapping[str, Any]] | None = None) -> None:
        """Send a control request and retry it until answered.

        ``bodies`` sends each waiting member its own body (unicast, one message id).
        """
        if self.state is State.CLOSED:
            return  # an operation continuing after the session closed: nothing to send
        mid = self.owner.random_mid()
        wait = None if waiting is None else set(waiting)
        targets = {k: self.members[k].name.to_wire() for k in (wait or ()) if k in self.members}
        frames = None
        if bodies is not None:
            assert wait is not None
            frames = {k: self._frame(targets.get(k, list(k)), kind, mid,
                                     body=encode_body(bodies.get(k, body)), metadata=metadata)
                      for k in wait}
            frame = b""
        else:
            frame = self._frame(dst, kind, mid, fanout=fanout, body=encode_body(body),
                                metadata=metadata)
        c = _Control(mid, frame, kind, wait, targets, now + self.config.control_interval,
                     on_reply, on_done, on_fail,
                     multicast=dst if fanout > 1 and frames is None else None, frames=frames)
        if wait is not None and not wait:
            on_done()
            return
        self._controls[mid] = c
        if frames is not None:
            for f in frames.values():
                self.owner.send(f)
        else:
            self.owner.send(frame)

    def _reply(self, d: dict[str, Any], kind: int, body: Mapping[str, Any] | None = None, *,
               error: bool = False, metadata: Mapping[str, str] | None = None) -> None:
        frame = self._frame(d["src"], kind, d["mid"], body=encode_body(body or {}),
                            error=error, metadata=metadata)
        self._remember_answer(d, frame)
        self.owner.send(frame)

    def _remember_answer(self, d: dict[str, Any], frame: bytes) -> None:
        self._answered[(_key(d["src"]), d["mid"])] = frame
        while len(self._answered) > ANSWER_CACHE:
            self._answered.popitem(last=False)

    def _answered_before(self, d: dict[str, Any]) -> bool:
        frame = self._answered.get((_key(d["src"]), d["mid"]))
        if frame is not None:
            self.owner.send(frame)
            return True
        return False

    # -- public operations -----------------------------------------------------------------

    def _roster_changed(self) -> None:
        self._names_cache = None
        self._template = None
        self._aad_send = None
        self._aad_recv.clear()

    def _recipient_names(self) -> tuple[Name, ...]:
        names = self._names_cache
        if names is None:
            names = self._names_cache = tuple(
                m.name for k, m in self.members.items() if k != self.local_key)
        return names

    def publish(self, payload: bytes, now: float, *, payload_type: str | None = None,
                metadata: Mapping[str, str] | None = None, to: Name | None = None) -> Ticket:
        """Send a message to the group (or the peer), or to one member with ``to``.

        :raises SessionClosedError: when the session is closed.
        :raises WindowFull: when the reliable window is full (retry after WindowOpen).
        """
        if self.state is not _ESTABLISHED:
            self._check_open()
            raise SessionClosedError(self.sid, "not established")
        if to is not None and self.group:
            return self._publish_direct(payload, now, payload_type, metadata, to)
        stream = self._send
        if stream is not None:
            if not stream.has_room():
                self._window_waiting = True
                raise WindowFull
            mid = stream.allocate()
        else:
            mid = self._next_mid
            self._next_mid += 1
        keys = self.keys
        if keys is not None:
            head = self._aad_send
            if head is None:
                head = self._aad_send = aad_head(self.local_wire, self._data_dst()[0],
                                                 self.sid, self.st)
            payload = keys.encrypt(payload, head + aad_tail(mid, payload_type, metadata))
            if keys.messages >= REFRESH_MESSAGES:
                self._queue_refresh(now)
        template = self._template
        if template is None:
            dst, fanout = self._data_dst()
            template = self._template = DataTemplate(
                self.local_wire, dst, fanout=fanout, sid=self.sid, st=self.st, kind=Kind.MSG)
            self._peer_key = None if self.group else _key(dst)
        peer = self._peer_key
        ack = self._acks_for(peer) if peer is not None and self._dirty_recv else None
        self.owner.send(template.frame(mid, payload, payload_type, metadata, ack))
        self.published += 1
        names = self._names_cache or self._recipient_names()
        if stream is None:
            return Ticket("publish", _new(DeliveryReport, (mid, names, _NO_FAILURES, False)))
        ticket = Ticket("publish")
        meta = dict(metadata) if metadata else None
        offline = self.offline
        p = stream.track(mid, _Outgoing(payload, payload_type, meta, ticket), len(payload) + 64,
                         names, now, offline)
        if p is None:
            ticket.resolve(DeliveryReport(mid, (), reliable=True))
        elif offline and not p.waiting:
            self._complete(p)
        return ticket

    def _publish_direct(self, payload: bytes, now: float, payload_type: str | None,
                        metadata: Mapping[str, str] | None, to: Name) -> Ticket:
        key = _key(to.to_wire())
        if key not in self.members or key == self.local_key:
            raise ParticipantError(f"{to} is not another member of this session",
                                   session_id=self.sid)
        meta = dict(metadata or {})
        meta[META_PUBLISH_TO] = TRUE
        stream = self._send_direct.get(key) if self.reliable else None
        if self.reliable and stream is None:
            assert self._send is not None
            stream = self._send_direct[key] = SendStream(
                timeout=self._send.timeout, max_retries=self._send.max_retries,
                window=self._send.window)
        if stream is not None and not stream.has_room():
            self._window_waiting = True
            raise WindowFull
        if stream is not None:
            mid = stream.allocate()
        else:
            mid = self._next_mid
            self._next_mid += 1
        keys = self.keys
        if keys is not None:
            payload = keys.encrypt(payload, aad_head(self.local_wire, list(key), self.sid,
                                                     self.st) + aad_tail(mid, payload_type, meta))
        self.owner.send(self._frame(list(key), Kind.MSG, mid, fanout=1, body=payload,
                                    metadata=meta, payload_type=payload_type, control=False,
                                    ack=self._acks_for(key)))
        self.published += 1
        name = self.members[key].name
        ticket = Ticket("publish")
        if stream is None:
            ticket.resolve(DeliveryReport(mid, (name,), reliable=False))
            return ticket
        p = stream.track(mid, _Outgoing(payload, payload_type, meta, ticket, direct_to=name),
                         len(payload) + 64, (name,), now, self.offline)
        if p is not None and not p.waiting:
            self._complete(p)
        return ticket

    def invite(self, name: Name, now: float) -> Ticket:
        """Add a participant (moderator of a group only); the ticket resolves once all share it."""
        self._check_open()
        if not self.group:
            raise ParticipantError("cannot invite into a point-to-point session",
                                   session_id=self.sid)
        if not self.is_moderator:
            raise NotModeratorError("only the moderator can invite", session_id=self.sid)
        if name.without_id() == self.local.without_id() and name.id in (None, self.local.id):
            raise ParticipantError("a session cannot invite itself", session_id=self.sid)
        ticket = Ticket("invite")
        self._queue(lambda t: self._invite_step_discover(name, ticket, t), ticket, now)
        return ticket

    def start_point_to_point(self, now: float) -> Ticket:
        """Begin the handshake of a point-to-point session with ``destination``."""
        ticket = Ticket("create")
        self._queue(lambda t: self._invite_step_discover(self.destination, ticket, t), ticket,
                    now)
        return ticket

    def remove(self, name: Name, now: float) -> Ticket:
        """Remove a participant (moderator only); the ticket resolves when it has left."""
        self._check_open()
        if not self.group:
            raise ParticipantError("cannot remove from a point-to-point session",
                                   session_id=self.sid)
        if not self.is_moderator:
            raise NotModeratorError("only the moderator can remove", session_id=self.sid)
        key = self._find_member(name)
        if key is None:
            raise ParticipantError(f"participant not found in group: {name}",
                                   session_id=self.sid)
        if key == self.local_key:
            raise ParticipantError("the moderator cannot remove itself; close the session",
                                   session_id=self.sid)
        ticket = Ticket("remove")
        self._queue(lambda t: self._remove_step_update(key, ticket, t, notify=True), ticket, now)
        return ticket

    def close(self, now: float) -> Ticket:
        """Close the session: members are told; the ticket resolves when they answered."""
        if self._close_ticket is not None:
            return self._close_ticket
        ticket = self._close_ticket = Ticket("close")
        if self.state is State.CLOSED:
            ticket.fail(SessionClosedError(self.sid, self.close_reason or "closed"))
            return ticket
        if self.state in (State.CONNECTING, State.JOINING):
            self._finish_close("closed", now)
            ticket.resolve(None)
            return ticket
        self.state = State.CLOSING
        others = self._recipients()
        if not others or (self.group and self.moderator_lost):
            # nobody to tell (or nobody answering): closing needs no goodbye
            self._finish_close("closed", now)
            ticket.resolve(None)
            return ticket
        if self.group and self.is_moderator:
            assert self.channel is not None
            body = {"roster": [m.to_wire() for m in self.members.values()]}
            # Offline members (and members on their way out) are not waited for.
            online = [k for k in others if self.members[k].name not in self.offline
                      and k not in self._leaving]
            if not online:
                self.owner.send(self._frame(self.channel.to_wire(), Kind.GROUP_CLOSE,
                                            self.owner.random_mid(), fanout=2,
                                            body=encode_body(body)))
                self._finish_close("closed", now)
                return ticket
            self._control(Kind.GROUP_CLOSE, self.channel.to_wire(), body, now,
                          waiting=online, fanout=2, on_reply=lambda *a: None,
                          on_done=lambda: self._closed_after_ack(ticket),
                          on_fail=lambda e, w: self._closed_after_ack(ticket))
            return ticket
        # A point-to-point side, or a member leaving a group: tell the other side first.
        target = others[0] if not self.group else (
            _key(self.moderator.name.to_wire()) if self.moderator else others[0])
        self._control(Kind.LEAVE_REQUEST, list(target), {}, now, waiting=[target],
                      metadata={META_LEAVING: TRUE}, on_reply=lambda *a: None,
                      on_done=lambda: self._closed_after_ack(ticket),
                      on_fail=lambda e, w: self._closed_after_ack(ticket))
        return ticket

    def _closed_after_ack(self, ticket: Ticket) -> None:
        self._finish_close("closed", None)  # resolves the close ticket

    def _check_open(self) -> None:
        if self.state in (State.CLOSING, State.CLOSED):
            raise SessionClosedError(self.sid, self.close_reason or "closed")

    def _find_member(self, name: Name) -> Key | None:
        if name.id is not None:
            key = _key(name.to_wire())
            return key if key in self.members else None
        matches = [k for k, m in self.members.items() if m.name.without_id() == name]
        return matches[0] if len(matches) == 1 else None

    # -- membership operations (moderator) -------------------------------------------------

    def _queue(self, op: Callable[[float], None], ticket: Ticket, now: float) -> None:
        self._ops.append((op, ticket))
        if not self._op_running:
            self._next_op(now)

    def _next_op(self, now: float) -> None:
        self._op_running = False
        self._running = None
        if self._ops and self.state not in (State.CLOSING, State.CLOSED):
            self._op_running = True
            op, ticket = self._ops.popleft()
            self._running = ticket
            op(now)

    def _op_done(self, ticket: Ticket, result: Any, now: float) -> None:
        if self.state is State.CLOSED:
            return
        ticket.resolve(result)
        self.owner.emit(TicketDone(ticket))
        self._next_op(now)

    def _op_failed(self, ticket: Ticket, error: BaseException, now: float) -> None:
        if self.state is State.CLOSED:
            return
        ticket.fail(error)
        self.owner.emit(TicketDone(ticket))
        if not self.group and self.state is State.CONNECTING:
            self._finish_close("handshake failed", now)
            return
        self._next_op(now)

    def _invite_step_discover(self, name: Name, ticket: Ticket, now: float) -> None:
        if self.state in (State.CLOSING, State.CLOSED):
            self._op_failed(ticket, SessionClosedError(self.sid, "closed"), now)
            return
        if name.id is not None:
            if _key(name.to_wire()) in self.members:
                self._op_failed(ticket, ParticipantError(f"participant already in group: {name}",
                                                         session_id=self.sid), now)
                return
            self._invite_step_join(name, ticket, now)
            return
        found: list[Name] = []

        def on_reply(key: Key, d: dict[str, Any], member: Member | None) -> None:
            if d.get("err"):
                raise _Rejected(d)
            found.append(name_of(d["src"], "src"))

        def on_done() -> None:
            self._invite_step_join(found[0], ticket, self._now)

        self._control(Kind.DISCOVERY_REQUEST, name.to_wire(), {}, now, waiting=None,
                      on_reply=on_reply, on_done=on_done,
                      on_fail=lambda e, w: self._op_failed(ticket, e, self._now))

    def _invite_step_join(self, target: Name, ticket: Ticket, now: float) -> None:
        key = _key(target.to_wire())
        if key in self.members:
            self._op_failed(ticket, ParticipantError(f"participant already in group: {target}",
                                                     session_id=self.sid), now)
            return
        body: dict[str, Any] = {"st": int(self.st), "mod": self.local_wire}
        if self.channel is not None:
            body["ch"] = self.channel.to_wire()
        if self.config.reliable:
            assert self.config.timeout is not None
            assert self.config.max_retries is not None
            body["rel"] = [int(self.config.timeout * 1000), self.config.max_retries]
        if self.config.heartbeats:
            cfg = self.config
            assert cfg.heartbeat_interval is not None
            body["hb"] = [round(cfg.heartbeat_interval * 1000), cfg.heartbeat_misses,
                          max(1, round(cfg.moderator_grace * 1000))]
        if self.keys is not None:
            body["mls"] = self.keys.join_body()
        joined: list[tuple[Member, object]] = []

        def on_reply(k: Key, d: dict[str, Any], member: Member | None) -> None:
            if d.get("err"):
                raise _Rejected(d)
            assert member is not None
            joined.append((member, decode_body(d.get("body", b"")).get("kp")))

        def on_done() -> None:
            self._invite_step_update(joined[0][0], joined[0][1], ticket, self._now)

        self._control(Kind.JOIN_REQUEST, target.to_wire(), body, now, waiting=None,
                      metadata=self.config.metadata or None, on_reply=on_reply,
                      on_done=on_done, on_fail=lambda e, w: self._op_failed(ticket, e, self._now))

    def _invite_step_update(self, member: Member, key_package: object, ticket: Ticket,
                            now: float) -> None:
        keys = self.keys
        commit = welcome = None
        if keys is not None:
            try:
                commit, welcome = keys.add(key_package, member.subject, now)
            except E2EError as exc:
                self.owner.count(f"e2e:{exc.code}")
                error = JoinFailedError(member.name, exc.code, str(exc), session_id=self.sid)
                error.__cause__ = exc
                self._op_failed(ticket, error, now)
                return
            # Commits made before the welcome goes out (removing members that failed
            # this update) are sent along with it.
            self._catchup = []
            self._joiner = member.subject
        existing = [k for k in self.members if k != self.local_key]
        next_mids: dict[Key, int] = {}
        if self._send is not None:
            next_mids[self.local_key] = self._send.next_mid

        def to_welcome() -> None:
            self._invite_step_welcome(member, welcome, next_mids, ticket, self._now)

        body: dict[str, Any] = {"op": "add", "who": member.to_wire()}
        if commit is not None:
            body["mls"] = [commit]

        def on_ack(k: Key, d: dict[str, Any]) -> None:
            ack = decode_body(d.get("body", b""))
            if "next" in ack:
                next_mids[k] = int_of(ack["next"], "next", 1)

        # Members that never acknowledged, or hold other keys, are removed; then go on.
        self._update(body, now, waiting=existing, on_ack=on_ack,
                     then=lambda bad: self._purge(bad, self._now, then=to_welcome))

    def _update(self, body: dict[str, Any], now: float, *, waiting: list[Key],
                then: Callable[[set[Key]], None],
                bodies: Mapping[Key, Mapping[str, Any]] | None = None,
                skip: Iterable[Key] = (),
                on_ack: Callable[[Key, dict[str, Any]], None] | None = None) -> None:
        """Send a group update and collect the acks of ``waiting``.

        ``then`` gets the members that refused it, reached another epoch or never
        answered (members in ``skip``, being removed, are not judged by their ack).
        """
        keys = self.keys
        expected = keys.state.epoch_authenticator if keys is not None and keys.state else None
        skipped = set(skip)
        bad: set[Key] = set()

        def on_reply(k: Key, d: dict[str, Any], m: Member | None) -> None:
            if k in skipped:
                return
            if self._diverged(d, expected):
                bad.add(k)
            elif on_ack is not None:
                on_ack(k, d)

        if self._leaving:
            waiting = [k for k in waiting if k not in self._leaving]  # closed already
        if not waiting:
            then(set())
            return
        dst, fanout = self._control_dst()
        self._control(Kind.GROUP_UPDATE, dst, body, now, waiting=waiting, fanout=fanout,
                      on_reply=on_reply, on_done=lambda: then(bad),
                      on_fail=lambda error, missing: then(bad | missing), bodies=bodies)

    def _diverged(self, d: dict[str, Any], expected: bytes | None) -> bool:
        """An update's ack from a member that refused it or reached another epoch."""
        if d.get("err") or d["k"] == Kind.GROUP_NACK:
            self.owner.count("update_refused")
            return True
        if expected is not None and decode_body(d.get("body", b"")).get("auth") != expected:
            self.owner.count("epoch_auth_mismatch")
            return True
        return False

    def _invite_step_welcome(self, member: Member, welcome: bytes | None,
                             next_mids: dict[Key, int], ticket: Ticket, now: float) -> None:
        key = _key(member.name.to_wire())
        roster = [*self.members.values(), member]
        body: dict[str, Any] = {"roster": [m.to_wire() for m in roster],
                                "next": [[list(k), n] for k, n in next_mids.items()]}
        expected = None
        if welcome is not None:
            assert self.keys is not None
            assert self.keys.state is not None
            body["mls"] = welcome
            if self._catchup:
                body["mls_next"] = self._catchup
            expected = self.keys.state.epoch_authenticator
        self._catchup = None

        def on_reply(k: Key, d: dict[str, Any], m: Member | None) -> None:
            if self._diverged(d, expected):
                raise _Rejected(d)

        def on_done() -> None:
            self.members[key] = member
            self._roster_changed()
            self._heard[key] = self._now
            self._gone.pop(key, None)
            if not self.group:
                self.destination = member.name
                self.state = State.ESTABLISHED
                self.owner.emit(Established(self))
            else:
                self.owner.emit(RosterChanged(self, added=(member.name,)))
            self._op_done(ticket, member.name, self._now)

        def on_fail(error: BaseException, missing: set[Key]) -> None:
            if isinstance(error, SessionRejectedError) and \
                    not isinstance(error, JoinFailedError):
                failed = JoinFailedError(error.name, error.code, error.detail,
                                         session_id=self.sid)
                failed.__cause__ = error
                error = failed
            # The members (and the group keys) already count the invitee: take it back out.
            if self.group:
                self._remove_members([member], self._now, ack_from_gone=False,
                                     then=lambda: self._op_failed(ticket, error, self._now))
            else:
                self._op_failed(ticket, error, self._now)

        self._control(Kind.GROUP_WELCOME, member.name.to_wire(), body, now, waiting=None,
                      on_reply=on_reply, on_done=on_done, on_fail=on_fail)

    def _remove_step_update(self, key: Key, ticket: Ticket, now: float, *, notify: bool,
                            reason: str = "removed") -> None:
        member = self.members.get(key)
        if member is None or (reason == "unreachable" and member.name not in self.offline):
            self._op_done(ticket, None, now)  # gone already, or back in the meantime
            return

        def after_update() -> None:
            if notify:
                self._control(Kind.LEAVE_REQUEST, member.name.to_wire(), {}, self._now,
                              waiting=[key], on_reply=lambda *a: None,
                              on_done=lambda: self._op_done(ticket, member.name, self._now),
                              on_fail=lambda e, w: self._op_done(ticket, member.name,
                                                                 self._now))
            else:
                self._op_done(ticket, member.name, self._now)

        self._remove_members([member], now, ack_from_gone=notify, then=after_update,
                             reason=reason)

    def _purge(self, keys: set[Key], now: float, *, then: Callable[[], None]) -> None:
        """Remove members that stopped answering or fell out of step, and tell them so."""
        gone = [self.members[k] for k in keys if k in self.members and k != self.local_key]
        if not gone:
            then()
            return
        for m in gone:
            # Not tracked: the member may be unreachable; if it is there, it closes.
            self.owner.send(self._frame(m.name.to_wire(), Kind.LEAVE_REQUEST,
                                        self.owner.random_mid()))
        self._remove_members(gone, now, ack_from_gone=False, then=then, reason="unreachable")

    def _remove_members(self, gone: list[Member], now: float, *, ack_from_gone: bool,
                        then: Callable[[], None], reason: str = "removed") -> None:
        """Take members out of the roster (and of the group keys, with a commit).

        The other members acknowledge the update; with ``ack_from_gone`` the
        removed members too. Members that fail to are removed next, then ``then`` runs.
        """
        gone_keys = {_key(m.name.to_wire()) for m in gone}
        others = [k for k in self.members if k != self.local_key and k not in gone_keys]
        body: dict[str, Any] = {"op": "remove", "gone": [m.to_wire() for m in gone]}
        if reason == "unreachable":
            body["why"] = reason  # members report it so too
        bodies = self._commit_bodies(body, others, now, [m.subject for m in gone])
        waiting = others + [k for k in gone_keys if ack_from_gone and k in self.members]

        def finish(bad: set[Key]) -> None:
            for k in gone_keys:
                self._drop_member(k, reason, self._now)
            self._purge(bad - gone_keys, self._now, then=then)

        self._update(body, now, waiting=waiting, bodies=bodies, skip=gone_keys, then=finish)

    def _commit_bodies(self, body: dict[str, Any], others: list[Key], now: float,
                       removed: list[str] | None) -> dict[Key, dict[str, Any]] | None:
        """Commit the removal of ``removed`` (or a refresh, with None) into ``body``.

        Returns a body per member when the envelopes travel one per member.
        """
        keys = self.keys
        if keys is None or keys.state is None:
            return None
        state = keys.state
        commits: list[bytes] = []
        envelopes: list[dict[str, bytes]] = []
        if removed is None:
            commit, envs = state.refresh(now)
            commits.append(commit)
            envelopes.append(envs)
        else:
            inside = keys.subjects()
            for subject in removed:
                if subject in inside:
                    commit, envs = state.remove(subject, now)
                    commits.append(commit)
                    envelopes.append(envs)
        if not commits:
            return None
        keys.refreshed_at, keys.messages = now, 0  # a remove is a refresh too
        if self._catchup is not None:
            self._catchup += [[c, e.get(self._joiner)] for c, e in zip(commits, envelopes,
                                                                       strict=True)]
        body["mls"] = commits
        if not any(envelopes):
            return None
        return {k: {**body, "env": [e.get(self.members[k].subject) for e in envelopes]}
                for k in others}

    # -- key refresh -----------------------------------------------------------------------

    def rotate_keys(self, now: float, *, suspect: bool = False) -> Ticket:
        """Start a new epoch from fresh secrets (moderator), or send this member's new
        envelope key to the moderator for the next one (``suspect``: refresh at once)."""
        self._check_open()
        if self.keys is None or self.keys.state is None:
            raise SessionError("this session is not end-to-end encrypted",
                               session_id=self.sid)
        if self.is_moderator:
            return self._queue_refresh(now) or Ticket("refresh")
        ticket = Ticket("rotate")
        self._send_key_update(now, suspect=suspect, ticket=ticket)
        return ticket

    def _queue_refresh(self, now: float) -> Ticket | None:
        if not self.is_moderator or self._refresh_queued or self.state is not State.ESTABLISHED:
            return None
        self._refresh_queued = True
        ticket = Ticket("refresh")
        self._queue(lambda t: self._refresh_step(ticket, t), ticket, now)
        # Its deadlines, when a publish started it: the driver expects none from one.
        self.owner.timers_changed(self)
        return ticket

    def _refresh_step(self, ticket: Ticket, now: float) -> None:
        self._refresh_queued = False
        others = self._recipients()
        if self.keys is None or self.keys.state is None or not others:
            if self.keys is not None:
                self.keys.refreshed_at, self.keys.messages = now, 0
            self._op_done(ticket, None, now)
            return
        body: dict[str, Any] = {"op": "refresh"}
        bodies = self._commit_bodies(body, others, now, None)
        self._update(body, now, waiting=others, bodies=bodies,
                     then=lambda bad: self._purge(
                         bad, self._now, then=lambda: self._op_done(ticket, None, self._now)))

    def _send_key_update(self, now: float, *, suspect: bool = False,
                         ticket: Ticket | None = None) -> None:
        keys, moderator = self.keys, self.moderator
        if keys is None or keys.state is None or keys.state.removed or moderator is None:
            return
        target = _key(moderator.name.to_wire())

        def done() -> None:
            if ticket is not None and ticket.resolve(None):
                self.owner.emit(TicketDone(ticket))

        def failed(error: BaseException, missing: set[Key]) -> None:
            if ticket is not None and ticket.fail(error):
                self.owner.emit(TicketDone(ticket))

        def on_reply(k: Key, d: dict[str, Any], m: Member | None) -> None:
            self._check_ack(d)

        self._control(Kind.GROUP_PROPOSAL, list(target),
                      {"kupd": keys.state.key_update(suspect=suspect)}, now, waiting=[target],
                      on_reply=on_reply, on_done=done, on_fail=failed)

    def _check_ack(self, d: dict[str, Any]) -> None:
        if d.get("err") or d["k"] == Kind.GROUP_NACK:
            raise _Rejected(d)

    def _drop_member(self, key: Key, reason: str, now: float) -> None:
        member = self.members.pop(key, None)
        if member is None:
            return
        self._roster_changed()
        if member.name in self.offline:
            self.offline = self.offline - {member.name}
        self._reported_off.discard(member.name)
        self._heard.pop(key, None)
        self._leaving.discard(key)
        if self.is_moderator:
            self._gone[key] = now
            while len(self._gone) > REMEMBER_GONE:
                self._gone.popitem(last=False)
        self._recv.pop(key, None)
        self._recv_direct.pop(key, None)
        done = []
        if self._send is not None:
            done += self._send.drop_recipient(member.name, reason)
        stream = self._send_direct.pop(key, None)
        if stream is not None:
            done += stream.drop_recipient(member.name, reason)
        for c in self._controls.values():
            if c.waiting is not None and key in c.waiting:
                c.waiting.discard(key)
        for p in done:
            self._complete(p)
        # A control that was waiting only for this member is now complete.
        for mid, c in list(self._controls.items()):
            if c.waiting is not None and not c.waiting and \
                    self._controls.pop(mid, None) is not None:
                c.on_done()
        self.owner.emit(RosterChanged(self, removed=(member.name,)))
        self._window_check()

    # -- input -----------------------------------------------------------------------------

    _now: float = 0.0

    def handle_frame(self, d: dict[str, Any], now: float) -> None:
        """Process one publish addressed to this session."""
        self._now = now
        kind = d["k"]
        src_key = tuple(d["src"])  # _key in C: check_publish saw a list of four
        if kind == _MSG or kind == _RTX_REPLY:
            member = self.members.get(src_key)
            state = self.state
            if state is _JOINING:
                if len(self._early) < EARLY_FRAMES:
                    self._early.append(d)
                return
            if member is None or state is _CLOSED or src_key == self.local_key:
                if member is None and src_key != self.local_key:
                    self.owner.count("data_from_non_member")
                return  # not (or no longer) a member
            if kind == _RTX_REPLY and d.get("err"):
                self._on_rtx_gone(src_key, d, now)
                return
            ack = d.get("ack")
            if ack is not None:
                if type(ack) is not bytes:
                    raise ProtocolViolation("ack: expected an encoded ack body")
                self._apply_acks(src_key, decode_body(ack), now)
            self._on_data(d, src_key, member, now)
            return
        if kind == Kind.MSG_ACK:
            self._on_ack(src_key, d, now)
            return
        if kind == Kind.RTX_REQUEST:
            self._on_rtx_request(src_key, d, now)
            return
        if kind == Kind.HEARTBEAT:
            self._on_heartbeat(src_key, d, now)
            return
        if kind in (Kind.DISCOVERY_REPLY, Kind.JOIN_REPLY, Kind.GROUP_ACK, Kind.GROUP_NACK,
                    Kind.LEAVE_REPLY):
            self._on_control_reply(src_key, d, now)
            return
        if kind in (Kind.GROUP_UPDATE, Kind.GROUP_WELCOME, Kind.GROUP_CLOSE,
                    Kind.LEAVE_REQUEST, Kind.GROUP_PROPOSAL):
            if self._answered_before(d):
                return
            member = self._verify(d)
            if member is None:
                return
            if kind == Kind.LEAVE_REQUEST:
                self._on_leave_request(d, member, now)
            elif kind == Kind.GROUP_PROPOSAL:
                self._on_proposal(d, member, now)
            elif not self._from_moderator(d):
                self._reply(d, Kind.GROUP_NACK, {"code": "not_moderator"}, error=True)
            elif kind == Kind.GROUP_WELCOME:
                self._on_welcome(d, now)
            elif kind == Kind.GROUP_UPDATE:
                self._on_update(d, now)
            else:
                self._on_group_close(d, now)

    def _verify(self, d: dict[str, Any]) -> Member | None:
        try:
            subject = self.owner.verify(d.get("id"), d["src"])
        except AuthenticationError as exc:
            self.owner.count("unauthenticated")
            self._reply(d, Kind.GROUP_NACK, {"code": "unauthenticated", "msg": exc.reason},
                        error=True)
            return None
        return Member(name_of(d["src"], "src"), subject)

    def _from_moderator(self, d: dict[str, Any]) -> bool:
        return self.moderator is not None and _key(d["src"]) == _key(
            self.moderator.name.to_wire())

    # -- data ------------------------------------------------------------------------------

    def _on_data(self, d: dict[str, Any], src_key: Key, member: Member, now: float) -> None:
        meta = d.get("meta")
        if meta:
            direct = meta.get(META_PUBLISH_TO) == TRUE
        else:
            direct = False
            meta = _NO_METADATA
        inbox = self.inbox
        if len(inbox) >= 2 * self.config.max_inbox:
            # Hard cap (the reader stopped waiting for the application): best
            # effort drops; reliable leaves the message unacknowledged, so it is resent.
            self.dropped += 1
            return
        if self.reliable:
            streams = self._recv_direct if direct else self._recv
            stream = streams.get(src_key) or self._new_recv_stream(streams, src_key, direct)
        else:
            stream = None
        body = d.get("body", b"")
        if self.keys is not None:
            body = self._open(d, stream, src_key, member, meta, direct, now)
            if body is None:
                return
        dst = self.channel if self.group and not direct else self.local
        # A group frame shared by the apps of this loop makes one (immutable) message
        # for all of them: a copy per member would be garbage the collector walks.
        shared = d if type(d) is SharedEnvelope and dst is self.channel and self.keys is None \
            else None
        memo = None if shared is None else shared.memo
        if memo and memo[0] == self._channel_key and memo[1].context.identity == member.subject:
            message = memo[1]
        else:
            message = _new(Message, (_new(MessageContext, (
                member.name, dst, d.get("pt") or "msg", meta, self.sid, d["mid"],
                member.subject, 0, direct)), body))
            if shared is not None and memo is not None:  # other apps read this map too
                shared.memo = (self._channel_key, message)
        if stream is not None:
            if stream.take_next(d["mid"]):
                items = None  # in order: delivered below, as without reliability
            else:
                items = stream.receive(d["mid"], message, now)
                if items is None:
                    return
            if len(stream.to_ack) == 1:  # the first since the last ack went out
                self._dirty_recv.add((src_key, direct))
                self.owner.mark_dirty(self)
            if items is not None:
                if items:
                    self._deliver(items)
                return
        inbox.append(message)
        self.received += 1
        self.owner.inbox_ready(self)
        if len(inbox) >= self.config.max_inbox:
            self.owner.congested(self)

    def _new_recv_stream(self, streams: dict[Key, ReceiveStream[Message | BaseException]],
                         src_key: Key, direct: bool) -> ReceiveStream[Message | BaseException]:
        """The receive stream of a sender's first message (its first id as announced)."""
        assert self._send is not None
        first = 1 if direct else self._first_mid.pop(src_key, 1)
        stream: ReceiveStream[Message | BaseException] = ReceiveStream(
            timeout=self._send.timeout, max_retries=self._send.max_retries, first=first)
        streams[src_key] = stream
        return stream

    def _open(self, d: dict[str, Any], stream: ReceiveStream[Message | BaseException] | None,
              src_key: Key, member: Member, meta: Mapping[str, str], direct: bool, now: float,
              ) -> bytes | None:
        """Decrypt a member's message. None: it was held, dropped or replaced by an error."""
        keys = self.keys
        assert keys is not None
        mid = d["mid"]
        if stream is not None and mid != stream.next:  # the next one is new, with room
            if stream.seen(mid):
                return b""  # a duplicate: the stream acknowledges it again, nothing to open
            if not stream.has_room(mid):
                return None  # refused unopened (a key is used once), so the retry can open it
        heads = self._aad_recv
        head = heads.get((src_key, direct))
        if head is None:
            dst = self.local_wire if direct or not self.group else self._data_dst()[0]
            head = heads[(src_key, direct)] = aad_head(list(src_key), dst, self.sid, self.st)
        aad = head + aad_tail(mid, d.get("pt"), meta)
        try:
            body = keys.decrypt(d.get("body"), aad, member.subject, now)
        except E2EError as exc:
            self._refused(d, exc, member, now)
            return None
        if keys.messages >= REFRESH_MESSAGES:
            self._queue_refresh(now)
        return body

    def _refused(self, d: dict[str, Any], exc: E2EError, member: Member, now: float) -> None:
        keys = self.keys
        assert keys is not None
        code = exc.code
        self.owner.count(f"e2e:{code}")
        if code == "epoch_pending":
            # Its commit has not reached us yet: kept, and opened once it has.
            if not keys.hold(d, now):
                self.owner.count("e2e:held_full")
            return
        if code == "replay":
            return  # already opened once (or our own): nothing new to deliver
        # The application hears of it at once. The message is not acknowledged and
        # leaves the stream untouched: a copy altered on the way must not stand in for
        # the sender's own, whose retransmission still gets through.
        self._deliver([DecryptError(code, str(exc), source=member.name, message_id=d["mid"],
                                    session_id=self.sid)])

    def _deliver(self, items: Sequence[Message | BaseException]) -> None:
        # Past max_inbox the driver pauses reading from the node until the
        # application catches up (bounded in time, see App._read_loop).
        self.inbox.extend(items)
        self.received += len(items)
        self.owner.inbox_ready(self)
        if len(self.inbox) >= self.config.max_inbox:
            self.owner.congested(self)

    @property
    def inbox_full(self) -> bool:
        return len(self.inbox) >= self.config.max_inbox

    def flush(self, now: float) -> None:
        """Send the acknowledgements and retransmission requests of the last batch."""
        dirty, self._dirty_recv = self._dirty_recv, set()
        acks: dict[Key, dict[str, Any]] = {}
        for key, direct in dirty:
            stream = (self._recv_direct if direct else self._recv).get(key)
            if stream is None:
                continue
            _take_acks(stream, direct, acks.setdefault(key, {}))
            gaps = stream.take_new_gaps()
            if gaps:
                self.owner.send(self._frame(list(key), Kind.RTX_REQUEST, 0,
                                            body=encode_body({"m": gaps, "d": direct}),
                                            control=False))
        for key, body in acks.items():
            if not body:
                continue
            self.owner.send(self._frame(list(key), Kind.MSG_ACK, 0, body=encode_body(body),
                                        control=False))

    def _acks_for(self, key: Key) -> bytes | None:
        """Take the acknowledgements due to ``key`` to ride on a data message to it
        (a reply then needs no ack frame of its own); gaps stay for :meth:`flush`."""
        dirty = self._dirty_recv
        if not dirty:
            return None
        body: dict[str, Any] = {}
        for direct, streams in ((False, self._recv), (True, self._recv_direct)):
            stream = streams.get(key) if (key, direct) in dirty else None
            if stream is not None:
                _take_acks(stream, direct, body)
        if not body:
            return None
        self.owner.count("acks_carried")
        return encode_body(body)

    def _on_ack(self, src_key: Key, d: dict[str, Any], now: float) -> None:
        self._apply_acks(src_key, decode_body(d.get("body", b"")), now)

    def _apply_acks(self, src_key: Key, body: dict[str, Any], now: float) -> None:
        member = self.members.get(src_key)
        if member is None:
            return
        done = []
        direct = self._send_direct.get(src_key)
        name = member.name
        for stream, ranges, through in ((self._send, "a", "at"), (direct, "d", "dt")):
            if stream is None:
                continue
            done += stream.ack_ranges(name, ranges_of(body.get(ranges), ranges), now)
            last = body.get(through)
            if last is not None:
                done += stream.ack_through(name, int_of(last, through), now)
        for p in done:
            self._complete(p)
        if done:
            self._window_check()

    def _complete(self, p: Any) -> None:
        record: _Outgoing = p.record
        ticket = record.ticket
        if p.failed:
            report = DeliveryReport(p.mid, p.delivered, dict(p.failed), True)
            timeout = all(why == "timeout" for why in p.failed.values())
            ticket.fail((DeliveryTimeoutError if timeout else DeliveryError)(report))
        else:
            ticket.resolve(_new(DeliveryReport, (p.mid, p.recipients, _NO_FAILURES, True)))
        if ticket.waiter is not None:  # only a handle someone awaits needs a wake-up
            self.owner.emit(TicketDone(ticket))

    def _window_check(self) -> None:
        if self._window_waiting:
            streams = [self._send, *self._send_direct.values()]
            if all(s is None or s.has_room() for s in streams):
                self._window_waiting = False
                self.owner.emit(WindowOpen(self))

    def _on_rtx_request(self, src_key: Key, d: dict[str, Any], now: float) -> None:
        member = self.members.get(src_key)
        if member is None:
            return
        body = decode_body(d.get("body", b""))
        direct = body.get("d") is True
        mids = body.get("m")
        if type(mids) is not list or len(mids) > 4096:
            raise ProtocolViolation("rtx request: expected a list of ids")
        stream = self._send_direct.get(src_key) if direct else self._send
        gone = []
        for mid in mids:
            int_of(mid, "m", 1)
            p = stream.lookup(mid) if stream is not None else None
            if p is None or member.name not in p.recipients:
                gone.append(mid)
                continue
            self._resend(p, [member.name], Kind.RTX_REPLY)
        if gone:
            self.owner.send(self._frame(list(src_key), Kind.RTX_REPLY, 0,
                                        body=encode_body({"m": gone, "d": direct}),
                                        control=False, error=True))

    def _on_rtx_gone(self, src_key: Key, d: dict[str, Any], now: float) -> None:
        body = decode_body(d.get("body", b""))
        direct = body.get("d") is True
        stream = (self._recv_direct if direct else self._recv).get(src_key)
        mids = body.get("m")
        if stream is None or type(mids) is not list:
            return
        before = set(stream.missing) | {m for m in mids if isinstance(m, int)
                                        and m >= stream.next and m not in stream.held}
        released = stream.give_up(int_of(m, "m", 1) for m in mids)
        lost = sorted(m for m in mids if m in before)
        member = self.members[src_key]
        errors: list[Message | BaseException] = [
            MessageLostError(member.name, m, session_id=self.sid) for m in lost]
        if errors or released:
            self._deliver(errors + list(released))

    def _resend(self, p: Any, names: Iterable[Name], kind: int) -> None:
        record: _Outgoing = p.record
        for name in names:
            self.owner.send(self._frame(name.to_wire(), kind, p.mid, body=record.payload,
                                        metadata=record.metadata,
                                        payload_type=record.payload_type, control=False))

    # -- control replies -------------------------------------------------------------------

    def _on_control_reply(self, src_key: Key, d: dict[str, Any], now: float) -> None:
        c = self._controls.get(d["mid"])
        if c is None:
            return  # late or duplicate answer
        if c.waiting is not None and src_key not in c.waiting:
            return
        member = None
        if d["k"] in (Kind.DISCOVERY_REPLY, Kind.JOIN_REPLY) and not d.get("err"):
            try:
                subject = self.owner.verify(d.get("id"), d["src"])
            except AuthenticationError as exc:
                del self._controls[c.mid]
                c.on_fail(SessionRejectedError(name_of(d["src"], "src"), "unauthenticated",
                                               exc.reason, session_id=self.sid), set())
                return
            member = Member(name_of(d["src"], "src"), subject)
        try:
            c.on_reply(src_key, d, member)
        except _Rejected as rejected:
            del self._controls[c.mid]
            c.on_fail(rejected.error(self.sid), set())
            return
        if c.waiting is not None:
            c.waiting.discard(src_key)
            if c.waiting:
                return
        del self._controls[c.mid]
        c.on_done()

    def on_node_error(self, code: str, ref: int | None, name: Name | None, now: float) -> None:
        """The node could not route a frame of this session."""
        self._now = now
        c = self._controls.get(ref) if ref is not None else None
        if c is None and code == "no_route" and not self.group:
            # A data message found no peer. Retries go on (the peer may be
            # reconnecting), but the driver hears of it at once.
            self.owner.emit(Unreachable(self))
        if c is None or code != "no_route":
            return
        if c.waiting is None or (len(c.waiting) == 1 and c.multicast is None):
            del self._controls[c.mid]
            c.on_fail(NoRouteError(name, f"no matching found for {name}"), set(c.waiting or ()))

    # -- participant side ------------------------------------------------------------------

    def accept_join(self, d: dict[str, Any], body: dict[str, Any], moderator: Member,
                    now: float) -> None:
        """Answer the join request that created this (participant) session."""
        self.moderator = moderator
        self.metadata = dict(d.get("meta") or {})
        if not self.group:
            self.destination = moderator.name
        if self.channel is not None:
            self.owner.subscribe(self.channel)
            self.state_subscribed = True
        reply: dict[str, Any] = {}
        if self.keys is not None:
            reply["kp"] = self.keys.key_package(body.get("mls"), self.owner.token(),
                                                self.owner.subject, now)
        self._reply(d, Kind.JOIN_REPLY, reply)

    def _ack_body(self) -> dict[str, Any]:
        keys = self.keys
        if keys is None or keys.state is None or keys.state.removed:
            return {}
        return {"auth": keys.state.epoch_authenticator}

    def _on_welcome(self, d: dict[str, Any], now: float) -> None:
        body = decode_body(d.get("body", b""))
        roster = members_of(body.get("roster"), "roster")
        nexts = body.get("next", [])
        if type(nexts) is not list:
            raise ProtocolViolation("welcome: bad next map")
        if self.state is not State.JOINING:
            self._reply(d, Kind.GROUP_ACK, self._ack_body())
            return
        keys = self.keys
        if keys is not None and not keys.welcome_is_ours(body.get("mls")):
            self.owner.count("e2e:foreign_welcome")  # an old one replayed: not ours to judge
            return
        if keys is not None:
            assert self.moderator is not None
            try:
                keys.join(body.get("mls"), self.moderator.subject, now)
                catchup = body.get("mls_next", [])
                if type(catchup) is not list:
                    raise E2EError("malformed", "welcome: bad commit list")
                assert keys.state is not None
                for item in catchup:
                    if type(item) is not list or len(item) != 2:
                        raise E2EError("malformed", "welcome: bad commit list")
                    keys.state.apply_commit(item[0], now, envelope=item[1])
                if {m.subject for m in roster} != keys.subjects():
                    raise E2EError("bad_welcome", "the group roster differs from the session's")
            except E2EError as exc:
                self.owner.count(f"e2e:{exc.code}")
                self._reply(d, Kind.GROUP_NACK, {"code": exc.code, "msg": str(exc)}, error=True)
                self._finish_close(f"welcome refused ({exc.code})", now, announce=False)
                return
        self.members = {_key(m.name.to_wire()): m for m in roster}
        self._roster_changed()
        for item in nexts:
            if type(item) is list and len(item) == 2 and type(item[0]) is list:
                self._first_mid[_key(name_of(item[0], "next").to_wire())] = int_of(
                    item[1], "next", 1)
        self.state = State.ESTABLISHED
        self._deadline = None
        if self.config.heartbeats:
            self._hb_at = now + self._silence()
        self._reply(d, Kind.GROUP_ACK, self._ack_body())
        self.owner.emit(Established(self))
        early, self._early = self._early, []
        for frame in early:
            self.handle_frame(frame, now)

    def _apply_commits(self, d: dict[str, Any], body: dict[str, Any], now: float) -> bool:
        """Apply the commits an update carries; on failure refuse it and keep the old state."""
        keys = self.keys
        commits = body.get("mls")
        if keys is None or keys.state is None:
            if commits is not None:
                self._reply(d, Kind.GROUP_NACK, {"code": "e2e_off"}, error=True)
                return False
            return True
        envelopes = body.get("env")
        try:
            if type(commits) is not list or not commits or (
                    envelopes is not None and (type(envelopes) is not list
                                               or len(envelopes) != len(commits))):
                raise E2EError("bad_commit", "an update of an encrypted session needs commits")
            for i, commit in enumerate(commits):
                keys.state.apply_commit(commit, now,
                                        envelope=envelopes[i] if envelopes else None)
                if keys.state.removed:
                    break
        except E2EError as exc:
            self.owner.count(f"e2e:{exc.code}")
            self._reply(d, Kind.GROUP_NACK, {"code": exc.code, "msg": str(exc)}, error=True)
            return False
        return True

    def _on_update(self, d: dict[str, Any], now: float) -> None:
        if self.state is State.JOINING:
            return  # the update announcing us: the welcome that follows has it all
        body = decode_body(d.get("body", b""))
        op = body.get("op")
        if op == "add":
            who = member_of(body.get("who"), "who")
        elif op == "remove":
            gone = members_of(body.get("gone"), "gone")
        elif op != "refresh":
            raise ProtocolViolation(f"group update: unknown op {op!r}")
        if not self._apply_commits(d, body, now):
            return
        if op == "add":
            key = _key(who.name.to_wire())
            if key not in self.members:
                self.members[key] = who
                self._roster_changed()
                self.owner.emit(RosterChanged(self, added=(who.name,)))
            self._first_mid.pop(key, None)
            reply = self._ack_body()
            if self._send is not None:
                reply["next"] = self._send.next_mid
            self._reply(d, Kind.GROUP_ACK, reply)
        elif op == "remove":
            self._reply(d, Kind.GROUP_ACK, self._ack_body())
            reason = "unreachable" if body.get("why") == "unreachable" else "removed"
            for who in gone:
                key = _key(who.name.to_wire())
                if key != self.local_key:
                    self._drop_member(key, reason, now)
        else:
            self._reply(d, Kind.GROUP_ACK, self._ack_body())
            # The refresh used our last envelope key: send the next one.
            self._send_key_update(now)
        self._retry_held(now)

    def _on_proposal(self, d: dict[str, Any], member: Member, now: float) -> None:
        keys = self.keys
        if not self.is_moderator or keys is None or keys.state is None:
            self._reply(d, Kind.GROUP_NACK, {"code": "not_moderator"}, error=True)
            return
        body = decode_body(d.get("body", b""))
        try:
            if member.subject not in keys.subjects():
                raise E2EError("not_member", "key update from outside the group")
            suspect = keys.state.receive_key_update(body.get("kupd"), now)  # type: ignore[arg-type]
        except E2EError as exc:
            self.owner.count(f"e2e:{exc.code}")
            self._reply(d, Kind.GROUP_NACK, {"code": exc.code, "msg": str(exc)}, error=True)
            return
        self._reply(d, Kind.GROUP_ACK, {})
        if suspect:
            self._queue_refresh(now)

    def _retry_held(self, now: float) -> None:
        keys = self.keys
        if keys is not None and keys.held:
            for frame in keys.take_held():
                self.handle_frame(frame, now)

    def _on_group_close(self, d: dict[str, Any], now: float) -> None:
        self._reply(d, Kind.GROUP_ACK, {})
        self._finish_close("closed by moderator", now)

    def _on_leave_request(self, d: dict[str, Any], member: Member, now: float) -> None:
        leaving = (d.get("meta") or {}).get(META_LEAVING) == TRUE
        key = _key(d["src"])
        if key not in self.members:
            self._reply(d, Kind.LEAVE_REPLY, {})
            return
        if leaving and self.group and self.is_moderator:
            # A member leaves on its own: confirm, then tell the others.
            self._reply(d, Kind.LEAVE_REPLY, {})
            self._leaving.add(key)
            ticket = Ticket("remove")
            self._queue(lambda t: self._remove_step_update(key, ticket, t, notify=False), ticket,
                        now)
            return
        if leaving and not self.group:
            self._reply(d, Kind.LEAVE_REPLY, {})
            self._finish_close("closed by peer", now)
            return
        if self._from_moderator(d):
            self._reply(d, Kind.LEAVE_REPLY, {})
            self._finish_close("removed", now)
            return
        self._reply(d, Kind.GROUP_NACK, {"code": "not_moderator"}, error=True)

    # -- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        best = self._deadline
        hb = self._hb_at
        if hb is not None and (best is None or hb < best):
            best = hb
        keys = self.keys
        if keys is not None:
            t = keys.timer()
            if t is not None and (best is None or t < best):
                best = t
            if self.is_moderator and not self._refresh_queued and \
                    self.state is State.ESTABLISHED:
                t = keys.refreshed_at + REFRESH_INTERVAL
                if best is None or t < best:
                    best = t
        for c in self._controls.values():
            if best is None or c.deadline < best:
                best = c.deadline
        send = self._send
        if send is not None and send.pending:
            t = send.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        for stream in self._send_direct.values():
            if stream.pending:
                t = stream.get_timer()
                if t is not None and (best is None or t < best):
                    best = t
        for streams in (self._recv, self._recv_direct):
            for r in streams.values():
                if r.missing:
                    t = r.get_timer()
                    if t is not None and (best is None or t < best):
                        best = t
        return best

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self.state is State.JOINING:
                self._finish_close("no welcome", now, announce=False)
                return
        if self._hb_at is not None and now >= self._hb_at:
            self._heartbeat(now)
            if self.state is State.CLOSED:
                return
        keys = self.keys
        if keys is not None:
            self._expire_held(keys, now)
            if self.is_moderator and keys.refresh_due(now):
                self._queue_refresh(now)
        for mid, c in list(self._controls.items()):
            if c.deadline > now or mid not in self._controls:
                continue
            if c.attempts >= self.config.control_retries:
                del self._controls[mid]
                missing = set(c.waiting or ())
                c.on_fail(SessionTimeoutError(
                    f"no answer after {c.attempts + 1} attempts", session_id=self.sid), missing)
                continue
            c.attempts += 1
            c.deadline = now + self.config.control_interval
            if c.frames is not None:
                for k in c.waiting or ():
                    frame = c.frames.get(k)
                    if frame is not None:
                        self.owner.send(frame)
            elif c.waiting is None or (c.multicast is not None and len(c.waiting) > 2):
                self.owner.send(c.frame)
            else:
                for k in c.waiting:
                    dst = c.targets.get(k, list(k))
                    self.owner.send(self._retarget(c.frame, dst))
        streams: list[tuple[Key | None, SendStream[_Outgoing]]] = []
        if self._send is not None:
            streams.append((None, self._send))
        streams.extend(self._send_direct.items())
        for _, stream in streams:
            resend, expired = stream.due(now)
            for p, names in resend:
                if self.group and p.record.direct_to is None and len(names) > 2:
                    dst, fanout = self._data_dst()
                    rec = p.record
                    self.owner.send(self._frame(dst, Kind.MSG, p.mid, fanout=fanout,
                                                body=rec.payload, metadata=rec.metadata,
                                                payload_type=rec.payload_type, control=False))
                else:
                    self._resend(p, names, Kind.MSG)
            for p in expired:
                self._complete(p)
            if expired:
                self._window_check()
        for direct, recvs in ((False, self._recv), (True, self._recv_direct)):
            for key, r in list(recvs.items()):
                if not r.missing:
                    continue
                again, lost, released = r.due(now)
                if again:
                    self.owner.send(self._frame(list(key), Kind.RTX_REQUEST, 0,
                                                body=encode_body({"m": again, "d": direct}),
                                                control=False))
                if lost or released:
                    member = self.members.get(key)
                    items: list[Message | BaseException] = []
                    if member is not None:
                        items += [MessageLostError(member.name, m, session_id=self.sid)
                                  for m in lost]
                    self._deliver(items + list(released))

    # -- liveness (groups with heartbeats) -------------------------------------------------

    def _silence(self) -> float:
        """How long a member may stay silent before it counts as gone."""
        interval = self.config.heartbeat_interval
        assert interval is not None
        return interval * self.config.heartbeat_misses

    def _heartbeat(self, now: float) -> None:
        cfg = self.config
        interval = cfg.heartbeat_interval
        assert interval is not None
        if not self.is_moderator:
            # A member's deadline for hearing the moderator passed.
            if self.moderator_lost:
                self._finish_close("moderator_lost", now, announce=False)
                return
            self.moderator_lost = True
            self.owner.count("moderator_lost")
            self._hb_at = now + cfg.moderator_grace
            self._member_offline(now)
            self.owner.emit(ModeratorLost(self))
            return
        self._hb_at = now + interval
        if self.state is not State.ESTABLISHED:
            return
        # Silent for `misses` intervals (half an interval is left for the answer's
        # travel, since the check runs when the next ping leaves).
        limit = (cfg.heartbeat_misses - 0.5) * interval
        heard = self._heard
        newly: list[Key] = []
        for key, m in self.members.items():
            if key == self.local_key:
                continue
            last = heard.get(key)
            if last is None:
                heard[key] = now
            elif now - last >= limit and m.name not in self.offline:
                newly.append(key)
        if newly:
            self.owner.count("members_offline")
            self._set_offline(self.offline | {self.members[k].name for k in newly}, now)
            if cfg.remove_offline:
                for key in newly:
                    self._queue_removal(key, now)
        if len(self.members) > 1:
            self._hb_seq = self._hb_seq % 0xFFFF_FFFF + 1
            body = encode_body({"off": [n.to_wire() for n in self.offline]}) \
                if self.offline else b""
            dst, fanout = self._control_dst()
            self.owner.send(self._frame(dst, Kind.HEARTBEAT, self._hb_seq, fanout=fanout,
                                        body=body, control=False))

    def _queue_removal(self, key: Key, now: float) -> None:
        ticket = Ticket("remove")
        self._queue(lambda t: self._remove_step_update(key, ticket, t, notify=False,
                                                       reason="unreachable"), ticket, now)

    def _on_heartbeat(self, src_key: Key, d: dict[str, Any], now: float) -> None:
        if src_key == self.local_key:
            return  # our own ping, back from the channel
        if self.is_moderator:
            # A member answers; one we removed while it was away learns it now.
            if src_key in self.members:
                self._heard[src_key] = now
                name = self.members[src_key].name
                if name in self.offline:
                    self._set_offline(self.offline - {name}, now)
            elif src_key in self._gone:
                self.owner.send(self._frame(d["src"], Kind.LEAVE_REQUEST,
                                            self.owner.random_mid()))
            else:
                self.owner.count("heartbeat_from_non_member")
            return
        if self.state is not State.ESTABLISHED or not self._from_moderator(d):
            self.owner.count("heartbeat_ignored")
            return
        body = d.get("body")
        reported: set[Name] = set()
        if body:
            off = decode_body(body).get("off")
            if type(off) is not list or len(off) > MAX_ROSTER:
                raise ProtocolViolation("heartbeat: expected a list of names")
            for wire in off:
                member = self.members.get(_key(name_of(wire, "off").to_wire()))
                if member is not None and member.name != self.local:
                    reported.add(member.name)
        if self.config.heartbeats:
            self._hb_at = now + self._silence()
        recovered = self.moderator_lost
        self.moderator_lost = False
        self._reported_off = reported
        self._member_offline(now)
        if recovered:
            self.owner.emit(ModeratorLost(self))
        self.owner.send(self._frame(d["src"], Kind.HEARTBEAT, d["mid"], control=False))

    def _member_offline(self, now: float) -> None:
        """A member's offline set: what the moderator reports, and the moderator if lost."""
        off = set(self._reported_off)
        if self.moderator_lost and self.moderator is not None:
            off.add(self.moderator.name)
        if off != self.offline:
            self._set_offline(off, now)

    def _set_offline(self, names: AbstractSet[Name], now: float) -> None:
        """Stop waiting for members that went offline (their messages fail "unreachable")."""
        added = names - self.offline
        self.offline = frozenset(names)
        if not added:
            return
        done: list[Any] = []
        for stream in (self._send, *self._send_direct.values()):
            if stream is not None and stream.pending:
                for name in added:
                    done += stream.drop_recipient(name, "unreachable")
        for p in done:
            self._complete(p)
        if done:
            self._window_check()

    def _expire_held(self, keys: SessionKeys, now: float) -> None:
        # A reliable sender resends what was never acknowledged; best effort learns of the loss.
        for d in keys.expired(now):
            member = self.members.get(_key(d["src"]))
            if member is not None and not self.reliable:
                self._deliver([DecryptError("epoch_pending", "its epoch never began here",
                                            source=member.name, message_id=d["mid"],
                                            session_id=self.sid)])

    def _retarget(self, frame: bytes, dst: list[Any]) -> bytes:
        d = decode_frame(memoryview(frame)[4:])
        d["dst"], d["fan"] = dst, 1
        return encode_frame(d)

    # -- closing ---------------------------------------------------------------------------

    def _finish_close(self, reason: str, now: float | None, *, announce: bool = True) -> None:
        if self.state is State.CLOSED:
            return
        was_established = self.state in (State.ESTABLISHED, State.CLOSING)
        self.state = State.CLOSED
        self.close_reason = reason
        self._hb_at = None
        error = SessionClosedError(self.sid, reason)
        # Pending control messages are dropped without running their follow-ups
        # (an operation must not go on in a closed session); their tickets fail here.
        self._controls = {}
        running, self._running = self._running, None
        if running is not None and running.fail(error):
            self.owner.emit(TicketDone(running))
        close_ticket = self._close_ticket
        if close_ticket is not None and close_ticket.resolve(None):
            self.owner.emit(TicketDone(close_ticket))
        streams = [self._send, *self._send_direct.values()]
        for stream in streams:
            if stream is not None:
                for p in stream.abandon(reason):
                    self._complete(p)
        for _, ticket in self._ops:
            if ticket.fail(error):
                self.owner.emit(TicketDone(ticket))
        self._ops.clear()
        if self.channel is not None and self.state_subscribed:
            self.owner.unsubscribe(self.channel)
        if self.keys is not None:
            self.keys.wipe()
        self.owner.session_closed(self, reason, announce=announce and was_established)
        self.owner.emit(Closed(self, reason))


class _Rejected(Exception):
    """A control reply that refuses (err flag or nack)."""

    def __init__(self, d: dict[str, Any]) -> None:
        super().__init__()
        self.d = d

    def error(self, sid: int) -> SessionRejectedError:
        try:
            body = decode_body(self.d.get("body", b""))
        except ProtocolViolation:
            body = {}
        raw_code, raw_msg = body.get("code"), body.get("msg")
        code = raw_code if isinstance(raw_code, str) else "rejected"
        msg = raw_msg if isinstance(raw_msg, str) else ""
        try:
            name = name_of(self.d["src"], "src")
        except ProtocolViolation:
            name = None
        return SessionRejectedError(name, code, msg, session_id=sid)


__all__ = ["Closed", "Established", "InboxReady", "ModeratorLost", "RosterChanged",
           "SessionCore", "State", "TicketDone", "WindowFull", "WindowOpen"]
