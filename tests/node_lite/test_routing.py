"""RoutingTable: local matching, refcounts, static routes and path-vector propagation."""

from __future__ import annotations

import itertools
import random
from collections import Counter, deque
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from node_lite import Name, RoutingTable
from node_lite.wire import RouteAdvert, RouteUpdate

SVC = Name("org", "ns", "app")
CHAN = Name("org", "ns", "chan")


def table(node_id: str = "A", seed: int = 0) -> RoutingTable:
    return RoutingTable(node_id, rng=random.Random(seed))


# -- a multi-node harness ---------------------------------------------------------------


class Net:
    """Several routing tables joined by links, with FIFO delivery of route updates.

    A link is a pair of connection ids, one in each table. Client connections
    are small integers (< 100); link connections come from a counter at 100.
    """

    def __init__(self, node_ids: Iterable[str], *, seed: int = 0) -> None:
        self.tables = {n: RoutingTable(n, rng=random.Random(seed)) for n in node_ids}
        self.peer: dict[tuple[str, int], tuple[str, int]] = {}
        # One FIFO per direction, keyed by the receiving end.
        self.queues: dict[tuple[str, int], deque[RouteUpdate]] = {}
        self.received: list[tuple[str, int, RouteUpdate]] = []
        self._ids = itertools.count(100)
        self.steps = 0

    # topology

    def link(self, a: str, b: str, *, pump: bool = True) -> tuple[int, int]:
        ca, cb = next(self._ids), next(self._ids)
        self.peer[(a, ca)] = (b, cb)
        self.peer[(b, cb)] = (a, ca)
        self.queues[(a, ca)] = deque()
        self.queues[(b, cb)] = deque()
        full_a = self.tables[a].add_link(ca, b)
        full_b = self.tables[b].add_link(cb, a)
        assert full_a.full
        assert full_b.full
        self.queues[(b, cb)].append(full_a)
        self.queues[(a, ca)].append(full_b)
        if pump:
            self.pump()
        return ca, cb

    def unlink(self, a: str, ca: int, *, pump: bool = True) -> None:
        b, cb = self.peer.pop((a, ca))
        del self.peer[(b, cb)]
        # The connection is gone: whatever was in flight is lost.
        del self.queues[(a, ca)]
        del self.queues[(b, cb)]
        self.send(a, self.tables[a].remove_connection(ca))
        self.send(b, self.tables[b].remove_connection(cb))
        if pump:
            self.pump()

    def links_of(self, node: str) -> dict[int, str]:
        return {c: p[0] for (n, c), p in self.peer.items() if n == node}

    def is_link(self, node: str, conn: int) -> bool:
        return (node, conn) in self.peer

    def components(self) -> dict[str, frozenset[str]]:
        adj: dict[str, set[str]] = {n: set() for n in self.tables}
        for (a, _), (b, _) in self.peer.items():
            adj[a].add(b)
        out: dict[str, frozenset[str]] = {}
        for start in self.tables:
            if start in out:
                continue
            seen = {start}
            todo = [start]
            while todo:
                for nxt in adj[todo.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            comp = frozenset(seen)
            for n in comp:
                out[n] = comp
        return out

    # updates

    def send(self, node: str, updates: dict[int, RouteUpdate]) -> None:
        for conn, update in updates.items():
            assert (node, conn) in self.peer, f"update for {node}:{conn}, which is not a link"
            self.queues[self.peer[(node, conn)]].append(update)

    def subscribe(self, node: str, name: Name, conn: int) -> None:
        self.send(node, self.tables[node].subscribe(name, conn))

    def unsubscribe(self, node: str, name: Name, conn: int) -> bool:
        existed, updates = self.tables[node].unsubscribe(name, conn)
        self.send(node, updates)
        return existed

    def pending(self) -> list[tuple[str, int]]:
        return [k for k, q in self.queues.items() if q]

    def step(self, key: tuple[str, int]) -> None:
        node, conn = key
        update = self.queues[key].popleft()
        self.steps += 1
        self.received.append((node, conn, update))
        self.send(node, self.tables[node].apply_update(conn, update))

    def pump(self, *, max_steps: int = 5_000, rng: random.Random | None = None) -> int:
        """Deliver updates until quiescent; returns the number of deliveries."""
        start = self.steps
        while True:
            pending = self.pending()
            if not pending:
                return self.steps - start
            assert self.steps - start < max_steps, "route propagation does not terminate"
            self.step(rng.choice(pending) if rng else pending[0])

    # forwarding simulations

    def multicast(self, node: str, name: Name, sender: int) -> Counter[tuple[str, int]]:
        """Follow match_all across tables from a client ``sender`` on ``node``."""
        received: Counter[tuple[str, int]] = Counter()
        work: deque[tuple[str, int, list[str] | None]] = deque([(node, sender, None)])
        hops = 0
        while work:
            hops += 1
            assert hops < 1_000, "multicast loops"
            n, incoming, origins = work.popleft()
            for conn, served in self.tables[n].match_all(name, incoming, origins).items():
                if served is None:
                    assert not self.is_link(n, conn), "static routes are not used here"
                    received[(n, conn)] += 1
                else:
                    assert self.is_link(n, conn), "origins are only set for links"
                    assert served, "a link copy must serve at least one origin"
                    peer_node, peer_conn = self.peer[(n, conn)]
                    work.append((peer_node, peer_conn, served))
        return received

    def route_one(self, node: str, name: Name, sender: int) -> tuple[str, int] | None:
        """Follow match_one across tables; returns the client that gets the frame."""
        n, incoming = node, sender
        for _ in range(len(self.tables) + 1):
            conn = self.tables[n].match_one(name, incoming)
            if conn is None:
                return None
            if not self.is_link(n, conn):
                return n, conn
            n, incoming = self.peer[(n, conn)]
        raise AssertionError(f"unicast to {name} loops")


def remote_entries(t: RoutingTable) -> set[tuple[Name, str, int]]:
    return {e for e in t.entries() if e[1].startswith("remote:")}


def last_adverts(net: Net, node: str, name: Name) -> list[RouteAdvert]:
    return [a for n, _, u in net.received if n == node for a in u.add if a.name == name]


# -- local matching ---------------------------------------------------------------------


def test_anycast_returns_an_instance_never_the_incoming_conn() -> None:
    t = table()
    for i in range(1, 6):
        t.subscribe(SVC.with_id(i), i)
    for incoming in (None, 1, 2, 3, 4, 5, 42):
        for _ in range(50):
            conn = t.match_one(SVC, incoming)
            assert conn in {1, 2, 3, 4, 5}
            assert conn != incoming


def test_anycast_picks_every_instance_with_a_seeded_rng() -> None:
    t = RoutingTable("A", rng=random.Random(1234))
    for i in range(1, 6):
        t.subscribe(SVC.with_id(i), i)
    picks = Counter(t.match_one(SVC) for _ in range(500))
    assert set(picks) == {1, 2, 3, 4, 5}
    assert min(picks.values()) > 50
    # The same seed gives the same sequence.
    a = RoutingTable("A", rng=random.Random(7))
    b = RoutingTable("A", rng=random.Random(7))
    for t2 in (a, b):
        for i in range(1, 6):
            t2.subscribe(SVC.with_id(i), i)
    assert [a.match_one(SVC) for _ in range(50)] == [b.match_one(SVC) for _ in range(50)]


def test_anycast_with_only_the_incoming_instance_returns_none() -> None:
    t = table()
    t.subscribe(SVC.with_id(1), 1)
    assert t.match_one(SVC, incoming=1) is None
    assert t.match_one(SVC, incoming=2) == 1


def test_unicast_returns_exactly_that_conn_or_none() -> None:
    t = table()
    for i in range(1, 6):
        t.subscribe(SVC.with_id(i), i)
    for i in range(1, 6):
        assert all(t.match_one(SVC.with_id(i)) == i for _ in range(20))
    assert t.match_one(SVC.with_id(6)) is None
    assert t.match_one(SVC.with_id(3), incoming=3) is None
    assert t.match_one(Name("org", "ns", "other", 1)) is None
    assert t.match_one(Name("org", "other", "app", 1)) is None


def test_unicast_does_not_match_a_wildcard_subscription() -> None:
    t = table()
    t.subscribe(SVC, 1)
    assert t.match_one(SVC.with_id(5)) is None
    assert t.match_one(SVC) == 1


def test_match_one_prefers_local_and_falls_back_to_links() -> None:
    net = Net("AB")
    ca, _ = net.link("A", "B")
    net.subscribe("B", SVC.with_id(2), 7)
    net.pump()
    a = net.tables["A"]
    # Only B has an instance: A forwards over its link.
    assert a.match_one(SVC) == ca
    assert a.match_one(SVC.with_id(2)) == ca
    assert a.match_one(SVC.with_id(3)) is None
    # A local instance wins over the link, for anycast.
    net.subscribe("A", SVC.with_id(1), 1)
    net.pump()
    assert all(a.match_one(SVC) == 1 for _ in range(50))
    # ... but not when the frame came from that local instance.
    assert a.match_one(SVC, incoming=1) == ca
    # Unicast to B's instance still goes over the link.
    assert a.match_one(SVC.with_id(2)) == ca
    # Never back out the link a frame came in on.
    assert a.match_one(SVC.with_id(2), incoming=ca) is None
    net.unsubscribe("A", SVC.with_id(1), 1)
    net.pump()
    assert a.match_one(SVC) == ca


def test_static_link_route_is_not_preferred_over_a_local_client() -> None:
    # A static route points at a link: like a learned route, it is only a
    # fallback when no local client serves the name.
    t = table()
    t.add_link(100, "B")
    t.set_route(SVC, 100)
    assert t.match_one(SVC) == 100
    t.subscribe(SVC.with_id(1), 1)
    picks = {t.match_one(SVC) for _ in range(100)}
    assert picks == {1}


def test_match_all_returns_every_subscriber_except_incoming() -> None:
    t = table()
    for conn in (1, 2, 3):
        t.subscribe(CHAN, conn)
    assert t.match_all(CHAN) == {1: None, 2: None, 3: None}
    assert t.match_all(CHAN, incoming=2) == {1: None, 3: None}
    assert t.match_all(CHAN, incoming=9) == {1: None, 2: None, 3: None}


def test_match_all_without_subscribers_is_empty() -> None:
    t = table()
    assert t.match_all(CHAN) == {}
    t.subscribe(CHAN, 1)
    assert t.match_all(CHAN, incoming=1) == {}
    assert t.match_all(Name("org", "ns", "other")) == {}
    t.unsubscribe(CHAN, 1)
    assert t.match_all(CHAN) == {}
    assert len(t) == 0


def test_match_all_origins_filter_local_delivery() -> None:
    t = table("A")
    t.subscribe(CHAN, 1)
    assert t.match_all(CHAN, incoming=100, origins=["A"]) == {1: None}
    assert t.match_all(CHAN, incoming=100, origins=["B"]) == {}
    assert t.match_all(CHAN, incoming=100, origins=[]) == {}


# -- refcounts, static routes, connections ----------------------------------------------


def test_two_subscribes_need_two_unsubscribes() -> None:
    t = table()
    t.subscribe(CHAN, 1)
    t.subscribe(CHAN, 1)
    assert t.match_all(CHAN) == {1: None}
    assert len(t) == 1
    assert t.unsubscribe(CHAN, 1) == (True, {})
    assert t.has_local(CHAN, 1)
    assert t.match_all(CHAN) == {1: None}
    assert t.unsubscribe(CHAN, 1) == (True, {})
    assert not t.has_local(CHAN, 1)
    assert t.match_all(CHAN) == {}
    assert t.unsubscribe(CHAN, 1) == (False, {})


def test_unsubscribe_unknown_name_returns_false_and_no_updates() -> None:
    t = table()
    t.add_link(100, "B")
    assert t.unsubscribe(CHAN, 1) == (False, {})
    t.subscribe(CHAN, 1)
    assert t.unsubscribe(CHAN, 2) == (False, {})
    assert t.unsubscribe(CHAN.with_id(1), 1) == (False, {})
    assert t.unsubscribe(Name("x", "y", "z"), 1) == (False, {})
    assert t.has_local(CHAN, 1)


def test_subscribe_and_unsubscribe_advertise_only_on_change() -> None:
    t = table("A")
    t.add_link(100, "B")
    first = t.subscribe(CHAN, 1)
    assert first == {100: RouteUpdate(add=(RouteAdvert(CHAN, ("A",)),))}
    # More subscribers of the same name change nothing for the link.
    assert t.subscribe(CHAN, 2) == {}
    assert t.subscribe(CHAN, 1) == {}
    assert t.unsubscribe(CHAN, 1) == (True, {})
    assert t.unsubscribe(CHAN, 1) == (True, {})
    assert t.unsubscribe(CHAN, 2) == (True, {100: RouteUpdate(remove=((CHAN, "A"),))})


def test_static_route_is_matched_but_never_advertised() -> None:
    t = table("A")
    full = t.add_link(100, "B")
    assert full == RouteUpdate(full=True)
    t.add_link(101, "C")
    t.set_route(SVC.with_id(9), 100)
    t.set_route(CHAN, 5)
    assert t.match_one(SVC.with_id(9)) == 100
    assert t.match_one(SVC) == 100
    assert t.match_all(CHAN) == {5: None}
    assert (SVC.with_id(9), "static", 100) in t.entries()
    # Not in a full update of a new link, nor in the deltas of a later change.
    assert t.add_link(102, "D") == RouteUpdate(full=True)
    updates = t.subscribe(Name("o", "n", "x"), 1)
    assert all(a.name == Name("o", "n", "x") for u in updates.values() for a in u.add)
    assert t.remove_route(SVC.with_id(9), 100)
    assert t.match_one(SVC.with_id(9)) is None
    assert t.remove_route(CHAN, 5)
    assert t.match_all(CHAN) == {}
    assert not t.remove_route(CHAN, 5)


def test_static_route_beside_a_subscription_is_not_advertised() -> None:
    # A static route on a client conn does not make that conn's name advertised.
    t = table("A")
    t.add_link(100, "B")
    t.set_route(CHAN, 1)
    assert t.subscribe(CHAN, 2) == {100: RouteUpdate(add=(RouteAdvert(CHAN, ("A",)),))}


def test_remove_route_of_a_non_static_entry_returns_false() -> None:
    t = table()
    t.subscribe(CHAN, 1)
    gen = t.generation
    assert t.remove_route(CHAN, 1) is False
    assert t.remove_route(SVC, 1) is False
    assert t.generation == gen
    assert t.match_all(CHAN) == {1: None}


def test_remove_connection_removes_all_its_entries_and_withdraws() -> None:
    t = table("A")
    t.add_link(100, "B")
    t.subscribe(CHAN, 1)
    t.subscribe(CHAN, 1)
    t.subscribe(SVC.with_id(1), 1)
    t.subscribe(CHAN, 2)
    t.set_route(Name("o", "n", "static"), 1)
    updates = t.remove_connection(1)
    assert t.names_for(1) == []
    assert t.match_one(SVC.with_id(1)) is None
    assert t.match_all(CHAN) == {2: None}
    # CHAN is still served by conn 2; SVC/1 is withdrawn.
    assert updates == {100: RouteUpdate(remove=((SVC.with_id(1), "A"),))}
    updates = t.remove_connection(2)
    assert updates == {100: RouteUpdate(remove=((CHAN, "A"),))}
    assert t.entries() == []
    assert len(t) == 0
    assert t.remove_connection(3) == {}


def test_names_for_lists_local_names_of_a_conn() -> None:
    t = table()
    t.subscribe(CHAN, 1)
    t.subscribe(SVC.with_id(1), 1)
    t.subscribe(CHAN, 2)
    assert sorted(map(str, t.names_for(1))) == ["org/ns/app/1", "org/ns/chan"]
    assert t.names_for(2) == [CHAN]
    assert t.names_for(3) == []


def test_generation_increases_on_every_change() -> None:
    t = table("A")
    seen = [t.generation]

    def changed() -> None:
        assert t.generation > seen[-1]
        seen.append(t.generation)

    def unchanged() -> None:
        assert t.generation == seen[-1]

    t.add_link(100, "B")
    t.subscribe(CHAN, 1)
    changed()
    t.subscribe(CHAN, 1)
    changed()
    t.unsubscribe(CHAN, 1)
    changed()
    t.unsubscribe(CHAN, 9)
    unchanged()
    t.set_route(SVC, 100)
    changed()
    t.remove_route(SVC, 100)
    changed()
    t.remove_route(SVC, 100)
    unchanged()
    t.apply_update(100, RouteUpdate(add=(RouteAdvert(SVC.with_id(3), ("B",)),)))
    changed()
    t.apply_update(100, RouteUpdate(add=(RouteAdvert(SVC.with_id(4), ("C", "A", "B")),)))
    unchanged()  # a looping advert is ignored
    t.apply_update(100, RouteUpdate(remove=((SVC.with_id(3), "B"),)))
    changed()
    t.apply_update(100, RouteUpdate(remove=((SVC.with_id(3), "B"),)))
    unchanged()
    t.remove_connection(1)
    changed()
    t.remove_connection(1)
    unchanged()
    t.apply_update(100, RouteUpdate(full=True, add=(RouteAdvert(CHAN, ("B",)),)))
    changed()
    t.remove_connection(100)
    changed()


# -- link updates -----------------------------------------------------------------------


def test_add_link_returns_the_full_table() -> None:
    t = table("A")
    t.subscribe(CHAN, 1)
    t.subscribe(SVC.with_id(1), 2)
    t.add_link(100, "B")
    t.apply_update(100, RouteUpdate(add=(RouteAdvert(SVC.with_id(2), ("B",)),)))
    full = t.add_link(101, "C")
    assert full.full
    assert full.remove == ()
    assert set(full.add) == {
        RouteAdvert(CHAN, ("A",)),
        RouteAdvert(SVC.with_id(1), ("A",)),
        RouteAdvert(SVC.with_id(2), ("B", "A")),
    }
    # What B told A is not sent back to B.
    again = t.add_link(102, "B")
    assert RouteAdvert(SVC.with_id(2), ("B", "A")) not in again.add


def test_apply_update_on_an_unknown_conn_is_ignored() -> None:
    t = table("A")
    assert t.apply_update(7, RouteUpdate(add=(RouteAdvert(CHAN, ("B",)),))) == {}
    assert t.entries() == []
    assert t.match_all(CHAN) == {}


def test_adverts_whose_path_holds_this_node_are_ignored() -> None:
    t = table("A")
    t.add_link(100, "B")
    t.add_link(101, "C")
    out = t.apply_update(100, RouteUpdate(add=(RouteAdvert(CHAN, ("C", "A", "B")),
                                               RouteAdvert(SVC, ("A", "B")))))
    assert out == {}
    assert t.entries() == []
    assert t.match_all(CHAN) == {}


def test_learned_routes_are_readvertised_with_this_node_appended() -> None:
    t = table("A")
    t.add_link(100, "B")
    t.add_link(101, "C")
    out = t.apply_update(100, RouteUpdate(add=(RouteAdvert(CHAN, ("D", "B")),)))
    assert out == {101: RouteUpdate(add=(RouteAdvert(CHAN, ("D", "B", "A")),))}
    assert t.match_all(CHAN) == {100: ["D"]}
    assert (CHAN, "remote:D", 100) in t.entries()
    # A path through C is not offered to C: C would ignore it.
    out = t.apply_update(100, RouteUpdate(add=(RouteAdvert(SVC, ("E", "C", "B")),)))
    assert out == {}
    assert t.match_one(SVC) == 100
    # A full update from B replaces everything B said before.
    out = t.apply_update(100, RouteUpdate(full=True))
    assert out == {101: RouteUpdate(remove=((CHAN, "D"),))}
    assert t.entries() == []


# -- propagation across nodes -----------------------------------------------------------


def test_chain_subscription_is_reachable_from_the_far_end() -> None:
    net = Net("ABC")
    ab, ba = net.link("A", "B")
    bc, _ = net.link("B", "C")
    net.subscribe("C", SVC.with_id(3), 1)
    net.subscribe("C", CHAN, 1)
    net.pump()
    a, b = net.tables["A"], net.tables["B"]
    assert a.match_one(SVC) == ab
    assert a.match_one(SVC.with_id(3)) == ab
    assert b.match_one(SVC.with_id(3)) == bc
    assert a.match_all(CHAN) == {ab: ["C"]}
    assert b.match_all(CHAN, incoming=ba, origins=["C"]) == {bc: ["C"]}
    assert net.route_one("A", SVC, 50) == ("C", 1)
    assert net.route_one("A", SVC.with_id(3), 50) == ("C", 1)
    assert net.multicast("A", CHAN, 50) == Counter({("C", 1): 1})
    # C never learns its own subscription back.
    assert remote_entries(net.tables["C"]) == set()
    assert net.tables["C"].match_one(SVC, incoming=1) is None


def test_chain_paths_name_the_origin_first() -> None:
    net = Net("ABCD")
    net.link("A", "B")
    net.link("B", "C")
    net.link("C", "D")
    net.subscribe("D", CHAN, 1)
    net.pump()
    assert [a.path for a in last_adverts(net, "C", CHAN)] == [("D",)]
    assert [a.path for a in last_adverts(net, "B", CHAN)] == [("D", "C")]
    assert [a.path for a in last_adverts(net, "A", CHAN)] == [("D", "C", "B")]
    assert all(a.origin == "D" for n in "ABC" for a in last_adverts(net, n, CHAN))
    for n in "ABC":
        assert {e[1] for e in remote_entries(net.tables[n])} == {"remote:D"}
    # The advert never travels back towards D.
    assert last_adverts(net, "D", CHAN) == []


def test_chain_unsubscribe_withdraws_everywhere() -> None:
    net = Net("ABC")
    net.link("A", "B")
    net.link("B", "C")
    net.subscribe("C", CHAN, 1)
    net.subscribe("C", CHAN, 2)
    net.pump()
    assert net.unsubscribe("C", CHAN, 1)
    assert net.pump() == 0  # conn 2 still holds it: nothing to tell
    assert net.multicast("A", CHAN, 50) == Counter({("C", 2): 1})
    assert net.unsubscribe("C", CHAN, 2)
    assert net.pump() == 2
    for n, t in net.tables.items():
        assert t.entries() == [], n
        assert t.match_all(CHAN) == {}
        assert t.match_one(CHAN) is None
    assert not net.unsubscribe("C", CHAN, 2)
    assert net.pump() == 0


def test_chain_client_disconnect_withdraws_everywhere() -> None:
    net = Net("ABC")
    net.link("A", "B")
    net.link("B", "C")
    net.subscribe("C", CHAN, 1)
    net.subscribe("C", SVC.with_id(1), 1)
    net.subscribe("A", CHAN, 1)
    net.pump()
    net.send("C", net.tables["C"].remove_connection(1))
    net.pump()
    assert net.multicast("B", CHAN, 50) == Counter({("A", 1): 1})
    assert net.route_one("A", SVC.with_id(1), 50) is None
    assert all(e[1] == "remote:A" for n in "BC" for e in net.tables[n].entries())


def _channel_everywhere(net: Net) -> set[tuple[str, int]]:
    subscribers = set()
    for i, n in enumerate(net.tables):
        for conn in (1, 2):
            net.subscribe(n, CHAN, conn)
            subscribers.add((n, conn))
        net.subscribe(n, SVC.with_id(i + 1), 3)
    net.pump()
    return subscribers


def _check_exactly_once(net: Net, subscribers: set[tuple[str, int]]) -> None:
    for n in net.tables:
        # From a client that is not a subscriber: everyone gets one copy.
        got = net.multicast(n, CHAN, 50)
        assert got == Counter(dict.fromkeys(subscribers, 1)), n
        # From a subscriber: everyone else gets one copy, the sender none.
        got = net.multicast(n, CHAN, 1)
        assert got == Counter(dict.fromkeys(subscribers - {(n, 1)}, 1)), n
    for i, target in enumerate(net.tables):
        for n in net.tables:
            assert net.route_one(n, SVC.with_id(i + 1), 50) == (target, 3)
        assert net.route_one(target, SVC.with_id(i + 1), 3) is None


def test_triangle_propagation_terminates_and_multicast_is_exactly_once() -> None:
    net = Net("ABC")
    net.link("A", "B")
    net.link("B", "C")
    net.link("C", "A")
    subscribers = _channel_everywhere(net)
    assert net.steps < 100
    for n, t in net.tables.items():
        origins = {e[1] for e in remote_entries(t) if e[0] == CHAN}
        assert origins == {f"remote:{o}" for o in "ABC" if o != n}
    _check_exactly_once(net, subscribers)


def test_ring_of_four_multicast_is_exactly_once() -> None:
    net = Net("ABCD")
    for a, b in ("AB", "BC", "CD", "DA"):
        net.link(a, b)
    subscribers = _channel_everywhere(net)
    assert net.steps < 500
    _check_exactly_once(net, subscribers)
    # The opposite node is two hops away either way: still one copy.
    net.unsubscribe("B", CHAN, 1)
    net.unsubscribe("B", CHAN, 2)
    net.unsubscribe("D", CHAN, 1)
    net.unsubscribe("D", CHAN, 2)
    net.pump()
    assert net.multicast("A", CHAN, 50) == Counter({("A", 1): 1, ("A", 2): 1,
                                                    ("C", 1): 1, ("C", 2): 1})


def test_full_mesh_of_four_multicast_is_exactly_once() -> None:
    net = Net("ABCD")
    for a, b in itertools.combinations("ABCD", 2):
        net.link(a, b)
    subscribers = _channel_everywhere(net)
    assert net.steps < 1_000
    _check_exactly_once(net, subscribers)
    # Each origin is reached over the direct link, one hop.
    a = net.tables["A"]
    out = a.match_all(CHAN, incoming=1)
    assert sorted(o for served in out.values() if served for o in served) == ["B", "C", "D"]
    assert all(len(served) == 1 for served in out.values() if served is not None)


def test_subscription_on_one_node_of_a_ring_is_reached_from_everywhere() -> None:
    net = Net("ABCDE")
    for a, b in ("AB", "BC", "CD", "DE", "EA"):
        net.link(a, b)
    net.subscribe("C", CHAN, 1)
    net.pump()
    for n in "ABDE":
        assert net.multicast(n, CHAN, 50) == Counter({("C", 1): 1})
        assert net.route_one(n, CHAN, 50) == ("C", 1)
    net.unsubscribe("C", CHAN, 1)
    net.pump()
    for t in net.tables.values():
        assert t.entries() == []


def test_link_down_withdraws_and_reroutes() -> None:
    net = Net("ABC")
    ab, _ = net.link("A", "B")
    bc, _ = net.link("B", "C")
    _, ac = net.link("C", "A")
    net.subscribe("C", CHAN, 1)
    net.pump()
    a = net.tables["A"]
    assert a.match_all(CHAN) == {ac: ["C"]}
    # The direct link A-C goes down: A reaches C through B.
    net.unlink("A", ac)
    assert a.match_all(CHAN) == {ab: ["C"]}
    assert {e[2] for e in remote_entries(a)} == {ab}
    assert net.multicast("A", CHAN, 50) == Counter({("C", 1): 1})
    assert net.route_one("A", CHAN, 50) == ("C", 1)
    # B-C goes down too: C is cut off, every route to it is withdrawn.
    net.unlink("B", bc)
    for n in "AB":
        assert net.tables[n].entries() == []
        assert net.tables[n].match_all(CHAN) == {}
    assert net.tables["C"].entries() == [(CHAN, "local", 1)]
    # A new link gives a full resync that restores the routes.
    full = net.tables["C"].add_link(999, "B")
    assert full.full
    assert full.add == (RouteAdvert(CHAN, ("C",)),)
    net.tables["C"].remove_connection(999)
    bc2, _ = net.link("B", "C")
    for n in "AB":
        assert net.multicast(n, CHAN, 50) == Counter({("C", 1): 1})
    assert net.tables["B"].match_all(CHAN) == {bc2: ["C"]}


def test_link_down_in_a_chain_withdraws_learned_routes_only() -> None:
    net = Net("ABC")
    ab, _ = net.link("A", "B")
    net.link("B", "C")
    net.subscribe("A", CHAN, 1)
    net.subscribe("B", CHAN, 1)
    net.subscribe("C", CHAN, 1)
    net.pump()
    net.unlink("A", ab)
    assert net.multicast("A", CHAN, 50) == Counter({("A", 1): 1})
    assert net.multicast("C", CHAN, 50) == Counter({("B", 1): 1, ("C", 1): 1})
    assert {e[1] for e in remote_entries(net.tables["C"])} == {"remote:B"}
    net.link("A", "B")
    for n in "ABC":
        assert net.multicast(n, CHAN, 50) == Counter({("A", 1): 1, ("B", 1): 1, ("C", 1): 1})


def test_parallel_links_deliver_one_copy() -> None:
    net = Net("AB")
    net.link("A", "B")
    net.link("B", "A")
    net.subscribe("B", CHAN, 1)
    net.subscribe("A", CHAN, 1)
    net.pump()
    assert net.multicast("A", CHAN, 50) == Counter({("A", 1): 1, ("B", 1): 1})
    assert net.multicast("B", CHAN, 1) == Counter({("A", 1): 1})


# -- property: random operations converge to the brute-force answer ---------------------

NODES = "ABCDE"
NAMES = [CHAN, SVC, SVC.with_id(1), SVC.with_id(2)]
CLIENTS = [1, 2, 3]


def _matches(pattern: Name, subscribed: Name) -> bool:
    return pattern.service == subscribed.service and (
        pattern.id is None or pattern.id == subscribed.id
    )


def _check_against_brute_force(net: Net, subs: dict[tuple[str, int], Counter[Name]]) -> None:
    comps = net.components()
    live = {(key, name) for key, names in subs.items() for name, n in names.items() if n > 0}
    # No stale routes: every learned origin is connected and subscribed to that name.
    for n, t in net.tables.items():
        for name, kind, conn in t.entries():
            if kind.startswith("remote:"):
                origin = kind.removeprefix("remote:")
                assert origin in comps[n], (n, name, kind)
                assert any(k[0] == origin and nm == name for k, nm in live), (n, name, kind)
                assert net.is_link(n, conn)
            else:
                assert kind == "local"
                assert ((n, conn), name) in live
    for n in net.tables:
        for pattern in NAMES:
            expected = {key for key, name in live
                        if key[0] in comps[n] and _matches(pattern, name)}
            got = net.multicast(n, pattern, 50)
            assert got == Counter(dict.fromkeys(expected, 1)), (n, pattern)
            target = net.route_one(n, pattern, 50)
            if expected:
                assert target in expected, (n, pattern, target)
                local = {k for k in expected if k[0] == n}
                if local:
                    assert target in local
            else:
                assert target is None


op = st.one_of(
    st.tuples(st.just("sub"), st.sampled_from(NODES), st.sampled_from(CLIENTS),
              st.sampled_from(NAMES)),
    st.tuples(st.just("unsub"), st.sampled_from(NODES), st.sampled_from(CLIENTS),
              st.sampled_from(NAMES)),
    st.tuples(st.just("drop"), st.sampled_from(NODES), st.sampled_from(CLIENTS),
              st.just(CHAN)),
    st.tuples(st.just("flap"), st.integers(0, 10), st.just(0), st.just(CHAN)),
)


@settings(max_examples=150)
@given(
    size=st.integers(2, 5),
    shape=st.sampled_from(["tree", "cycle", "mesh"]),
    tree_seed=st.randoms(use_true_random=False),
    order=st.randoms(use_true_random=False),
    ops=st.lists(op, max_size=25),
    settle_every=st.integers(1, 6),
)
def test_random_operations_converge_to_reachability(
    size: int, shape: str, tree_seed: random.Random, order: random.Random,
    ops: list[tuple[str, str | int, int, Name]], settle_every: int,
) -> None:
    nodes = NODES[:size]
    net = Net(nodes)
    if shape == "tree":
        edges = [(nodes[i], nodes[tree_seed.randrange(i)]) for i in range(1, size)]
    elif shape == "cycle":
        edges = [(nodes[i], nodes[(i + 1) % size]) for i in range(size if size > 2 else 1)]
    else:
        edges = list(itertools.combinations(nodes, 2))
    links: list[tuple[str, str, int | None]] = []
    for a, b in edges:
        ca, _ = net.link(a, b, pump=False)
        links.append((a, b, ca))
    subs: dict[tuple[str, int], Counter[Name]] = {
        (n, c): Counter() for n in nodes for c in CLIENTS
    }
    for i, (kind, where, conn, name) in enumerate(ops):
        if kind == "flap":
            assert isinstance(where, int)
            a, b, ca = links[where % len(links)]
            if ca is None:
                ca, _ = net.link(a, b, pump=False)
            else:
                net.unlink(a, ca, pump=False)
                ca = None
            links[where % len(links)] = (a, b, ca)
            continue
        assert isinstance(where, str)
        if where not in nodes:
            continue
        key = (where, conn)
        if kind == "sub":
            net.subscribe(where, name, conn)
            subs[key][name] += 1
        elif kind == "unsub":
            existed = net.unsubscribe(where, name, conn)
            assert existed == (subs[key][name] > 0)
            if existed:
                subs[key][name] -= 1
        else:
            net.send(where, net.tables[where].remove_connection(conn))
            subs[key].clear()
        if i % settle_every == 0:
            # Deliver some, not all, updates in a random interleaving of links.
            for _ in range(order.randrange(8)):
                pending = net.pending()
                if pending:
                    net.step(order.choice(pending))
    net.pump(rng=order)
    _check_against_brute_force(net, subs)
