# Routing table of one node (sans-IO).
#
# Invariants:
# * Entries are keyed by (org, ns, app) and instance id (None = wildcard).
# * Local entries point at client connections (subscriptions) or at links
#   (static routes from set_route, never advertised).
# * Remote entries are learned from links: for each origin node, the path
#   the advertisement travelled. An advertisement whose path holds this node
#   is ignored, so propagation never loops.
# * A multicast copy sent over a link names the origins it serves; each
#   origin is reached through one best link only, so a frame reaches every
#   subscriber once even when links form cycles.
# * match_* never return the connection a frame came in on (split horizon).
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from ._names import Name
from .wire import RouteAdvert, RouteUpdate

ServiceKey = tuple[str, str, str]
EntryKey = tuple[ServiceKey, int | None]


@dataclass(slots=True)
class _Service:
    # id -> conn -> reference count (subscriptions or static routes)
    local: dict[int | None, dict[int, int]]
    # id -> origin -> link conn -> path (origin first)
    remote: dict[int | None, dict[str, dict[int, tuple[str, ...]]]]


class RoutingTable:
    """Names to connections, with subscription propagation over links."""

    def __init__(self, node_id: str, *, rng: random.Random | None = None) -> None:
        self.node_id = node_id
        self._rng = rng or random.Random()
        self._services: dict[ServiceKey, _Service] = {}
        self._links: dict[int, str] = {}  # link conn -> peer node id
        self._sent: dict[int, dict[EntryKey, dict[str, tuple[str, ...]]]] = {}
        self._static: set[tuple[EntryKey, int]] = set()
        #: Bumped on every change; lets callers cache routing decisions.
        self.generation = 0

    # -- queries -------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(
            len(conns) for svc in self._services.values() for conns in svc.local.values()
        ) + sum(
            len(links) for svc in self._services.values()
            for origins in svc.remote.values() for links in origins.values()
        )

    def has_local(self, name: Name, conn: int) -> bool:
        svc = self._services.get(name.service)
        return bool(svc and conn in svc.local.get(name.id, ()))

    def match_one(self, name: Name, incoming: int | None = None) -> int | None:
        """The connection to send a single-receiver frame on, or ``None``.

        Without an instance id (anycast) any instance of the service may be
        chosen; local connections are preferred over links.
        """
        return self.match_one_key(name.service, name.id, incoming)

    def match_one_key(
        self, service: ServiceKey, id: int | None, incoming: int | None
    ) -> int | None:
        svc = self._services.get(service)
        if svc is None:
            return None
        ids: Iterable[int | None] = svc.local.keys() if id is None else (id,)
        local = [c for i in ids for c in svc.local.get(i, ()) if c != incoming]
        if local:
            clients = [c for c in local if c not in self._links]
            pick = clients or local  # static routes over links come after clients
            return pick[0] if len(pick) == 1 else self._rng.choice(pick)
        ids = svc.remote.keys() if id is None else (id,)
        best: tuple[int, int] | None = None
        for i in ids:
            for links in svc.remote.get(i, {}).values():
                for link, path in links.items():
                    if link != incoming and (best is None or (len(path), link) < best):
                        best = (len(path), link)
        return None if best is None else best[1]

    def match_all(
        self, name: Name, incoming: int | None = None, origins: Iterable[str] | None = None
    ) -> dict[int, list[str] | None]:
        """Every connection a channel frame goes to.

        The value is ``None`` for a local connection and, for a link, the list
        of origins that copy serves. ``origins`` restricts delivery to those
        origin nodes (set on frames that arrived over a link).
        """
        return self.match_all_key(name.service, name.id, incoming, origins)

    def match_all_key(
        self, service: ServiceKey, id: int | None, incoming: int | None,
        origins: Iterable[str] | None = None,
    ) -> dict[int, list[str] | None]:
        out: dict[int, list[str] | None] = {}
        svc = self._services.get(service)
        if svc is None:
            return out
        wanted = None if origins is None else set(origins)
        ids: Iterable[int | None] = svc.local.keys() if id is None else (id,)
        if wanted is None or self.node_id in wanted:
            for i in ids:
                for c in svc.local.get(i, ()):
                    if c != incoming:
                        out[c] = None
        ids = svc.remote.keys() if id is None else (id,)
        best: dict[str, tuple[int, int]] = {}
        for i in ids:
            for origin, links in svc.remote.get(i, {}).items():
                if wanted is not None and origin not in wanted:
                    continue
                for link, path in links.items():
                    if link == incoming:
                        continue
                    cand = (len(path), link)
                    if origin not in best or cand < best[origin]:
                        best[origin] = cand
        for origin, (_, link) in best.items():
            if link in out and out[link] is None:
                continue  # a static route on that link already carries everything
            served = out.setdefault(link, [])
            assert served is not None
            served.append(origin)
        return out

    def local_connections(self, name: Name) -> list[int]:
        """Connections routed ``name`` exactly (subscriptions and static routes), no wildcard."""
        svc = self._services.get(name.service)
        conns = svc.local.get(name.id) if svc else None
        return list(conns) if conns else []

    def names_for(self, conn: int) -> list[Name]:
        """Local names routed to ``conn``."""
        return [
            Name(*key, i)
            for key, svc in self._services.items()
            for i, conns in svc.local.items()
            if conn in conns
        ]

    def entries(self) -> list[tuple[Name, str, int]]:
        """(name, kind, connection) for every entry; kind is local, static or remote:<origin>."""
        out: list[tuple[Name, str, int]] = []
        for key, svc in self._services.items():
            for i, conns in svc.local.items():
                for c in conns:
                    kind = "static" if ((key, i), c) in self._static else "local"
                    out.append((Name(*key, i), kind, c))
            for i, origins in svc.remote.items():
                for origin, links in origins.items():
                    for link in links:
                        out.append((Name(*key, i), f"remote:{origin}", link))
        return out

    # -- local changes -------------------------------------------------------------

    def subscribe(self, name: Name, conn: int) -> dict[int, RouteUpdate]:
        """Route ``name`` to a client connection; returns route updates for links."""
        svc = self._service(name.service)
        conns = svc.local.setdefault(name.id, {})
        conns[conn] = conns.get(conn, 0) + 1
        self.generation += 1
        return self._propagate([(name.service, name.id)])

    def unsubscribe(self, name: Name, conn: int) -> tuple[bool, dict[int, RouteUpdate]]:
        """Withdraw one subscription; returns whether it existed and the link updates."""
        if not self._drop_local(name, conn, all_refs=False):
            return False, {}
        self.generation += 1
        return True, self._propagate([(name.service, name.id)])

    def set_route(self, name: Name, conn: int) -> None:
        """Route ``name`` over ``conn`` as if learned from it; nothing is advertised."""
        svc = self._service(name.service)
        conns = svc.local.setdefault(name.id, {})
        conns[conn] = conns.get(conn, 0) + 1
        self._static.add(((name.service, name.id), conn))
        self.generation += 1

    def remove_route(self, name: Name, conn: int) -> bool:
        """Remove a route made by :meth:`set_route`."""
        key = ((name.service, name.id), conn)
        if key not in self._static:
            return False
        self._drop_local(name, conn, all_refs=True)
        self._static.discard(key)
        self.generation += 1
        return True

    def remove_connection(self, conn: int) -> dict[int, RouteUpdate]:
        """Forget every entry of a closed connection (client or link)."""
        changed: list[EntryKey] = []
        for key, svc in list(self._services.items()):
            for i in list(svc.local):
                if conn in svc.local[i]:
                    del svc.local[i][conn]
                    self._static.discard(((key, i), conn))
                    changed.append((key, i))
                    if not svc.local[i]:
                        del svc.local[i]
            for i in list(svc.remote):
                for origin in list(svc.remote[i]):
                    links = svc.remote[i][origin]
                    if conn in links:
                        del links[conn]
                        changed.append((key, i))
                        if not links:
                            del svc.remote[i][origin]
                if not svc.remote[i]:
                    del svc.remote[i]
            self._gc(key)
        self._links.pop(conn, None)
        self._sent.pop(conn, None)
        if changed:
            self.generation += 1
        return self._propagate(changed)

    # -- links ---------------------------------------------------------------------

    def add_link(self, conn: int, peer_node_id: str) -> RouteUpdate:
        """Register a link that came up; returns the full table to send on it."""
        self._links[conn] = peer_node_id
        self._sent[conn] = {}
        adds: list[RouteAdvert] = []
        for key, svc in self._services.items():
            for i in set(svc.local) | set(svc.remote):
                export = self._export((key, i), conn)
                if export:
                    self._sent[conn][(key, i)] = export
                    adds.extend(RouteAdvert(Name(*key, i), p) for p in export.values())
        return RouteUpdate(full=True, add=tuple(adds))

    def apply_update(self, conn: int, update: RouteUpdate) -> dict[int, RouteUpdate]:
        """Apply a route update received on link ``conn``; returns updates for other links."""
        if conn not in self._links:
            return {}
        changed: list[EntryKey] = []
        if update.full:
            for key, svc in self._services.items():
                for i, origins in list(svc.remote.items()):
                    for origin, links in list(origins.items()):
                        if links.pop(conn, None) is not None:
                            changed.append((key, i))
                            if not links:
                                del origins[origin]
                    if not origins:
                        del svc.remote[i]
        for name, origin in update.remove:
            known = self._services.get(name.service)
            if known is None:
                continue
            by_origin = known.remote.get(name.id, {})
            found = by_origin.get(origin)
            if found is not None and found.pop(conn, None) is not None:
                changed.append((name.service, name.id))
                if not found:
                    del by_origin[origin]
                    if not by_origin:
                        del known.remote[name.id]
        for advert in update.add:
            if self.node_id in advert.path:
                continue  # loop: this node is already on the path
            svc = self._service(advert.name.service)
            svc.remote.setdefault(advert.name.id, {}).setdefault(advert.origin, {})[conn] = \
                advert.path
            changed.append((advert.name.service, advert.name.id))
        for key, _ in changed:
            self._gc(key)
        if changed:
            self.generation += 1
        return self._propagate(changed)

    # -- internals -----------------------------------------------------------------

    def _service(self, key: ServiceKey) -> _Service:
        svc = self._services.get(key)
        if svc is None:
            svc = self._services[key] = _Service(local={}, remote={})
        return svc

    def _gc(self, key: ServiceKey) -> None:
        svc = self._services.get(key)
        if svc is not None and not svc.local and not svc.remote:
            del self._services[key]

    def _drop_local(self, name: Name, conn: int, *, all_refs: bool) -> bool:
        svc = self._services.get(name.service)
        conns = svc.local.get(name.id) if svc else None
        if not conns or conn not in conns:
            return False
        if all_refs or conns[conn] <= 1:
            del conns[conn]
        else:
            conns[conn] -= 1
        if not conns:
            del svc.local[name.id]  # type: ignore[union-attr]
        self._gc(name.service)
        return True

    def _export(self, key: EntryKey, link: int) -> dict[str, tuple[str, ...]]:
        """What this node advertises for ``key`` on ``link``: origin -> path."""
        peer = self._links[link]
        svc = self._services.get(key[0])
        if svc is None:
            return {}
        out: dict[str, tuple[str, ...]] = {}
        conns = svc.local.get(key[1], {})
        if any(c not in self._links and (key, c) not in self._static for c in conns):
            out[self.node_id] = (self.node_id,)
        for origin, links in svc.remote.get(key[1], {}).items():
            candidates = [
                (len(p), c, p) for c, p in links.items() if c != link and peer not in p
            ]
            if candidates and origin != peer:
                out[origin] = (*min(candidates)[2], self.node_id)
        return out

    def _propagate(self, keys: Iterable[EntryKey]) -> dict[int, RouteUpdate]:
        updates: dict[int, RouteUpdate] = {}
        unique = list(dict.fromkeys(keys))
        if not unique:
            return updates
        for link in self._links:
            sent = self._sent[link]
            adds: list[RouteAdvert] = []
            removes: list[tuple[Name, str]] = []
            for key in unique:
                export = self._export(key, link)
                before = sent.get(key, {})
                name = Name(*key[0], key[1])
                for origin, path in export.items():
                    if before.get(origin) != path:
                        adds.append(RouteAdvert(name, path))
                for origin in before:
                    if origin not in export:
                        removes.append((name, origin))
                if export:
                    sent[key] = export
                else:
                    sent.pop(key, None)
            if adds or removes:
                updates[link] = RouteUpdate(add=tuple(adds), remove=tuple(removes))
        return updates
