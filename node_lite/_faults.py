# A fault-injecting TCP proxy for tests and benchmarks: it understands frames,
# so it can drop, duplicate, reorder, delay or truncate them (seeded), swallow
# everything (blackhole), throttle, or reset the connections it carries.
from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskGroup

from ._errors import ProtocolError
from ._transport import dial
from ._util import collapse_excgroups
from .wire import FrameDecoder, decode_frame


@dataclass
class FaultPlan:
    """What the proxy does to one direction of traffic; change it at any time.

    Probabilities apply per frame. ``only_publish`` spares control frames
    (hello, subscribe, acks from the node) so that faults hit session traffic.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_depth: int = 3
    delay: float = 0.0
    throttle: float | None = None  # bytes per second
    truncate_after: int | None = None  # bytes, then the connection is cut
    blackhole: bool = False
    only_publish: bool = True


@dataclass
class FaultStats:
    frames: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    swallowed: int = 0
    resets: int = 0
    connections: int = 0


@dataclass
class _Pair:
    client: ByteStream
    upstream: ByteStream
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class FaultProxy:
    """A TCP relay between clients and one upstream node (see :func:`open_fault_proxy`)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.up = FaultPlan()  # client -> upstream
        self.down = FaultPlan()  # upstream -> client
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._pairs: list[_Pair] = []
        self._tg: TaskGroup | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Cut every connection the proxy carries now (clients see a broken stream)."""
        for pair in list(self._pairs):
            pair.scope.cancel()
        self.stats.resets += 1

    async def _serve(self, listener: anyio.abc.SocketListener) -> None:
        async with listener:
            while True:
                client = await listener.accept()
                assert self._tg is not None
                self._tg.start_soon(self._carry, client)

    async def _carry(self, client: ByteStream) -> None:
        try:
            upstream = await dial(*self.upstream)
        except OSError:
            await anyio.aclose_forcefully(client)
            return
        pair = _Pair(client, upstream)
        self._pairs.append(pair)
        self.stats.connections += 1
        try:
            with pair.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, client, upstream, self.up, tg)
                    tg.start_soon(self._pump, upstream, client, self.down, tg)
        finally:
            self._pairs.remove(pair)
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(client)
                await anyio.aclose_forcefully(upstream)

    async def _pump(self, src: ByteStream, dst: ByteStream, plan: FaultPlan,
                    tg: TaskGroup) -> None:
        decoder = FrameDecoder(64 << 20)
        held: list[tuple[int, bytes]] = []
        sent_bytes = 0
        rng = self._rng
        stats = self.stats
        try:
            while True:
                data = await src.receive(65536)
                try:
                    frames = [bytes(f) for f in decoder.feed(data)]
                except ProtocolError:
                    frames = [data]  # not frames: pass bytes through
                out: list[bytes] = []
                for frame in frames:
                    stats.frames += 1
                    if plan.blackhole:
                        stats.swallowed += 1
                        continue
                    if plan.only_publish and not _is_publish(frame):
                        out.append(frame)
                        continue
                    r = rng.random()
                    if r < plan.drop:
                        stats.dropped += 1
                        continue
                    if r < plan.drop + plan.reorder:
                        stats.reordered += 1
                        held.append((rng.randrange(1, plan.reorder_depth + 1), frame))
                        continue
                    out.append(frame)
                    if rng.random() < plan.duplicate:
                        stats.duplicated += 1
                        out.append(frame)
                    still = []
                    for delay, f in held:
                        if delay <= 1:
                            out.append(f)
                        else:
                            still.append((delay - 1, f))
                    held = still
                if not out:
                    continue
                chunk = b"".join(out)
                if plan.delay:
                    await anyio.sleep(plan.delay)
                if plan.throttle:
                    await anyio.sleep(len(chunk) / plan.throttle)
                if plan.truncate_after is not None and sent_bytes + len(chunk) > \
                        plan.truncate_after:
                    await dst.send(chunk[:max(0, plan.truncate_after - sent_bytes)])
                    tg.cancel_scope.cancel()
                    return
                sent_bytes += len(chunk)
                await dst.send(chunk)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            tg.cancel_scope.cancel()


def _is_publish(frame: bytes) -> bool:
    try:
        return decode_frame(memoryview(frame)[4:], check_ext=False).get("t") == "pub"
    except ProtocolError:
        return False


@asynccontextmanager
async def open_fault_proxy(upstream: str, *, seed: int = 0) -> AsyncIterator[FaultProxy]:
    """Run a fault proxy in front of ``upstream`` (``host:port`` or ``http://host:port``).

    Connect clients to ``proxy.url``; steer faults with ``proxy.up`` and ``proxy.down``.
    """
    from ._config import split_endpoint

    host, port, _ = split_endpoint(upstream, "upstream")
    proxy = FaultProxy(host, port, seed=seed)
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener = multi.listeners[0]
    assert isinstance(listener, anyio.abc.SocketListener)
    proxy.port = listener.extra(SocketAttribute.local_port)
    with collapse_excgroups():
        async with anyio.create_task_group() as tg:
            proxy._tg = tg
            tg.start_soon(proxy._serve, listener)
            try:
                yield proxy
            finally:
                tg.cancel_scope.cancel()
