"""End-to-end encrypted sessions (mls_enabled) on the sans-IO harness: a real NodeCore
between the apps, a wiretap on everything the node reads, and a hostile router that
rewrites what it delivers."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_lite import Name
from node_lite.wire import decode_frame, encode_frame
from slim_agents._config import SessionConfig
from slim_agents._e2e import E2EError
from slim_agents._e2e_epoch import Chain, seal_app
from slim_agents._errors import SessionError, SessionRejectedError
from slim_agents._protocol import Kind, decode_body, encode_body
from slim_agents._reports import Message
from slim_agents._session_core import SessionCore, State
from slim_agents._session_e2e import (
    REFRESH_INTERVAL,
    REFRESH_MESSAGES,
    DecryptError,
    SessionKeys,
)
from tests.slim_agents.harness import FaultInjector, Faults, Net

RELIABLE = {"timeout": 1.0, "max_retries": 5}
E2E_GROUP = SessionConfig.group(mls_enabled=True, **RELIABLE)
CHAN = Name("org", "ns", "chan")


def payloads(session: SessionCore) -> list[bytes]:
    out = [m.payload for m in session.inbox if isinstance(m, Message)]
    session.inbox.clear()
    return out


def errors(session: SessionCore) -> list[BaseException]:
    out = [m for m in session.inbox if isinstance(m, BaseException)]
    session.inbox.clear()
    return out


def send(app: Any, session: SessionCore, payload: bytes, net: Net, **kw: Any) -> Any:
    ticket = session.publish(payload, net.now, **kw)
    app.operate(session)
    return ticket


def authenticators(sessions: list[SessionCore]) -> set[bytes]:
    infos = [s.encryption for s in sessions]
    assert all(i is not None for i in infos)
    return {i.authenticator for i in infos if i is not None}


def in_clear(net: Net, texts: list[bytes]) -> list[bytes]:
    return [t for t in texts if any(t in frame for frame in net.tapped)]


def p2p(net: Net, config: SessionConfig | None = None) -> tuple[Any, Any, SessionCore,
                                                                 SessionCore]:
    a, b = net.add_app("alice"), net.add_app("bob")
    net.pump()
    s, ticket = a.create_session(Name("org", "ns", "bob"),
                                 config or SessionConfig(mls_enabled=True, **RELIABLE), net.now)
    net.pump()
    assert ticket.resolved and ticket.error is None, ticket.error
    (r,) = net.announced(b)
    return a, b, s, r


def invite(net: Net, mod: Any, g: SessionCore, member: Any) -> SessionCore:
    t = g.invite(member.name.without_id(), net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved and t.error is None, t.error
    return net.announced(member)[-1]


def group(net: Net, n: int, config: SessionConfig = E2E_GROUP) -> tuple[Any, list[Any],
                                                                        SessionCore,
                                                                        list[SessionCore]]:
    mod = net.add_app("moderator")
    members = [net.add_app(f"m{i}") for i in range(n)]
    net.pump()
    g, _ = mod.create_session(CHAN, config, net.now)
    sessions: list[SessionCore] = []
    for m in members:
        sessions.append(invite(net, mod, g, m))
        # after every change, every member holds the same epoch and authenticator
        assert len(authenticators([g, *sessions])) == 1
        assert {frozenset(s.roster) for s in [g, *sessions]} == {frozenset(g.roster)}
    return mod, members, g, sessions


def remove(net: Net, mod: Any, g: SessionCore, name: Name) -> None:
    t = g.remove(name, net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved and t.error is None, t.error


# -- confidentiality and agreement -------------------------------------------------------


def test_point_to_point_is_encrypted_both_ways_and_the_tap_sees_no_body() -> None:
    net = Net()
    a, b, s, r = p2p(net)
    t = send(a, s, b"attack at dawn", net, payload_type="text", metadata={"k": "v"})
    net.pump()
    (msg,) = list(r.inbox)
    assert msg.payload == b"attack at dawn" and dict(msg.context.metadata) == {"k": "v"}
    assert t.result.delivered == (b.name,)
    send(b, r, b"retreat at noon", net, to=msg.context.source_name)
    net.pump()
    assert payloads(s) == [b"retreat at noon"]
    assert in_clear(net, [b"attack at dawn", b"retreat at noon"]) == []
    info = s.encryption
    assert info is not None and info.sender_auth == "group"  # two members: the key proves it
    assert authenticators([s, r]) == {info.authenticator}
    assert r.encryption is not None and r.encryption.bindings == {a.subject: "claim"}
    assert s.encryption is not None and s.encryption.bindings[b.subject] == "claim"


def test_group_of_ten_members_read_each_other_and_the_tap_sees_no_body() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 10)
    everyone = [(mod, g), *zip(members, sessions, strict=True)]
    texts = {i: f"secret number {i} from its sender".encode() for i in range(len(everyone))}
    tickets = [send(app, s, texts[i], net) for i, (app, s) in enumerate(everyone)]
    net.pump()
    assert all(t.resolved and t.error is None for t in tickets)
    for j, (_, session) in enumerate(everyone):
        assert sorted(payloads(session)) == sorted(texts[i] for i in texts if i != j)
    assert in_clear(net, list(texts.values())) == []
    assert g.encryption is not None and g.encryption.sender_auth == "signature"
    # a direct message inside the group is encrypted too
    send(members[3], sessions[3], b"only for m7", net, to=members[7].name)
    net.pump()
    assert payloads(sessions[7]) == [b"only for m7"]
    assert in_clear(net, [b"only for m7"]) == []


def test_without_a_key_claim_the_binding_is_reported_as_trust_on_first_use() -> None:
    net = Net()
    a, b = net.add_app("alice", bind_key=False), net.add_app("bob")
    net.pump()
    s, _ = a.create_session(b.name.without_id(), SessionConfig(mls_enabled=True), net.now)
    net.pump()
    (r,) = net.announced(b)
    assert r.encryption is not None and r.encryption.bindings == {a.subject: "tofu"}
    assert s.encryption is not None and s.encryption.bindings[b.subject] == "claim"


def test_a_removed_member_keeping_its_keys_reads_nothing_after_and_is_refused() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 4)
    victim, vs = members[1], sessions[1]
    assert vs.keys is not None and vs.keys.state is not None
    stolen = copy.deepcopy(vs.keys.state)  # its keys, kept against the rules
    remove(net, mod, g, victim.name)
    assert vs.state is State.CLOSED and vs.close_reason == "removed"
    rest = [g, sessions[0], *sessions[2:]]
    assert len(authenticators(rest)) == 1
    net.tapped.clear()
    send(mod, g, b"after the removal", net)
    net.pump()
    assert all(payloads(s) == [b"after the removal"] for s in rest[1:])
    (frame,) = [d for f in net.tapped if (d := decode_frame(f[4:])).get("k") == Kind.MSG]
    aad = SessionKeys.aad(frame["src"], CHAN.to_wire(), g.sid, g.st, frame["mid"], None, None)
    with pytest.raises(E2EError) as info:
        stolen.decrypt(frame["body"], aad, net.now)
    assert info.value.code == "epoch_pending"  # a later epoch it can never enter
    # What it sends with its old keys is refused by every member.
    forged_aad = SessionKeys.aad(victim.wire, CHAN.to_wire(), g.sid, g.st, 1, None, None)
    forged = stolen.encrypt(b"still here", forged_aad)
    for s in rest:
        assert s.keys is not None and s.keys.state is not None
        with pytest.raises(E2EError) as info:
            s.keys.state.decrypt(forged, forged_aad, net.now)
        assert info.value.code in ("not_member", "stale_epoch")
    victim.send(encode_frame({"v": 1, "t": "pub", "src": victim.wire, "dst": CHAN.to_wire(),
                              "fan": 2, "ttl": 8, "sid": g.sid, "st": int(g.st), "k": 1,
                              "mid": 1, "body": forged}))
    net.pump()
    assert all(s.inbox == type(s.inbox)() for s in rest)
    assert all(app.counters["data_from_non_member"] == 1
               for app in (mod, members[0], *members[2:]))


def test_a_late_joiner_cannot_read_what_was_sent_before_it_joined() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 2)
    net.tapped.clear()
    send(members[0], sessions[0], b"before you came", net)
    net.pump()
    early = [d for f in net.tapped if (d := decode_frame(f[4:])).get("k") == Kind.MSG]
    late_app = net.add_app("late")
    net.pump()
    late = invite(net, mod, g, late_app)
    assert len(authenticators([g, *sessions, late])) == 1
    assert late.keys is not None and late.keys.state is not None
    for d in early:
        aad = SessionKeys.aad(d["src"], CHAN.to_wire(), g.sid, g.st, d["mid"], None, None)
        with pytest.raises(E2EError) as info:
            late.keys.state.decrypt(d["body"], aad, net.now)
        assert info.value.code == "stale_epoch"
    # and replaying the old frames into its session yields an error, never the text
    late_app.receive([dict(d, dst=late_app.wire, fan=1) for d in early], net.now)
    assert payloads(late) == []


# -- integrity: tampering, impersonation, replay ------------------------------------------


@pytest.mark.parametrize("field", ["body", "mid", "pt", "meta", "dst"])
def test_a_tampered_header_or_body_is_refused_and_the_genuine_copy_still_arrives(
        field: str) -> None:
    net = Net()
    a, _b, s, r = p2p(net)

    def tamper(d: dict[str, Any], app: Any) -> dict[str, Any]:
        if d.get("k") != Kind.MSG or d["src"] != a.wire:
            return d
        d = dict(d)
        if field == "body":
            app_msg = msgpack.unpackb(d["body"])
            ct = bytearray(app_msg["ct"])
            ct[len(ct) // 2] ^= 1
            app_msg["ct"] = bytes(ct)
            d["body"] = msgpack.packb(app_msg)
        elif field == "mid":
            d["mid"] += 1
        elif field == "pt":
            d["pt"] = "other"
        elif field == "meta":
            d["meta"] = {"k": "forged"}
        else:  # marked as sent to this member alone, while it went to the session
            d["meta"] = {"k": "v", "PUBLISH_TO": "TRUE"}
        return d

    net.mutate = tamper
    t = send(a, s, b"original", net, payload_type="text", metadata={"k": "v"})
    net.pump()
    net.mutate = None
    (err,) = errors(r)
    assert isinstance(err, DecryptError) and err.code == "bad_tag"
    assert err.source == a.name and err.message_id == (2 if field == "mid" else 1)
    assert not t.resolved  # not acknowledged: the altered copy does not count
    send(a, s, b"next", net)
    net.pump()
    net.advance(1.0)  # the sender's own copy is sent again and gets through, in order
    assert payloads(r) == [b"original", b"next"]
    assert t.resolved and t.error is None


def test_a_member_labelling_its_message_as_another_members_is_refused() -> None:
    net = Net()
    _mod, members, g, sessions = group(net, 3, SessionConfig.group(mls_enabled=True))
    _liar, ls = members[0], sessions[0]
    victim = members[1]
    assert ls.keys is not None and ls.keys.state is not None
    # A hostile router delivers the liar's message as if the victim had sent it.
    aad = SessionKeys.aad(victim.wire, CHAN.to_wire(), g.sid, g.st, 77, None, None)
    frame = {"v": 1, "t": "pub", "src": victim.wire, "dst": CHAN.to_wire(), "fan": 2,
             "ttl": 8, "sid": g.sid, "st": int(g.st), "k": int(Kind.MSG), "mid": 77,
             "body": ls.keys.state.encrypt(b"I am m1", aad)}
    members[2].receive([frame], net.now)
    (err,) = errors(sessions[2])
    assert isinstance(err, DecryptError) and err.code == "bad_signature"
    assert err.source == victim.name
    # Or with the victim's leaf in the GK header: the key derives, the signature fails.
    state = ls.keys.state
    leaf = state.leaf_of(victim.subject)
    victim_chain = state._epoch.chain(leaf)
    forged = seal_app(Chain(bytearray(victim_chain.key)), state._identity,
                      group_id=state.group_id, epoch=state.epoch, leaf=leaf,
                      plaintext=b"I am m1", aad=aad, rng=os.urandom)
    members[2].receive([dict(frame, body=forged)], net.now)
    (err,) = errors(sessions[2])
    assert isinstance(err, DecryptError) and err.code == "bad_signature"


def test_replays_are_dropped() -> None:
    net = Net()
    a, b, s, r = p2p(net, SessionConfig(mls_enabled=True))  # best effort: no stream dedup
    send(a, s, b"once", net)
    net.pump()
    assert payloads(r) == [b"once"]
    (d,) = [d for f in net.tapped if (d := decode_frame(f[4:])).get("k") == Kind.MSG]
    b.receive([d, d], net.now)
    assert payloads(r) == [] and errors(r) == []
    assert b.counters["e2e:replay"] == 2
    # under another message id too: its generation is spent before any header check
    b.receive([dict(d, mid=d["mid"] + 5)], net.now)
    assert payloads(r) == [] and errors(r) == []
    assert b.counters["e2e:replay"] == 3


def test_reliable_duplicates_are_acknowledged_again_without_a_second_decrypt() -> None:
    net = Net()
    a, b, s, r = p2p(net)
    send(a, s, b"once", net)
    net.pump()
    (d,) = [d for f in net.tapped if (d := decode_frame(f[4:])).get("k") == Kind.MSG]
    assert payloads(r) == [b"once"]
    b.receive([d], net.now)
    assert payloads(r) == [] and b.counters["e2e:replay"] == 0


# -- membership changes ---------------------------------------------------------------


def test_messages_of_an_epoch_not_yet_reached_wait_for_its_commit() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 2)
    newcomer = net.add_app("newcomer")
    net.pump()
    # Hold back the add commit to m0; the moderator's next message overtakes it.
    held: list[dict[str, Any]] = []

    def hold_updates(d: dict[str, Any], app: Any) -> dict[str, Any] | None:
        if d.get("k") == Kind.GROUP_UPDATE and d["dst"] == CHAN.to_wire() and not held:
            held.append(d)
            return None
        return d

    net.mutate = hold_updates
    t = g.invite(newcomer.name.without_id(), net.now)
    mod.operate(g)
    net.pump()
    net.mutate = None
    assert held and not t.resolved
    (rejoin,) = [s for app, s in zip(members, sessions, strict=True)
                 if s.keys is not None and s.keys.state is not None
                 and s.keys.state.epoch < g.encryption.epoch]  # type: ignore[union-attr]
    send(mod, g, b"new epoch", net)
    net.pump()
    target = members[sessions.index(rejoin)]
    assert payloads(rejoin) == [] and target.counters["e2e:epoch_pending"] >= 1
    net.advance(1.0)  # the update is retried; the held message opens after it
    assert t.resolved and t.error is None, t.error
    assert payloads(rejoin) == [b"new epoch"]


def test_a_welcome_that_cannot_be_opened_fails_the_invite_and_the_group_takes_it_back() -> None:
    net = Net()
    mod, _members, g, sessions = group(net, 2)
    joiner = net.add_app("joiner")
    net.pump()

    def corrupt_welcome(d: dict[str, Any], app: Any) -> dict[str, Any]:
        if d.get("k") == Kind.GROUP_WELCOME:
            body = decode_body(d["body"])
            sealed = bytearray(body["mls"])
            sealed[-3] ^= 0xFF
            body["mls"] = bytes(sealed)
            return dict(d, body=encode_body(body))
        return d

    net.mutate = corrupt_welcome
    t = g.invite(joiner.name.without_id(), net.now)
    mod.operate(g)
    net.pump()
    net.mutate = None
    net.advance(2.0)
    assert t.resolved and isinstance(t.error, SessionRejectedError)
    assert t.error.code in ("bad_welcome", "malformed")
    assert joiner.counters[f"e2e:{t.error.code}"] == 1
    # the members counted the joiner in the update; they were told to drop it
    for s in [g, *sessions]:
        assert joiner.name not in s.roster
    assert len(authenticators([g, *sessions])) == 1
    send(mod, g, b"still fine", net)
    net.pump()
    assert all(payloads(s) == [b"still fine"] for s in sessions)


def test_a_member_that_refuses_a_commit_is_removed_before_the_welcome() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 3)
    joiner = net.add_app("joiner")
    net.pump()
    odd = members[1]

    def break_commit_for_one(d: dict[str, Any], app: Any) -> dict[str, Any]:
        if app is odd and d.get("k") == Kind.GROUP_UPDATE:
            body = decode_body(d["body"])
            if body.get("op") == "add":
                commit = bytearray(body["mls"][0])
                commit[-10] ^= 1
                body["mls"] = [bytes(commit)]
                return dict(d, body=encode_body(body))
        return d

    net.mutate = break_commit_for_one
    t = g.invite(joiner.name.without_id(), net.now)
    mod.operate(g)
    net.pump()
    net.mutate = None
    net.advance(2.0)
    assert t.resolved and t.error is None, t.error
    late = net.announced(joiner)[-1]
    kept = [g, sessions[0], sessions[2], late]
    assert odd.name not in g.roster and sessions[1].state is State.CLOSED
    assert odd.counters["e2e:bad_commit"] >= 1 and mod.counters["update_refused"] == 1
    assert len(authenticators(kept)) == 1
    assert {frozenset(s.roster) for s in kept} == {frozenset(g.roster)}
    send(joiner, late, b"hello from the joiner", net)
    net.pump()
    assert all(payloads(s) == [b"hello from the joiner"] for s in kept[:3])


def test_remove_above_64_members_sends_one_envelope_per_member() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 66, SessionConfig.group(mls_enabled=True))
    net.tapped.clear()
    remove(net, mod, g, members[10].name)
    updates = [d for f in net.tapped
               if (d := decode_frame(f[4:])).get("k") == Kind.GROUP_UPDATE]
    assert len(updates) == 66  # one per remaining member, and one for the removed one
    assert all(d["fan"] == 1 for d in updates)
    envelopes = {tuple(d["dst"]): decode_body(d["body"]).get("env") for d in updates}
    assert envelopes.pop(tuple(members[10].wire)) is None
    assert all(type(e[0]) is bytes for e in envelopes.values())
    rest = [g, *sessions[:10], *sessions[11:]]
    assert len(authenticators(rest)) == 1
    send(members[0], sessions[0], b"to the 65", net)
    net.pump()
    assert all(payloads(s) == [b"to the 65"] for s in rest[2:])


def test_refresh_by_the_moderator_on_demand_and_by_time() -> None:
    net = Net()
    mod, members, g, sessions = group(net, 3)
    assert g.encryption is not None
    epoch = g.encryption.epoch
    t = g.rotate_keys(net.now)
    mod.operate(g)
    net.pump()
    assert t.resolved and t.error is None
    assert g.encryption.epoch == epoch + 1
    assert len(authenticators([g, *sessions])) == 1
    net.advance(REFRESH_INTERVAL + 1)
    assert g.encryption.epoch == epoch + 2
    assert len(authenticators([g, *sessions])) == 1
    send(members[2], sessions[2], b"fresh keys", net)
    net.pump()
    assert payloads(g) == [b"fresh keys"]


def test_a_member_suspecting_a_leak_gets_a_new_epoch_with_its_new_key() -> None:
    net = Net()
    _mod, members, g, sessions = group(net, 3)
    assert g.encryption is not None
    epoch = g.encryption.epoch
    t = sessions[1].rotate_keys(net.now, suspect=True)
    members[1].operate(sessions[1])
    net.pump()
    assert t.resolved and t.error is None
    assert g.encryption.epoch > epoch
    assert len(authenticators([g, *sessions])) == 1


def test_rotating_keys_of_an_unencrypted_session_is_an_error() -> None:
    net = Net()
    _, _, plain, _ = p2p(net, SessionConfig(**RELIABLE))
    with pytest.raises(SessionError, match="not end-to-end encrypted"):
        plain.rotate_keys(net.now)


def test_closing_wipes_the_keys() -> None:
    net = Net()
    a, _b, s, r = p2p(net)
    assert s.keys is not None and r.keys is not None
    t = s.close(net.now)
    a.operate(s)
    net.pump()
    assert t.resolved
    assert s.encryption is None and r.encryption is None
    assert s.keys.state is not None
    with pytest.raises(E2EError):
        s.keys.state.encrypt(b"x", b"")


# -- reliability under faults, encrypted ------------------------------------------------


@settings(max_examples=int(os.environ.get("SLIM_FUZZ_EXAMPLES", 25)), deadline=None)
@given(seed=st.integers(0, 10_000), drop=st.floats(0, 0.2), dup=st.floats(0, 0.2),
       reorder=st.floats(0, 0.2))
def test_encrypted_group_is_exactly_once_in_order_under_faults_and_membership_changes(
        seed: int, drop: float, dup: float, reorder: float) -> None:
    net = Net(seed=seed)
    config = SessionConfig.group(mls_enabled=True, timeout=1.0, max_retries=30)
    mod, members, g, sessions = group(net, 3, config)
    net.faults = Faults(seed=seed, drop=drop, dup=dup, reorder=reorder)
    everyone = [(mod, g), *zip(members, sessions, strict=True)]
    sent: dict[int, list[bytes]] = {i: [] for i in range(len(everyone))}
    extra = net.add_app("extra")
    for k in range(6):
        for i, (app, session) in enumerate(everyone):
            p = f"{i}:{k}".encode()
            sent[i].append(p)
            send(app, session, p, net)
        if k == 2:  # a membership change and a refresh while messages are in flight
            g.invite(extra.name.without_id(), net.now)
            g.rotate_keys(net.now)
            mod.operate(g)
        net.pump()
    net.settle(120)
    for j, (_, session) in enumerate(everyone):
        assert [m for m in session.inbox if isinstance(m, BaseException)] == []
        got = payloads(session)
        for i in sent:
            if i != j:
                assert [p for p in got if p.startswith(f"{i}:".encode())] == sent[i]
    assert len(authenticators([s for _, s in everyone])) == 1


class DropFirstUpdate(FaultInjector):
    """Drops the first group update sent once armed (one copy, on the way up)."""

    armed = False
    dropped = 0

    def on_publish(self, lane: Any, frame: bytes) -> list[bytes]:
        if self.armed and not self.dropped and lane[0] == "up" \
                and decode_frame(frame[4:])["k"] == Kind.GROUP_UPDATE:
            self.dropped += 1
            return []
        return [frame]


@pytest.mark.parametrize("reliable", [False, True])
def test_a_refresh_a_publish_starts_is_retried_when_its_commit_is_lost(
        reliable: bool) -> None:
    # The publish that reaches the refresh count starts the refresh: its commit's
    # retransmission must be timed even though a publish adds no other deadline
    # (best effort) or only its own, later one (reliable).
    faults = DropFirstUpdate()
    net = Net(faults=faults)
    config = SessionConfig.group(mls_enabled=True, **(RELIABLE if reliable else {}))
    mod, _members, g, sessions = group(net, 2, config)
    assert g.encryption is not None and g.keys is not None
    epoch = g.encryption.epoch
    g.keys.messages = REFRESH_MESSAGES - 1
    faults.armed = True
    g.publish(b"the last of the epoch", net.now)
    mod.operate(g, math.inf if not reliable else net.now + 1000.0)
    net.pump()
    assert faults.dropped == 1
    assert {s.encryption.epoch for s in sessions if s.encryption} == {epoch}
    assert g.get_timer() == mod.get_timer()  # the app's timer is the session's
    net.advance(3.0)  # the commit's retransmission is due after 1 s
    assert {s.encryption.epoch for s in [g, *sessions] if s.encryption} == {epoch + 1}
    assert len(authenticators([g, *sessions])) == 1
