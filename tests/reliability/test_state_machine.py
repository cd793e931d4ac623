"""B-21 (a): hypothesis state machines for the session layer, on the sans-IO harness.

A reliable session (point-to-point, or a group of three where everyone sends,
E2E on or off) runs through a real NodeCore while the machine publishes, drops,
duplicates, reorders and delays the next frames, moves time, and (point-to-point)
crashes and restarts the receiver under the same identity.

Invariants, after every step:

* per receiver and sender, what ``get_message`` would yield is the sender's
  messages in order from message id 1, each exactly once, where a gap may only
  be filled by an explicit ``MessageLostError``; every payload is the one sent
  under that id; no ``DecryptError`` (nothing is tampered with here);
* no exception leaves a core except the declared ones (``WindowFull`` and
  ``SessionClosedError`` from ``publish``), and no frame is counted malformed;
* a publish ticket fails only with ``DeliveryError`` or ``SessionClosedError``.

At teardown the faults stop and the network settles: every ticket has resolved,
and every acknowledged message was delivered (not reported lost).

Default: 25 examples of up to 30 steps per machine. ``SLIM_STATEFUL_EXAMPLES``
and ``SLIM_STATEFUL_STEPS`` make longer runs.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from node_lite import Name, SharedSecretProvider, SharedSecretVerifier, instance_id_for
from node_lite.wire import Hello, Ping, Publish, decode_frame, encode_frame
from slim_agents._app_core import AppCore
from slim_agents._config import SessionConfig
from slim_agents._e2e import SigningIdentity
from slim_agents._errors import DeliveryError, MessageLostError, SessionClosedError
from slim_agents._reports import Message, Ticket
from slim_agents._session_core import SessionCore, State, WindowFull
from slim_agents._session_e2e import DecryptError
from tests.slim_agents.harness import SECRET, FaultInjector, ListSink, Net

pytestmark = pytest.mark.matrix("B-21")

EXAMPLES = int(os.environ.get("SLIM_STATEFUL_EXAMPLES", "25"))
STEPS = int(os.environ.get("SLIM_STATEFUL_STEPS", "30"))
RELIABLE = {"timeout": 1.0, "max_retries": 10}
CHAN = Name("org", "ns", "sm-chan")
_conn_ids = itertools.count(10_000)


@dataclass
class Chaos(FaultInjector):
    """Faults on the next session frames, driven by the machine.

    ``drop``/``dup``/``hold`` act on the next n publish frames of any lane; a held
    frame comes out on its lane's next pump round, after what was sent behind it
    (reordering, by the harness's :class:`FaultInjector`); ``park`` keeps frames
    until :meth:`release`, past time ticks (delay).
    """

    drop: int = 0
    dup: int = 0
    hold: int = 0
    park: int = 0
    parked: list[tuple[Any, bytes]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def clear(self) -> None:
        self.drop = self.dup = self.hold = self.park = 0

    def on_publish(self, lane: Any, frame: bytes) -> list[bytes]:
        if self.drop:
            self.drop -= 1
            self.counts["dropped"] += 1
            return []
        if self.park:
            self.park -= 1
            self.counts["delayed"] += 1
            self.parked.append((lane, frame))
            return []
        if self.hold:
            self.hold -= 1
            self.counts["reordered"] += 1
            self.hold_back(lane, frame, 2)
            return []
        if self.dup:
            self.dup -= 1
            self.counts["duplicated"] += 1
            return [frame, frame]
        return [frame]

    def release(self, net: Net) -> None:
        """Deliver the parked frames (late: after everything sent since)."""
        parked, self.parked = self.parked, []
        for (direction, conn), f in parked:
            if conn not in net.apps:
                continue  # its connection is gone
            if direction == "up":
                net.node.data_received(conn, f, net.now)
            else:
                net.apps[conn].receive([decode_frame(f[4:])], net.now)
        net.pump()


@dataclass
class Party:
    """One app and its session, and what it sent."""

    app: AppCore
    session: SessionCore
    provider: SharedSecretProvider
    sent: list[bytes] = field(default_factory=list)  # payload of message id i + 1
    tickets: list[tuple[int, Ticket]] = field(default_factory=list)  # (message id, ticket)


def _identity(app: str, subject: str | None = None
              ) -> tuple[SharedSecretProvider, SigningIdentity, Name]:
    signing = SigningIdentity.generate()
    provider = SharedSecretProvider(f"org/ns/{app}", SECRET, claims=signing.pubkey_claim(),
                                    subject=subject)
    return provider, signing, Name("org", "ns", app, instance_id_for(provider.subject))


def _attach(net: Net, app: str, subject: str | None = None
            ) -> tuple[AppCore, SharedSecretProvider]:
    """An app on its own connection to the harness's node (as ``Net.add_app``, but
    with a chosen subject, so a restarted app keeps its name)."""
    provider, signing, name = _identity(app, subject)
    core = AppCore(name, provider, SharedSecretVerifier(SECRET, replay_cache=0),
                   signing=signing)
    conn = next(_conn_ids)
    sink = ListSink()
    net.apps[conn], net.sinks[conn] = core, sink
    net.node.connection_made(conn, sink, net.now)
    net.node.data_received(conn, encode_frame(Hello(token=provider.get_token(now=net.now),
                                                    name=name)), net.now)
    return core, provider


class SessionMachine(RuleBasedStateMachine):
    """The shared rules; subclasses build the topology in an ``initialize`` rule."""

    group = False

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.chaos = Chaos()
        self.parties: list[Party] = []
        # (receiver index, sender name) -> ids yielded so far, in order (lost ones negative)
        self.log: dict[tuple[int, Name], list[int]] = {}
        self.crashed = False

    # -- topology ---------------------------------------------------------------------------

    def config(self, e2e: bool) -> SessionConfig:
        kw: dict[str, Any] = dict(RELIABLE, mls_enabled=e2e)
        return SessionConfig.group(**kw) if self.group else SessionConfig(**kw)

    def start(self, e2e: bool) -> None:
        net = self.net
        first, provider = _attach(net, "sm-a")
        others = [_attach(net, f"sm-{c}") for c in ("b", "c")[: 2 if self.group else 1]]
        net.pump()
        if self.group:
            s, ticket = first.create_session(CHAN, self.config(e2e), net.now)
            sessions = []
            for core, _ in others:
                t = s.invite(core.name.without_id(), net.now)
                first.operate(s)
                net.pump()
                assert t.resolved and t.error is None, t.error
                sessions.append(net.announced(core)[-1])
        else:
            (core, _), = others
            s, ticket = first.create_session(core.name.without_id(), self.config(e2e), net.now)
            net.pump()
            sessions = [net.announced(core)[-1]]
        assert ticket.resolved and ticket.error is None, ticket.error
        self.parties = [Party(first, s, provider)] + [
            Party(core, session, p) for (core, p), session in zip(others, sessions, strict=True)]
        net.faults = self.chaos

    # -- rules ------------------------------------------------------------------------------

    def _live(self, i: int) -> bool:
        return any(a is self.parties[i].app for a in self.net.apps.values())

    @rule(who=st.integers(0, 2), n=st.integers(1, 4))
    def publish(self, who: int, n: int) -> None:
        who %= len(self.parties)
        if not self._live(who):
            return
        p = self.parties[who]
        for _ in range(n):
            mid = len(p.sent) + 1
            payload = f"{p.app.name.app}:{mid}".encode()
            try:
                ticket = p.session.publish(payload, self.net.now)
            except (WindowFull, SessionClosedError):
                break
            p.sent.append(payload)
            p.tickets.append((mid, ticket))
            p.app.operate(p.session)
        self.net.pump()

    @rule(n=st.integers(1, 4))
    def drop_next(self, n: int) -> None:
        self.chaos.drop += n

    @rule(n=st.integers(1, 3))
    def duplicate_next(self, n: int) -> None:
        self.chaos.dup += n

    @rule(n=st.integers(1, 4))
    def reorder_next(self, n: int) -> None:
        self.chaos.hold += n

    @rule(n=st.integers(1, 4))
    def delay_next(self, n: int) -> None:
        self.chaos.park += n

    @rule()
    def release_delayed(self) -> None:
        self.chaos.release(self.net)

    @rule(dt=st.sampled_from([0.05, 0.3, 1.0, 2.5, 6.0]))
    def tick(self, dt: float) -> None:
        self.net.advance(dt)

    # -- checks ------------------------------------------------------------------------------

    def _collect(self) -> None:
        for i, p in enumerate(self.parties):
            inbox = p.session.inbox
            while inbox:
                item = inbox.popleft()
                if isinstance(item, Message):
                    src, mid = item.context.source_name, item.context.message_id
                    sender = self._sender(src)
                    assert sender.sent[mid - 1] == item.payload, (mid, item.payload)
                    self.log.setdefault((i, src), []).append(mid)
                elif isinstance(item, MessageLostError):
                    self.log.setdefault((i, item.source), []).append(-item.message_id)
                elif isinstance(item, DecryptError):
                    raise AssertionError(f"decrypt error without tampering: {item}")
                else:
                    raise AssertionError(f"undeclared item in the inbox: {item!r}")

    def _sender(self, name: Name) -> Party:
        return next(p for p in self.parties if p.app.name == name)

    @invariant()
    def exactly_once_in_order_or_lost(self) -> None:
        if not self.parties:
            return
        self._collect()
        for (i, src), ids in self.log.items():
            assert [abs(x) for x in ids] == list(range(1, len(ids) + 1)), (i, src, ids)

    @invariant()
    def only_declared_failures(self) -> None:
        for p in self.parties:
            assert p.app.counters["malformed"] == 0, dict(p.app.counters)
            for _, t in p.tickets:
                if t.resolved and t.error is not None:
                    assert isinstance(t.error, DeliveryError | SessionClosedError), t.error

    def teardown(self) -> None:
        if not self.parties:
            return
        self.chaos.clear()
        self.chaos.release(self.net)
        self.net.settle(300)
        self.exactly_once_in_order_or_lost()
        for j, p in enumerate(self.parties):
            if not self._live(j):
                continue  # its process died with its tickets
            for mid, t in p.tickets:
                assert t.resolved, f"publish {mid} of {p.app.name} never resolved"
                if t.error is not None:
                    continue
                # acknowledged: every receiver that is still around delivered it
                for i, q in enumerate(self.parties):
                    if q is p or not self._live(i) or q.session.state is State.CLOSED:
                        continue
                    assert mid in self.log.get((i, p.app.name), []), (p.app.name, mid, i)


class PointToPoint(SessionMachine):
    @initialize(e2e=st.booleans())
    def setup(self, e2e: bool) -> None:
        self.start(e2e)
        self.receiver = self.parties[1].app

    @precondition(lambda self: not self.crashed)
    @rule()
    def crash_receiver(self) -> None:
        """The receiver's process dies: its connection and session state are gone."""
        conn = self.net.conn_of(self.receiver)
        self.net.node.connection_lost(conn)
        del self.net.apps[conn], self.net.sinks[conn]
        self.crashed = True

    @precondition(lambda self: self.crashed)
    @rule()
    def restart_receiver(self) -> None:
        """It comes back under the same name, without the session: the sender hears so."""
        old = self.parties[1]
        self.receiver, _ = _attach(self.net, old.app.name.app, old.provider.subject)
        assert self.receiver.name == old.app.name
        self.net.pump()
        self.crashed = False


