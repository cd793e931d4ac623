"""CPU instructions per message: the cost of E2E and of reliability, without the noise.

Wall-clock rates on a shared 2-vCPU machine swing 20-60 % between identical runs;
instruction counts do not (about 0.5 %). Each case runs a reliable p2p session (sender
app, node and receiver app in one process, over loopback TCP) under valgrind's
cachegrind, once with N1 and once with N2 messages; the difference divided by
N2 - N1 is the cost of one message through all three, setup excluded.

    python bench/cost.py              # 64 B and 1 KiB (about 5 minutes)
    python bench/cost.py --sizes 64   # one size

The ratio plain/encrypted is the encrypted throughput, as a fraction of plain, that
a CPU-bound run would reach. A best-effort plain session, measured the same way, gives
what acks and retransmission state add. Two more paths are counted the same way, at
64 B: a best-effort request/reply round trip (the work behind the RTT, which a
latency-bound run pays with cold caches) and a best-effort group fan-out to 32 members
(per delivery). Needs valgrind (skips with a message otherwise).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from bench._harness import print_table  # noqa: E402

# Both past the first 1024 frames: until then, apps sharing an event loop try
# decoding each frame once for all of them (node_lite's SharedDecoding), which
# these p2p runs then turn off. A count straddling that switch would charge the
# difference to the messages.
N1, N2 = 1500, 3500


FANOUT = 32
SECRET = "cost-bench-secret-long-enough-0123456789"


def role(n: int, size: int, mode: str) -> None:
    """``mode``: "enc" (reliable, encrypted), "rel" (reliable), "be" (best effort),
    "rtt" (best-effort round trips) or "fan" (best-effort messages to FANOUT members)."""
    import anyio

    from node_lite import NodeConfig, open_node
    from slim_agents import SessionConfig, open_app

    secret = SECRET
    if mode in ("rtt", "fan"):
        anyio.run(round_trips if mode == "rtt" else fan_out, n, size)
        return

    async def main() -> None:
        async with open_node(NodeConfig(shared_secret=secret)) as node, \
                open_app("bench/ns/recv", node=node.url, secret=secret) as rapp, \
                open_app("bench/ns/send", node=node.url, secret=secret) as sapp:

            async def receive() -> None:
                session = await rapp.listen_for_session()
                for _ in range(n):
                    await session.get_message()

            async with anyio.create_task_group() as tg:
                tg.start_soon(receive)
                config = SessionConfig() if mode == "be" else SessionConfig(
                    timeout=5.0, max_retries=10, mls_enabled=mode == "enc")
                session = await sapp.create_session("bench/ns/recv", config)
                payload = b"x" * size
                for _ in range(n):
                    await session.publish(payload)

    anyio.run(main)


async def round_trips(n: int, size: int) -> None:
    import anyio

    from node_lite import NodeConfig, open_node
    from slim_agents import SessionConfig, open_app

    async with open_node(NodeConfig(shared_secret=SECRET)) as node, \
            open_app("bench/ns/echo", node=node.url, secret=SECRET) as eapp, \
            open_app("bench/ns/ping", node=node.url, secret=SECRET) as papp:

        async def echo() -> None:
            session = await eapp.listen_for_session()
            async for msg in session:
                await session.publish_to(msg.context, msg.payload)

        async with anyio.create_task_group() as tg:
            tg.start_soon(echo)
            session = await papp.create_session("bench/ns/echo", SessionConfig())
            payload = b"p" * size
            for _ in range(n):
                await session.publish(payload)
                await session.get_message()
            tg.cancel_scope.cancel()


async def fan_out(n: int, size: int) -> None:
    from contextlib import AsyncExitStack

    import anyio

    from node_lite import NodeConfig, open_node
    from slim_agents import SessionConfig, open_app

    async with open_node(NodeConfig(shared_secret=SECRET)) as node, AsyncExitStack() as stack:
        mod = await stack.enter_async_context(
            open_app("bench/ns/mod", node=node.url, secret=SECRET))
        members = [await stack.enter_async_context(
            open_app(f"bench/ns/m{i}", node=node.url, secret=SECRET)) for i in range(FANOUT)]
        group = await mod.create_session("bench/ns/chan", SessionConfig.group())
        for i in range(FANOUT):
            await group.invite(f"bench/ns/m{i}")

        async def member(app) -> None:  # type: ignore[no-untyped-def]
            session = await app.listen_for_session()
            for _ in range(n):
                await session.get_message()

        async with anyio.create_task_group() as tg:
            for app in members:
                tg.start_soon(member, app)
            payload = b"g" * size
            for _ in range(n):
                await group.publish(payload)


def instructions(n: int, size: int, mode: str) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, HERE, "role", str(n), str(size), mode],
        capture_output=True, text=True, cwd=ROOT, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_message(size: int, mode: str) -> float:
    return (instructions(N2, size, mode) - instructions(N1, size, mode)) / (N2 - N1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "role":
        n, size, mode = sys.argv[2:5]
        role(int(n), int(size), mode)
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024])
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing measured")
        return
    print(f"slim_agents cost in instructions per message (valgrind, {N2 - N1} messages "
          "counted); sender app, node and receiver app in one process, p2p")
    rows = []
    for size in args.sizes:
        enc, plain, be = (per_message(size, mode) for mode in ("enc", "rel", "be"))
        rows.append([f"{size} B", f"{enc / 1e3:.1f} k", f"{plain / 1e3:.1f} k",
                     f"{be / 1e3:.1f} k", f"{(enc - plain) / 1e3:.1f} k",
                     f"{(plain - be) / 1e3:.1f} k", f"{plain / enc:.2f}x"])
    print_table("Instructions per message (reliable unless said)",
                ["payload", "encrypted", "plain", "plain best effort", "added by E2E",
                 "added by reliability", "CPU-bound ratio (E2E)"], rows)
    rtt, fan = per_message(64, "rtt"), per_message(64, "fan") / FANOUT
    print_table("Other paths, best effort, 64 B",
                ["path", "instructions", "per"],
                [["request/reply through the node", f"{rtt / 1e3:.1f} k", "round trip"],
                 [f"group fan-out to {FANOUT} members", f"{fan / 1e3:.1f} k", "delivery"]])


if __name__ == "__main__":
    main()
