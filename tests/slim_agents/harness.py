"""Sans-IO network for session tests: AppCores talking through a real NodeCore.

No sockets and no event loop: frames move when :meth:`Net.pump` is called
and time moves with :meth:`Net.advance`. An optional :class:`Faults` drops,
duplicates and reorders session frames (seeded); other injectors build on
:class:`FaultInjector`, the part they share.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node_lite import (
    Name,
    NodeCore,
    SharedSecretProvider,
    SharedSecretVerifier,
    instance_id_for,
)
from node_lite.wire import FrameDecoder, Hello, decode_frame, encode_frame
from slim_agents._app_core import AppCore, InvitePolicy
from slim_agents._e2e import SigningIdentity
from slim_agents._session_core import Established

SECRET = "harness-secret-that-is-long-enough-0123456789"
T0 = 1_700_000_000.0


class ListSink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: tuple[str | None, str] | None = None

    @property
    def pending_bytes(self) -> int:
        return 0

    @property
    def pending_frames(self) -> int:
        return 0

    def write(self, data: bytes | memoryview, frames: int = 1) -> None:
        self.data += bytes(data)

    def close(self, code: str | None, message: str) -> None:
        self.closed = (code, message)

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


@dataclass
class FaultInjector:
    """What every fault injector on :class:`Net` shares: per lane, publish frames go
    through :meth:`on_publish` (the others pass untouched), and frames held back come
    out later on the same lane.

    A lane is one direction of one connection (``("up", conn)`` or ``("down", conn)``).
    A frame held for n rounds comes out at the end of the n-th :meth:`apply` on its
    lane from now (1: after the rest of its burst), so what was sent after it overtakes
    it; :meth:`flush` lets everything out once the network is otherwise quiet.
    """

    held: dict[Any, list[tuple[int, bytes]]] = field(default_factory=dict, kw_only=True)

    def on_publish(self, lane: Any, frame: bytes) -> list[bytes]:
        """The frames to pass on now in place of one publish frame (here: itself)."""
        return [frame]

    def hold_back(self, lane: Any, frame: bytes, rounds: int) -> None:
        self.held.setdefault(lane, []).append((rounds, frame))

    def apply(self, lane: Any, frames: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for f in frames:
            if decode_frame(f[4:]).get("t") == "pub":
                out.extend(self.on_publish(lane, f))
            else:
                out.append(f)
        still = []
        for rounds, f in self.held.get(lane, []):
            if rounds <= 1:
                out.append(f)
            else:
                still.append((rounds - 1, f))
        self.held[lane] = still
        return out

    def any_held(self) -> bool:
        return any(self.held.values())

    def flush(self, lane: Any) -> list[bytes]:
        out = [f for _, f in self.held.get(lane, [])]
        self.held[lane] = []
        return out


@dataclass
class Faults(FaultInjector):
    """Seeded drop/duplicate/reorder of session frames (publishes only), per lane;
    a reordered frame is held back for one to three rounds."""

    seed: int = 0
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    rng: random.Random = field(init=False)
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def on_publish(self, lane: Any, frame: bytes) -> list[bytes]:
        r = self.rng.random()
        if r < self.drop:
            self.dropped += 1
            return []
        if r < self.drop + self.reorder:
            self.reordered += 1
            self.hold_back(lane, frame, self.rng.randrange(1, 4))
            return []
        if self.rng.random() < self.dup:
            self.duplicated += 1
            return [frame, frame]
        return [frame]


def split(data: bytes) -> list[bytes]:
    return [bytes(f) for f in FrameDecoder(1 << 24).feed(data)]


class Net:
    def __init__(self, *, faults: FaultInjector | None = None, seed: int = 0,
                 node_secret: str | None = SECRET) -> None:
        verifier = SharedSecretVerifier(node_secret) if node_secret else None
        self.node = NodeCore("harness", verifier=verifier, rng=random.Random(seed))
        self.now = T0
        self.faults = faults
        self.apps: dict[int, AppCore] = {}
        self.sinks: dict[int, ListSink] = {}
        self.events: dict[int, list[Any]] = defaultdict(list)
        self._ids = itertools.count(1)
        self._seed = seed
        #: Every frame the node reads (a wiretap), and an optional rewrite of the
        #: frames it delivers (a hostile router): return None to drop one.
        self.tapped: list[bytes] = []
        self.mutate: Callable[[dict[str, Any], AppCore], dict[str, Any] | None] | None = None

    def add_app(self, app: str, *, org: str = "org", ns: str = "ns", secret: str = SECRET,
                policy: InvitePolicy | None = None, verify: bool = True,
                bind_key: bool = True) -> AppCore:
        signing = SigningIdentity.generate()
        provider = SharedSecretProvider(f"{org}/{ns}/{app}", secret,
                                        claims=signing.pubkey_claim() if bind_key else None)
        name = Name(org, ns, app, instance_id_for(provider.subject))
        verifier = SharedSecretVerifier(secret, replay_cache=0) if verify else None
        conn = next(self._ids)
        core = AppCore(name, provider, verifier, rng=random.Random(self._seed * 1000 + conn),
                       invite_policy=policy, signing=signing)
        sink = ListSink()
        self.apps[conn] = core
        self.sinks[conn] = sink
        self.node.connection_made(conn, sink, self.now)
        self.node.data_received(conn, encode_frame(Hello(token=provider.get_token(now=self.now),
                                                         name=name)), self.now)
        return core

    def conn_of(self, app: AppCore) -> int:
        return next(c for c, a in self.apps.items() if a is app)

    def pump(self, max_rounds: int = 10_000) -> None:
        """Move frames until nothing moves (held-back frames are released at the end)."""
        faults = self.faults
        for _ in range(max_rounds):
            moved = False
            for conn, app in self.apps.items():
                frames = app.take_frames()
                if faults is not None:
                    frames = faults.apply(("up", conn), frames)
                if frames:
                    moved = True
                    self.tapped.extend(frames)
                    self.node.data_received(conn, b"".join(frames), self.now)
            for conn, sink in self.sinks.items():
                frames = split(sink.take())
                if faults is not None:
                    frames = faults.apply(("down", conn), frames)
                if not frames:
                    continue
                moved = True
                self.apps[conn].receive(self._rewrite(frames, self.apps[conn]), self.now)
            for conn, app in self.apps.items():
                self.events[conn].extend(app.dispatch_events())
            if moved:
                continue
            if faults is None or not faults.any_held():
                return
            for conn in self.apps:
                up = faults.flush(("up", conn))
                if up:
                    self.node.data_received(conn, b"".join(up), self.now)
                down = faults.flush(("down", conn))
                if down:
                    self.apps[conn].receive(self._rewrite(down, self.apps[conn]), self.now)
        raise AssertionError("the network did not settle")

    def _rewrite(self, frames: list[bytes], app: AppCore) -> list[dict[str, Any]]:
        decoded = [decode_frame(f[4:]) for f in frames]
        mutate = self.mutate
        if mutate is None:
            return decoded
        return [m for d in decoded if (m := mutate(d, app)) is not None]

    def advance(self, dt: float) -> None:
        """Move time forward by ``dt``, firing timers on the way."""
        end = self.now + dt
        while True:
            timers = [(t, c) for c, a in self.apps.items() if (t := a.get_timer()) is not None]
            due = [t for t, _ in timers if t <= end]
            if not due:
                break
            self.now = max(self.now, min(due))
            for _, app in self.apps.items():
                t = app.get_timer()
                if t is not None and t <= self.now:
                    app.handle_timer(self.now)
            self.pump()
        self.now = end
        self.pump()

    def settle(self, seconds: float = 60.0, step: float = 0.5) -> None:
        """Pump and run timers until quiet, for up to ``seconds`` of virtual time."""
        self.pump()
        waited = 0.0
        while waited < seconds:
            if all(a.get_timer() is None for a in self.apps.values()):
                return
            self.advance(step)
            waited += step

    def announced(self, app: AppCore) -> list[Any]:
        conn = self.conn_of(app)
        return [e.session for e in self.events[conn]
                if isinstance(e, Established) and not e.session.initiator]
