"""Node throughput and RTT against a minimal raw anyio relay, measured in the same run.

    python bench/node.py                     # asyncio, 3 interleaved reps
    python bench/node.py --backend trio --reps 5

Both systems run in their own process and are driven by the same blocking-socket
sender, receiver, echo and pinger processes, with byte-identical frames. The
baseline relay forwards whole frames from one connection to the other with one
write per read and no routing; the node decodes, checks and routes every frame.
Targets: throughput >= 0.6x the baseline, RTT p50 <= 1.5x the baseline.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import (
    bench_parser,
    emit,
    fmt_rate,
    median,
    print_table,
    quiet_gate,
    spawn,
    spread,
)
from node_lite._util import run

SIZES = {"64 B": 64, "1 KiB": 1024, "64 KiB": 65536}
WARMUP = 0.3
WINDOW = 1.5


def _frames(size: int) -> tuple[bytes, bytes, bytes, bytes]:
    from node_lite import Name
    from node_lite.wire import Hello, Publish, encode_frame

    tx, rx = Name("bench", "ns", "tx", 1), Name("bench", "ns", "rx", 2)
    return (encode_frame(Hello(token="bench", name=tx)),
            encode_frame(Hello(token="bench", name=rx)),
            encode_frame(Publish(source=tx, destination=rx, payload=b"x" * size)),
            encode_frame(Publish(source=rx, destination=tx, payload=b"y" * size)))


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_frame(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        if len(buf) >= 4:
            n = struct.unpack_from(">I", buf)[0]
            if len(buf) >= 4 + n:
                frame = bytes(buf[:4 + n])
                del buf[:4 + n]
                return frame
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk


def _handshake(sock: socket.socket, hello: bytes, node: bool) -> bytearray:
    # The raw relay has no handshake: a hello sent through it would reach the
    # peer as an extra frame (and the echo would answer it).
    buf = bytearray()
    if node:
        sock.sendall(hello)
        _read_frame(sock, buf)  # hello_ack
    return buf


# -- roles ----------------------------------------------------------------------------


def role_relay(backend: str) -> None:
    import anyio

    from node_lite._transport import pause_reading, tune_reading

    async def pump(src: object, dst: object) -> None:
        size = tune_reading(src)
        pending = b""
        unpack = struct.Struct(">I").unpack_from
        while True:
            try:
                data = await src.receive(size)  # type: ignore[attr-defined]
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            if pending:
                data = pending + data
            pos, n = 0, len(data)
            while n - pos >= 4:
                end = pos + 4 + unpack(data, pos)[0]
                if end > n:
                    break
                pos = end
            pending = data[pos:]
            if pos:
                try:
                    await dst.send(data[:pos] if pos < n else data)  # type: ignore[attr-defined]
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def main() -> None:
        multi = await anyio.create_tcp_listener(local_host="127.0.0.1")
        listener = multi.listeners[0]
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        emit("READY", {"port": port})
        async with listener:
            while True:
                first = await listener.accept()
                pause_reading(first)
                second = await listener.accept()
                pause_reading(second)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump, first, second)
                    tg.start_soon(pump, second, first)

    run(main, backend=backend)


def role_sink(port: int, size: int, node: bool) -> None:
    _, hello_rx, frame, _ = _frames(size)
    sock = _connect(port)
    buf = _handshake(sock, hello_rx, node)
    emit("READY", {})
    flen = len(frame)
    view = memoryview(bytearray(1 << 20))
    first = sock.recv_into(view)
    t_start = time.perf_counter()
    got = first + len(buf)
    while time.perf_counter() - t_start < WARMUP:
        got += sock.recv_into(view)
    counted, t0 = 0, time.perf_counter()
    while (now := time.perf_counter()) - t0 < WINDOW:
        counted += sock.recv_into(view)
    emit("RESULT", {"rate": counted / flen / (now - t0), "seconds": now - t0})
    sock.close()


def role_source(port: int, size: int, node: bool) -> None:
    hello_tx, _, frame, _ = _frames(size)
    sock = _connect(port)
    _handshake(sock, hello_tx, node)
    batch = frame * max(1, (64 * 1024) // len(frame))
    emit("READY", {})
    try:
        while True:
            sock.sendall(batch)
    except OSError:
        pass


def role_echo(port: int, node: bool) -> None:
    _, hello_rx, _, reply = _frames(64)
    sock = _connect(port)
    buf = _handshake(sock, hello_rx, node)
    emit("READY", {})
    try:
        while True:
            _read_frame(sock, buf)
            sock.sendall(reply)
    except (EOFError, OSError):
        pass


def role_ping(port: int, node: bool, count: int) -> None:
    hello_tx, _, request, _ = _frames(64)
    sock = _connect(port)
    buf = _handshake(sock, hello_tx, node)
    samples = []
    for i in range(count + 200):
        t0 = time.perf_counter()
        sock.sendall(request)
        _read_frame(sock, buf)
        if i >= 200:
            samples.append(time.perf_counter() - t0)
    samples.sort()
    emit("RESULT", {"p50": samples[len(samples) // 2] * 1e6,
                    "p99": samples[int(len(samples) * 0.99)] * 1e6})
    sock.close()


# -- driver ---------------------------------------------------------------------------


def start_system(system: str, backend: str) -> tuple[object, int]:
    here = os.path.abspath(__file__)
    if system == "relay":
        child = spawn([here, "role", "relay", "--backend", backend])
        return child, int(child.ready["port"])
    child = spawn(["-m", "node_lite", "--endpoint", "127.0.0.1:0", "--backend", backend,
                   "--log-level", "warn"], ready_prefix="node_lite ready ")
    return child, int(child.ready["text"].rsplit(":", 1)[1])


def run_throughput(system: str, backend: str, size: int) -> float:
    here = os.path.abspath(__file__)
    quiet_gate()
    server, port = start_system(system, backend)
    node = "--node" if system == "node" else "--no-node"
    sink = spawn([here, "role", "sink", "--port", str(port), "--size", str(size), node])
    source = spawn([here, "role", "source", "--port", str(port), "--size", str(size), node])
    try:
        return float(sink.result()["rate"])
    finally:
        for c in (source, sink, server):
            c.stop()  # type: ignore[attr-defined]


def run_rtt(system: str, backend: str, count: int) -> tuple[float, float]:
    here = os.path.abspath(__file__)
    quiet_gate()
    server, port = start_system(system, backend)
    node = "--node" if system == "node" else "--no-node"
    echo = spawn([here, "role", "echo", "--port", str(port), node])
    ping = spawn([here, "role", "ping", "--port", str(port), node, "--count", str(count)],
                 ready_prefix="RESULT ")
    try:
        return float(ping.ready["p50"]), float(ping.ready["p99"])
    finally:
        for c in (ping, echo, server):
            c.stop()  # type: ignore[attr-defined]


def main() -> None:
    parser, role = bench_parser(__doc__)
    role.add_argument("--port", type=int)
    role.add_argument("--size", type=int, default=64)
    role.add_argument("--count", type=int, default=3000)
    role.add_argument("--node", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rtt-count", type=int, default=3000)
    args = parser.parse_args()
    if args.cmd == "role":
        if args.name == "relay":
            role_relay(args.backend)
        elif args.name == "sink":
            role_sink(args.port, args.size, args.node)
        elif args.name == "source":
            role_source(args.port, args.size, args.node)
        elif args.name == "echo":
            role_echo(args.port, args.node)
        elif args.name == "ping":
            role_ping(args.port, args.node, args.count)
        return

    print(f"node_lite vs raw anyio relay, backend {args.backend}, {args.reps} interleaved reps, "
          f"{os.cpu_count()} CPUs")
    results: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {}
    rtts: dict[str, list[tuple[float, float]]] = {"relay": [], "node": []}
    for rep in range(args.reps):
        for label, size in SIZES.items():
            per = {s: run_throughput(s, args.backend, size) for s in ("relay", "node")}
            for s, v in per.items():
                results.setdefault((label, s), []).append(v)
            ratios.setdefault(label, []).append(per["node"] / per["relay"])
        for s in ("relay", "node"):
            rtts[s].append(run_rtt(s, args.backend, args.rtt_count))
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)
    rows = []
    for label in SIZES:
        base, node = results[(label, "relay")], results[(label, "node")]
        ratio = median(ratios[label])
        rows.append([label, f"{fmt_rate(median(base))}/s ±{spread(base):.0%}",
                     f"{fmt_rate(median(node))}/s ±{spread(node):.0%}", f"{ratio:.2f}x",
                     "ok" if ratio >= 0.6 else "BELOW 0.6x"])
    print_table("One-way frames/s (receiver side)", ["payload", "baseline relay", "node",
                                                     "node/baseline", "target >= 0.6x"], rows)
    rb50 = median([p for p, _ in rtts["relay"]])
    rb99 = median([p for _, p in rtts["relay"]])
    rn50 = median([p for p, _ in rtts["node"]])
    rn99 = median([p for _, p in rtts["node"]])
    print_table("Request/reply RTT, 64 B, one in flight (µs)",
                ["", "baseline relay", "node", "node/baseline", "target"],
                [["p50", f"{rb50:.0f}", f"{rn50:.0f}", f"{rn50 / rb50:.2f}x",
                  "ok" if rn50 <= 1.5 * rb50 else "ABOVE 1.5x"],
                 ["p99", f"{rb99:.0f}", f"{rn99:.0f}", f"{rn99 / rb99:.2f}x", ""]])


if __name__ == "__main__":
    main()