class Group(SessionMachine):
    group = True

    @initialize(e2e=st.booleans())
    def setup(self, e2e: bool) -> None:
        self.start(e2e)


_settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestPointToPoint = PointToPoint.TestCase
TestPointToPoint.settings = _settings
TestGroup = Group.TestCase
TestGroup.settings = _settings


# -- the faults happen ------------------------------------------------------------------------
# Every invariant above holds trivially if no frame is ever faulted, and hypothesis's own
# schedules leave out a kind of fault in some runs (about one in five, at the defaults); so a
# fixed schedule makes each kind happen on real traffic, and a direct test pins what the
# injector does with the frames.

SCHEDULE: list[tuple[str, dict[str, Any]]] = [
    ("reorder_next", {"n": 3}), ("publish", {"who": 0, "n": 4}),
    ("drop_next", {"n": 2}), ("publish", {"who": 1, "n": 3}),
    ("duplicate_next", {"n": 2}), ("publish", {"who": 2, "n": 3}),
    ("delay_next", {"n": 2}), ("publish", {"who": 0, "n": 3}),
    ("tick", {"dt": 0.3}), ("release_delayed", {}), ("tick", {"dt": 2.5}),
]


@pytest.mark.parametrize("e2e", [False, True], ids=["plain", "e2e"])
@pytest.mark.parametrize("machine", [PointToPoint, Group], ids=["point-to-point", "group"])
def test_a_schedule_with_every_fault(machine: type[SessionMachine], e2e: bool) -> None:
    m = machine()
    m.setup(e2e)  # type: ignore[attr-defined]
    for name, kwargs in SCHEDULE:
        getattr(m, name)(**kwargs)
        m.exactly_once_in_order_or_lost()
        m.only_declared_failures()
    m.teardown()
    assert all(m.chaos.counts[kind] for kind in ("dropped", "duplicated", "reordered",
                                                 "delayed")), m.chaos.counts


def _publish(mid: int) -> bytes:
    return encode_frame(Publish(source=CHAN, destination=CHAN, message_id=mid))


def test_chaos_does_what_the_rules_ask() -> None:
    chaos = Chaos(drop=1, park=1, hold=1, dup=1)
    lane = ("down", 1)
    ping = encode_frame(Ping())
    f = [_publish(mid) for mid in range(6)]
    # drop f0, park f1, hold f2, duplicate f3, pass f4; other frames pass untouched
    assert chaos.apply(lane, [ping, *f[:5]]) == [ping, f[3], f[3], f[4]]
    assert chaos.parked == [(lane, f[1])]
    assert chaos.any_held()
    assert chaos.apply(("up", 1), [f[5]]) == [f[5]]  # held on its own lane only
    assert chaos.apply(lane, [f[5]]) == [f[5], f[2]]  # f2 comes out behind a later frame
    assert not chaos.any_held()
    assert chaos.counts == Counter(dropped=1, delayed=1, reordered=1, duplicated=1)
    chaos.hold = 1
    assert chaos.apply(lane, [f[0]]) == []
    assert chaos.flush(lane) == [f[0]]  # when the network is quiet, everything held goes
    assert chaos.apply(lane, []) == []
