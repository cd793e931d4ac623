# An app's protocol state (sans-IO): its sessions, the requests that create
# sessions, its subscriptions at the node, and identity checks.
#
# Invariants:
# * Every received publish is checked (wire schema, then session protocol);
#   a bad one is counted and dropped, it never stops the receive loop.
# * A discovery request is answered without creating state; a join request
#   creates a participant session only after the token verified and the
#   invite policy accepted; a refusal is answered so the sender is told.
# * Frames to send and events accumulate here; the driver takes them after
#   every input. `now` is wall-clock seconds.
from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from node_lite import (
    AuthenticationError,
    Identity,
    LimitExceededError,
    Limits,
    Name,
    ProtocolError,
    TokenProvider,
    TokenVerifier,
    instance_id_for,
)
from node_lite._auth import parse_unverified
from node_lite._limits import DEFAULT_LIMITS
from node_lite.wire import (
    MAX_CARD_SIZE,
    Announce,
    Command,
    Error,
    Lookup,
    LookupResult,
    ReportRequest,
    ReportResult,
    SharedEnvelope,
    Subscribe,
    Unsubscribe,
    check_publish,
    encode_frame,
)

from ._config import (
    DEFAULT_HEARTBEAT_MISSES,
    DEFAULT_MODERATOR_GRACE,
    SessionConfig,
    SessionKind,
)
from ._e2e import SigningIdentity
from ._errors import SessionError
from ._protocol import (
    MAX_SESSION_ID,
    META_LEAVING,
    TRUE,
    Kind,
    Member,
    ProtocolViolation,
    SessionType,
    build_frame,
    decode_body,
    encode_body,
    heartbeat_of,
    name_of,
    reliability_of,
)
from ._reports import Ticket
from ._session_core import Closed, Established, InboxReady, SessionCore

# Sessions announced but not yet taken by listen_for_session().
MAX_PENDING_SESSIONS = 1024


@dataclass(frozen=True, slots=True)
class JoinInfo:
    """What an invitee knows about an invitation when deciding to accept it."""

    moderator: Name
    moderator_subject: str
    session_id: int
    kind: SessionKind
    channel: Name | None
    metadata: dict[str, str]
    mls_enabled: bool


InvitePolicy = Callable[[JoinInfo], "bool | str"]


@dataclass(slots=True)
class SessionAnnounced:
    """A new session was established by another app (for listen_for_session)."""

    session: SessionCore


