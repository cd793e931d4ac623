"""Slow consumers, fast senders and the node's memory."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from node_lite import Limits, NodeConfig, SlowConsumerPolicy, open_node, wire
from node_lite.wire import Hello, Publish, Subscribe
from tests.helpers import SECRET, app_connection, identity, node_yaml, wait_until

MiB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raw_app(port: int, app: str) -> tuple[socket.socket, wire.Name]:
    """A blocking socket that has completed the hello handshake."""
    provider, name = identity(app)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(wire.encode_frame(Hello(token=provider.get_token(), name=name)))
    decoder = wire.FrameDecoder()
    sock.settimeout(5)
    frames: list[memoryview] = []
    while not frames:
        frames = decoder.feed(sock.recv(65536))
    ack = wire.decode_message(wire.decode_frame(frames[0][4:]))
    assert ack.TYPE == "hello_ack", ack
    return sock, name


@contextmanager
def node_process(tmp_path: Path, backend: str, limits: str) -> Iterator[tuple[int, int]]:
    """A node subprocess with ``limits`` (YAML flow map body): (its pid, its port)."""
    config = node_yaml(tmp_path, limits)
    proc = subprocess.Popen([sys.executable, "-m", "node_lite", "--config", str(config),
                             "--backend", backend, "--log-level", "warn"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("node_lite ready"), line
        yield proc.pid, int(line.split()[-1].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def push_until_refused(sender: socket.socket, batch: bytes, cap: int) -> int:
    """Send ``batch`` again and again; the bytes the node took before it stopped
    reading the sender for a second (or past ``cap``, or after 20 s)."""
    pushed = 0
    sender.settimeout(1.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            sender.sendall(batch)
        except TimeoutError:
            break  # the node stopped reading us: backpressure reached the sender
        pushed += len(batch)
        if pushed > cap:
            break
    return pushed


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_node_memory_stays_bounded_under_a_fast_sender(backend: str, tmp_path: Path) -> None:
    """A sender blasting at a consumer that never reads: the node stops reading the sender."""
    with node_process(tmp_path, backend, "max_pending_bytes: 2097152, write_deadline: 60s"
                      ) as (pid, port):
        consumer, consumer_name = raw_app(port, "sink")  # never reads from here on
        sender, sender_name = raw_app(port, "blaster")
        frame = wire.encode_frame(Publish(source=sender_name, destination=consumer_name,
                                          payload=b"x" * 1024))
        baseline = rss_bytes(pid)
        pushed = push_until_refused(sender, frame * 256, 512 * MiB)  # ~280 KiB a send
        growth = rss_bytes(pid) - baseline
        assert pushed < 64 * MiB, f"the node kept reading: {pushed / MiB:.0f} MiB accepted"
        assert growth < 48 * MiB, f"node RSS grew by {growth / MiB:.0f} MiB"
        consumer.close()
        sender.close()
        print(f"{backend}: pushed {pushed / MiB:.1f} MiB, node RSS +{growth / MiB:.1f} MiB")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_fan_out_backlog_is_bounded_by_frames_too(backend: str, tmp_path: Path) -> None:
    """A sender blasting small frames at a channel whose members never read.

    Repeated frames are forwarded in runs (one write each); the backlog limit in
    frames must count the frames of a run, and bytes an idle transport took but
    could not send must still count as pending. Else eight members' backlogs grow
    to twice the byte limit each, far past the frame limit.
    """
    members: list[socket.socket] = []
    with node_process(tmp_path, backend, "max_pending_bytes: 16777216, "
                      "max_pending_frames: 2000, write_deadline: 60s") as (pid, port):
        try:
            channel = wire.Name("org", "ns", "fanout-chan")
            for i in range(8):
                sock, _ = raw_app(port, f"member{i}")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(wire.encode_frame(Subscribe(name=channel, request_id=1)))
                decoder = wire.FrameDecoder()
                acks: list[memoryview] = []
                while not acks:
                    acks = decoder.feed(sock.recv(65536))
                assert wire.decode_message(wire.decode_frame(acks[0][4:])).TYPE == "sub_ack"
                members.append(sock)  # never reads from here on
            sender, sender_name = raw_app(port, "blaster")
            frame = wire.encode_frame(Publish(source=sender_name, destination=channel,
                                              fanout=8, payload=b"x" * 100))
            baseline = rss_bytes(pid)
            pushed = push_until_refused(sender, frame * 1024, 64 * MiB)
            growth = rss_bytes(pid) - baseline
            # Measured: 8 MiB pushed (most of it in socket buffers), RSS +1 MiB; counting
            # a run as one frame, 24 MiB and +17 MiB.
            assert growth < 8 * MiB, f"node RSS grew by {growth / MiB:.0f} MiB"
            assert pushed < 16 * MiB, f"the node kept reading: {pushed / MiB:.0f} MiB accepted"
            sender.close()
        finally:
            for sock in members:
                sock.close()


async def blast(conn: object, name: wire.Name, dst: wire.Name, stop: anyio.Event) -> int:
    sent = 0
    frame = wire.encode_frame(Publish(source=name, destination=dst, payload=b"s" * 4096))
    while not stop.is_set():
        try:
            await conn.send(frame * 16)  # type: ignore[attr-defined]
        except anyio.ClosedResourceError:
            break  # the node closed us (shutdown, slow consumer cut)
        sent += 16
    return sent


async def receive_in_order(rx: object, count: int, timeout: float) -> None:
    """Publishes 0 .. count - 1 arrive at ``rx``, each once, in order."""
    seen = 0
    with anyio.fail_after(timeout):
        while seen < count:
            msg = await rx.receive()  # type: ignore[attr-defined]
            if isinstance(msg, Publish):
                assert msg.message_id == seen
                seen += 1


def pending_of(node: object, name: wire.Name) -> int:
    """The bytes the node holds for the connection of app ``name``."""
    per = node.statistics(per_connection=True).per_connection  # type: ignore[attr-defined]
    return next(s.pending_bytes for s in per if s.name == str(name))


async def fast_pair_exchange(url: str, count: int) -> None:
    async with app_connection(url, "fast-tx") as (tx, tx_name), \
            app_connection(url, "fast-rx") as (rx, rx_name):
        for i in range(count):
            await tx.send(Publish(source=tx_name, destination=rx_name, message_id=i,
                                  payload=b"f" * 64))
        await receive_in_order(rx, count, 20)


@pytest.mark.anyio
@pytest.mark.parametrize("policy", [SlowConsumerPolicy.WAIT, SlowConsumerPolicy.DROP])
async def test_slow_consumer_does_not_slow_a_fast_one(policy: SlowConsumerPolicy) -> None:
    limits = Limits(max_pending_bytes=MiB, slow_consumer=policy, write_deadline=60)
    async with open_node(NodeConfig(shared_secret=SECRET, limits=limits)) as node:
        async with app_connection(node.url, "slow") as (_slow, slow_name), \
                app_connection(node.url, "busy") as (busy, busy_name), \
                anyio.create_task_group() as tg:
            stop = anyio.Event()
            tg.start_soon(blast, busy, busy_name, slow_name, stop)

            def slow_backlog() -> int:
                return pending_of(node, slow_name)

            await wait_until(lambda: slow_backlog() >= MiB, message="slow consumer full")
            # While the slow consumer is stuck, a fast pair exchanges 3000 messages.
            await fast_pair_exchange(node.url, 3000)
            if policy is SlowConsumerPolicy.DROP:
                assert node.statistics().drops.get("queue_full", 0) > 0
            assert slow_backlog() < 2 * MiB  # bounded by the limit plus one read
            stop.set()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_write_deadline_cuts_a_stuck_consumer_and_frees_the_sender() -> None:
    limits = Limits(max_pending_bytes=MiB, write_deadline=0.5)
    async with open_node(NodeConfig(shared_secret=SECRET, limits=limits)) as node:
        async with app_connection(node.url, "stuck") as (_stuck, stuck_name), \
                app_connection(node.url, "sender") as (tx, tx_name), \
                app_connection(node.url, "other") as (_rx, rx_name), \
                anyio.create_task_group() as tg:
            stop = anyio.Event()
            tg.start_soon(blast, tx, tx_name, stuck_name, stop)
            await wait_until(lambda: node.statistics().drops.get("slow_consumer", 0) == 1,
                             timeout=15, message="stuck consumer cut")
            assert str(stuck_name) not in {s.name for s in
                                           node.statistics(per_connection=True).per_connection}
            stop.set()
            tg.cancel_scope.cancel()
        # the sender is still connected and served after the cut
        assert node.statistics().refused == 0
        del rx_name


@pytest.mark.anyio
async def test_disconnect_policy_cuts_at_once() -> None:
    limits = Limits(max_pending_bytes=MiB, slow_consumer=SlowConsumerPolicy.DISCONNECT,
                    write_deadline=60)
    async with open_node(NodeConfig(shared_secret=SECRET, limits=limits)) as node:
        async with app_connection(node.url, "stuck") as (_stuck, stuck_name), \
                app_connection(node.url, "sender") as (tx, tx_name), \
                anyio.create_task_group() as tg:
            stop = anyio.Event()
            tg.start_soon(blast, tx, tx_name, stuck_name, stop)
            await wait_until(lambda: node.statistics().errors_sent.get("slow_consumer", 0) == 1,
                             message="slow consumer disconnected")
            stop.set()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_consumers_vanishing_mid_write_never_take_the_node_down() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        async with app_connection(node.url, "sender") as (tx, tx_name), \
                anyio.create_task_group() as tg:
            stop = anyio.Event()
            for _ in range(30):
                async with app_connection(node.url, "victim") as (_victim, victim_name):
                    tg.start_soon(blast, tx, tx_name, victim_name, stop)
                    await wait_until(lambda: node.statistics().frames_out > 0)
                    await anyio.lowlevel.checkpoint()
                stop.set()
                stop = anyio.Event()
            stop.set()
            tg.cancel_scope.cancel()
        # still serving
        async with app_connection(node.url, "a") as (a, a_name), \
                app_connection(node.url, "b") as (b, b_name):
            await a.send(Publish(source=a_name, destination=b_name, payload=b"alive"))
            with anyio.fail_after(5):
                while not isinstance(msg := await b.receive(), Publish):
                    pass
            assert msg.payload == b"alive"


@pytest.mark.anyio
async def test_node_shuts_down_cleanly_under_load() -> None:
    for _ in range(5):
        async with open_node(NodeConfig(shared_secret=SECRET)) as node:
            async with app_connection(node.url, "sender") as (tx, tx_name), \
                    app_connection(node.url, "sink") as (_rx, rx_name), \
                    anyio.create_task_group() as tg:
                stop = anyio.Event()
                tg.start_soon(blast, tx, tx_name, rx_name, stop)
                await wait_until(lambda: node.statistics().frames_out > 100)
                await node.aclose()  # while frames are flowing
                stop.set()
                tg.cancel_scope.cancel()


def test_consumers_resetting_mid_write_never_take_the_node_down(tmp_path: Path) -> None:
    """Consumers that reset (RST) while the node writes to them, again and again."""
    import struct

    proc = subprocess.Popen([sys.executable, "-m", "node_lite", "--endpoint", "127.0.0.1:0",
                             "--log-level", "error"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[-1].rsplit(":", 1)[1])
        sender, sender_name = raw_app(port, "blaster")
        sender.settimeout(0.2)
        for i in range(40):
            victim, victim_name = raw_app(port, f"victim{i}")
            frame = wire.encode_frame(Publish(source=sender_name, destination=victim_name,
                                              payload=b"v" * 512))
            try:
                sender.sendall(frame * 200)
            except TimeoutError:
                pass
            # abortive close: the node's next write to it fails with a reset
            victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            victim.close()
            try:
                sender.sendall(frame * 50)
            except (TimeoutError, OSError):
                pass
        assert proc.poll() is None, "the node died"
        fresh, _ = raw_app(port, "fresh")  # and it still serves
        fresh.close()
        sender.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.anyio
async def test_a_paused_sender_s_frames_all_arrive_in_order() -> None:
    """The consumer's backlog fills, so the node stops routing the sender's bytes
    until it drains (on asyncio, the read callback hands over to the connection's
    task and later bytes queue behind); every frame then arrives once, in order."""
    limit = 256 * 1024
    limits = Limits(max_pending_bytes=limit, max_frame_size=64 * 1024,
                    slow_consumer=SlowConsumerPolicy.WAIT, write_deadline=60)
    count = 2000
    async with open_node(NodeConfig(shared_secret=SECRET, limits=limits)) as node, \
            app_connection(node.url, "paused-tx") as (tx, tx_name), \
            app_connection(node.url, "paused-rx") as (rx, rx_name), \
            anyio.create_task_group() as tg:

        async def send() -> None:
            for i in range(count):
                await tx.send(Publish(source=tx_name, destination=rx_name, message_id=i,
                                      payload=b"p" * 8192))

        tg.start_soon(send)
        await wait_until(lambda: pending_of(node, rx_name) >= limit,
                         message="the consumer's backlog to fill")
        await receive_in_order(rx, count, 30)