class AppCore:
    """Protocol state of one app."""

    def __init__(self, name: Name, provider: TokenProvider, verifier: TokenVerifier | None, *,
                 rng: random.Random | None = None, limits: Limits | None = None,
                 invite_policy: InvitePolicy | None = None,
                 signing: SigningIdentity | None = None) -> None:
        self.name = name
        #: The Ed25519 key of end-to-end encrypted sessions (bound to the token by a claim).
        self.signing = signing or SigningIdentity.generate()
        self.wire = name.to_wire()
        self.provider = provider
        self.subject = provider.subject
        self.verifier = verifier
        self.limits = limits or DEFAULT_LIMITS
        self.invite_policy = invite_policy
        self._rng = rng or random.Random()
        self.sessions: dict[int, SessionCore] = {}
        self._out: list[bytes] = []
        self._events: deque[Any] = deque()
        self._dirty: dict[int, SessionCore] = {}
        self._congested: dict[int, SessionCore] = {}
        self._touched: dict[int, SessionCore] = {}
        self._ready: dict[int, SessionCore] = {}
        self._timers: list[tuple[float, int]] = []
        self._deadlines: dict[int, float] = {}
        self._subs: Counter[Name] = Counter()
        self._rid = 0
        self._known: set[tuple[Any, ...]] = set()
        self.counters: Counter[str] = Counter()
        self.pending_sessions = 0
        #: Management commands from the node (controller), carried out by the driver.
        self.commands: list[Command] = []
        #: Directory answers and reports from the node, taken by the driver.
        self.node_answers: list[LookupResult | ReportResult] = []
        self._card: bytes | None = None
        self._told_unknown: dict[tuple[Any, int], float] = {}

    # -- owner interface for sessions ------------------------------------------------------

    def token(self) -> str:
        return self.provider.get_token()

    def send(self, frame: bytes) -> None:
        self._out.append(frame)

    def emit(self, event: Any) -> None:
        self._events.append(event)

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] += n

    def random_mid(self) -> int:
        return self._rng.randrange(1, 0xFFFF_FFFF)

    def timers_changed(self, session: SessionCore) -> None:
        """A session started an operation on its own (a refresh at a publish)."""
        self._touch(session)

    def mark_dirty(self, session: SessionCore) -> None:
        self._dirty[session.sid] = session

    def inbox_ready(self, session: SessionCore) -> None:
        """A session got messages; one InboxReady per session and batch is emitted."""
        self._ready[session.sid] = session

    def congested(self, session: SessionCore) -> None:
        """A session's inbox is full: the driver should pause reading."""
        self._congested[session.sid] = session

    @property
    def any_congested(self) -> bool:
        """:meth:`take_congested` may have sessions to give."""
        return bool(self._congested)

    def take_congested(self) -> list[SessionCore]:
        if not self._congested:
            return []
        out = [s for s in self._congested.values() if s.inbox_full]
        self._congested = {}
        return out

    def subscribe(self, name: Name) -> None:
        self._subs[name] += 1
        if self._subs[name] == 1:
            self._rid = self._rid % 0xFFFF_FFFF + 1
            self._out.append(encode_frame(Subscribe(name=name, request_id=self._rid)))

    def unsubscribe(self, name: Name) -> None:
        if self._subs[name] <= 0:
            return
        self._subs[name] -= 1
        if self._subs[name] == 0:
            del self._subs[name]
            self._rid = self._rid % 0xFFFF_FFFF + 1
            self._out.append(encode_frame(Unsubscribe(name=name, request_id=self._rid)))

    def resubscribe(self) -> list[bytes]:
        """Subscriptions (and card) to restore on a new connection (the node forgot them)."""
        frames = []
        for name in self._subs:
            self._rid = self._rid % 0xFFFF_FFFF + 1
            frames.append(encode_frame(Subscribe(name=name, request_id=self._rid)))
        if self._card:
            frames.append(encode_frame(Announce(card=self._card)))
        return frames

    def announce(self, card: bytes) -> None:
        """Describe this app in the node's directory (kept across reconnects)."""
        if len(card) > MAX_CARD_SIZE:
            raise LimitExceededError("card", MAX_CARD_SIZE, len(card))
        self._card = card
        self._out.append(encode_frame(Announce(card=card)))

    def request_report(self) -> int:
        """Ask the node for its report; the answer arrives in :attr:`node_answers` with this id."""
        self._rid = self._rid % 0xFFFF_FFFF + 1
        self._out.append(encode_frame(ReportRequest(request_id=self._rid)))
        return self._rid

    def lookup(self, prefix: tuple[str, ...] = (), limit: int = 256) -> int:
        """Ask the node's directory; the answer arrives in :attr:`node_answers` with this id."""
        self._rid = self._rid % 0xFFFF_FFFF + 1
        self._out.append(encode_frame(Lookup(request_id=self._rid, prefix=prefix, limit=limit)))
        return self._rid

    def identity_of(self, token: str) -> Identity:
        """A peer's verified identity (credential checks of end-to-end encryption)."""
        if self.verifier is None:
            return parse_unverified(token)
        return self.verifier.verify(token)

    def verify(self, token: object, src: list[Any]) -> str:
        """Check a peer's identity token and that it owns the name it sends from.

        :returns: the token's subject.
        :raises AuthenticationError: on any failure.
        """
        if not isinstance(token, str):
            raise AuthenticationError("missing", detail="no identity token")
        if self.verifier is None:
            return parse_unverified(token).subject
        identity = self.verifier.verify(token)
        bound = identity.claims.get("name")
        name = f"{src[0]}/{src[1]}/{src[2]}/{src[3]}"
        if bound is not None:
            if bound != name:
                raise AuthenticationError("forbidden_source", detail=f"token bound to {bound}")
        elif src[3] != instance_id_for(identity.subject):
            raise AuthenticationError("forbidden_source", detail="name not owned by the token")
        return identity.subject

    def session_closed(self, session: SessionCore, reason: str, *, announce: bool) -> None:
        self.sessions.pop(session.sid, None)
        self._dirty.pop(session.sid, None)

    # -- driver interface ------------------------------------------------------------------

    def take_frames(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_events(self) -> list[Any]:
        if self._ready:
            self._events.extend(InboxReady(s) for s in self._ready.values())
            self._ready = {}
        events = list(self._events)
        self._events.clear()
        return events

    def new_session_id(self) -> int:
        while True:
            sid = self._rng.randrange(1, MAX_SESSION_ID)
            if sid not in self.sessions:
                return sid

    def create_session(self, destination: Name, config: SessionConfig,
                       now: float) -> tuple[SessionCore, Ticket]:
        """Create a session as its initiator.

        A group is ready at once (its channel is subscribed); a point-to-point
        session runs discovery, join and welcome, and the ticket resolves
        when the peer is in.
        """
        sid = self.new_session_id()
        session = SessionCore(self, sid, config, initiator=True, destination=destination,
                              now=now)
        self.sessions[sid] = session
        if config.kind is SessionKind.GROUP:
            self.subscribe(destination)
            session.state_subscribed = True
            ticket = Ticket("create")
            ticket.resolve(session)
        else:
            ticket = session.start_point_to_point(now)
        self._touch(session)
        return session, ticket

    def operate(self, session: SessionCore, soonest: float | None = None) -> None:
        """Call after any operation on a session (publish, invite, ...).

        ``soonest``: the earliest deadline the operation can have added (a publish:
        its retransmission, or none: ``math.inf``), so that a session whose known
        deadline comes first needs no look at its timers.
        """
        if soonest is not None:
            if soonest == math.inf:
                return
            current = self._deadlines.get(session.sid)
            if current is not None and current <= soonest:
                return
        self._touch(session)

    def receive(self, envelopes: Iterable[dict[str, Any]], now: float, *,
                ack: bool = True) -> None:
        """Process envelopes received from the node.

        ``ack=False`` leaves the acknowledgements due (see :attr:`acks_due`) for a
        later :meth:`flush`: replies published before it carry them instead.
        """
        for d in envelopes:
            t = d.get("t")
            try:
                if t == "pub":
                    self._on_publish(d, now)
                elif t == "err":
                    self._on_error(d, now)
                elif t == "cmd":
                    self.commands.append(Command.from_dict(d, self.limits))
                elif t == "lookup_res":
                    self.node_answers.append(LookupResult.from_dict(d, self.limits))
                elif t == "report_res":
                    self.node_answers.append(ReportResult.from_dict(d, self.limits))
                elif t in ("sub_ack", "pong", "ping", "hello_ack"):
                    if t == "sub_ack" and not d.get("ok", True):
                        self.counters["subscribe_refused"] += 1
                else:
                    self.counters["unknown_type"] += 1
            except (ProtocolError, ProtocolViolation, SessionError) as exc:
                self.counters["malformed"] += 1
                self.counters[f"malformed:{type(exc).__name__}"] += 1
        touched, self._touched = self._touched, {}
        for session in touched.values():
            self._touch(session)
        if ack:
            self.flush(now)

    @property
    def acks_due(self) -> bool:
        return bool(self._dirty)

    def flush(self, now: float) -> None:
        """Acknowledge what the last batch received."""
        dirty, self._dirty = self._dirty, {}
        for session in dirty.values():
            session.flush(now)
            self._touch(session)

    def _on_publish(self, d: dict[str, Any], now: float) -> None:
        if type(d) is not SharedEnvelope:
            check_publish(d, self.limits, self._known)
        elif d.checked is not self.limits:  # another app of this loop may have checked it
            check_publish(d, self.limits, self._known)
            d.checked = self.limits
        session = self.sessions.get(d.get("sid", 0))
        if session is not None:
            session.handle_frame(d, now)
            self._touched[session.sid] = session
            return
        kind = d.get("k", 0)
        if kind == Kind.DISCOVERY_REQUEST:
            self._on_discovery(d)
        elif kind == Kind.JOIN_REQUEST:
            self._on_join(d, now)
        elif kind in (Kind.LEAVE_REQUEST, Kind.GROUP_CLOSE):
            # The session is already gone here: confirm, so the other side stops retrying.
            reply = Kind.LEAVE_REPLY if kind == Kind.LEAVE_REQUEST else Kind.GROUP_ACK
            self._answer(d, reply, {})
        else:
            self.counters["no_session"] += 1
            if kind == Kind.MSG and d.get("st") == SessionType.POINT_TO_POINT:
                self._forget_peer_session(d, now)

    def _forget_peer_session(self, d: dict[str, Any], now: float) -> None:
        """Tell a peer that this app has no such session (it restarted, say), so the
        peer's session closes at once instead of retrying into the void."""
        key = (tuple(d["src"]), d.get("sid", 0))
        last = self._told_unknown.get(key)
        if last is not None and now - last < 1.0:
            return  # once a second per session: retries must not multiply answers
        self._told_unknown[key] = now
        while len(self._told_unknown) > 1024:
            del self._told_unknown[next(iter(self._told_unknown))]
        self._out.append(build_frame(self.wire, d["src"], fanout=1, sid=d.get("sid", 0),
                                     st=d.get("st", 0), kind=Kind.LEAVE_REQUEST,
                                     mid=d.get("mid", 0), body=encode_body({}),
                                     metadata={META_LEAVING: TRUE}, identity=self.token()))

    def _answer(self, d: dict[str, Any], kind: int, body: dict[str, Any], *,
                error: bool = False) -> None:
        src = self.wire
        self._out.append(build_frame(src, d["src"], fanout=1, sid=d.get("sid", 0),
                                     st=d.get("st", 0), kind=kind, mid=d.get("mid", 0),
                                     body=encode_body(body), identity=self.token(),
                                     error=error))

    def _on_discovery(self, d: dict[str, Any]) -> None:
        try:
            self.verify(d.get("id"), d["src"])
        except AuthenticationError as exc:
            self.counters["unauthenticated"] += 1
            self._answer(d, Kind.DISCOVERY_REPLY, {"code": "unauthenticated",
                                                   "msg": exc.reason}, error=True)
            return
        self._answer(d, Kind.DISCOVERY_REPLY, {})

    def _on_join(self, d: dict[str, Any], now: float) -> None:
        try:
            subject = self.verify(d.get("id"), d["src"])
        except AuthenticationError as exc:
            self.counters["unauthenticated"] += 1
            self._answer(d, Kind.JOIN_REPLY, {"code": "unauthenticated", "msg": exc.reason},
                         error=True)
            return
        body = decode_body(d.get("body", b""))
        st = body.get("st", d.get("st"))
        if st not in (SessionType.POINT_TO_POINT, SessionType.GROUP):
            raise ProtocolViolation("join request: unknown session type")
        group = st == SessionType.GROUP
        channel = name_of(body.get("ch"), "ch", wildcard=True) if group else None
        if group and channel is None:
            raise ProtocolViolation("join request: a group needs a channel")
        rel = reliability_of(body.get("rel"))
        hb = heartbeat_of(body.get("hb")) if group else None
        mls = body.get("mls") is not None
        moderator = Member(name_of(d["src"], "src"), subject)
        info = JoinInfo(moderator=moderator.name, moderator_subject=subject,
                        session_id=d["sid"], kind=SessionKind.GROUP if group
                        else SessionKind.POINT_TO_POINT, channel=channel,
                        metadata=dict(d.get("meta") or {}), mls_enabled=mls)
        if self.pending_sessions >= MAX_PENDING_SESSIONS:
            self._answer(d, Kind.JOIN_REPLY, {"code": "busy", "msg": "too many new sessions"},
                         error=True)
            return
        if self.invite_policy is not None:
            verdict = self.invite_policy(info)
            if verdict is not True:
                reason = verdict if isinstance(verdict, str) else "declined"
                self.counters["invites_declined"] += 1
                self._answer(d, Kind.JOIN_REPLY, {"code": "declined", "msg": reason},
                             error=True)
                return
        # Liveness follows the moderator's settings (none from one that sends none).
        config = SessionConfig(
            kind=info.kind, timeout=rel[0] if rel else None,
            max_retries=rel[1] if rel else None, mls_enabled=mls, metadata=info.metadata,
            heartbeat_interval=hb[0] if hb else None,
            heartbeat_misses=hb[1] if hb else DEFAULT_HEARTBEAT_MISSES,
            moderator_grace=hb[2] if hb else DEFAULT_MODERATOR_GRACE)
        session = SessionCore(self, d["sid"], config, initiator=False,
                              destination=channel if channel is not None else moderator.name,
                              now=now)
        self.sessions[session.sid] = session
        session.accept_join(d, body, moderator, now)
        self._touch(session)

    def _on_error(self, d: dict[str, Any], now: float) -> None:
        err = Error.from_dict(d, self.limits)
        self.counters[f"node_error:{err.code}"] += 1
        session = self.sessions.get(err.session_id or 0)
        if session is not None:
            session.on_node_error(err.code, err.ref, err.name, now)
            self._touch(session)

    # -- events and timers -----------------------------------------------------------------

    def dispatch_events(self) -> list[Any]:
        """Events for the driver; counts sessions waiting to be listened for."""
        events = self.next_events()
        for e in events:
            if isinstance(e, Established) and not e.session.initiator:
                self.pending_sessions += 1
        return events

    def session_listened(self) -> None:
        self.pending_sessions = max(0, self.pending_sessions - 1)

    def _touch(self, session: SessionCore) -> None:
        # One live deadline per session; heap entries that disagree with it are stale.
        t = session.get_timer()
        sid = session.sid
        current = self._deadlines.get(sid)
        if t is None:
            if current is not None:
                del self._deadlines[sid]
            return
        if current == t:
            return
        self._deadlines[sid] = t
        if current is None or t < current:
            heapq.heappush(self._timers, (t, sid))

    def get_timer(self) -> float | None:
        timers = self._timers
        deadlines = self._deadlines
        while timers:
            t, sid = timers[0]
            d = deadlines.get(sid)
            if d == t and sid in self.sessions:
                return t
            heapq.heappop(timers)
            if d is not None and d > t and sid in self.sessions:
                heapq.heappush(timers, (d, sid))  # the deadline moved later
        return None

    def handle_timer(self, now: float) -> None:
        due: list[SessionCore] = []
        while (t := self.get_timer()) is not None and t <= now:
            _, sid = heapq.heappop(self._timers)
            del self._deadlines[sid]
            due.append(self.sessions[sid])
        for session in due:
            session.handle_timer(now)
            self._touch(session)
        self.flush(now)

    def statistics(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "subscriptions": len(self._subs),
                "counters": dict(self.counters)}


__all__ = ["AppCore", "Closed", "InvitePolicy", "JoinInfo", "SessionAnnounced"]
