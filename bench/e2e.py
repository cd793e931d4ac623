"""Cost of end-to-end encryption: the same sessions with and without mls_enabled, same run.

    python bench/e2e.py                      # asyncio, 3 interleaved reps
    python bench/e2e.py --backend trio --reps 1

Measures reliable p2p one-way messages/s (64 B, 1 KiB), the mean invite time while a
group grows to 2, 8, 32 and 64 members, and the time of one remove in groups of 64
and 256. Node, moderator (or sender) and members (or receiver) run in separate
processes. Targets: encrypted reliable p2p >= 0.5x unencrypted; a remove in a group
of 256 completes in under 1 s.
"""

from __future__ import annotations

import os
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
from bench.sessions import SECRET, role_receiver, start_node
from node_lite._util import run

HERE = os.path.abspath(__file__)
GROUP_SIZES = (2, 8, 32, 64, 256)
REMOVE_AT = (64, 256)


def _config(mls: bool, group: bool = False):  # type: ignore[no-untyped-def]
    from slim_agents import SessionConfig

    kw = {"timeout": 1.0, "max_retries": 10, "mls_enabled": mls}
    return SessionConfig.group(**kw) if group else SessionConfig(**kw)


# -- roles (each runs in its own process) ----------------------------------------------


def role_sender(url: str, size: int, mls: bool, backend: str) -> None:

    from slim_agents import SessionClosedError, open_app

    async def main() -> None:
        async with open_app("bench/ns/sender", node=url, secret=SECRET) as app:
            session = await app.create_session("bench/ns/receiver", _config(mls))
            emit("READY", {})
            payload = b"x" * size
            try:
                while True:
                    await session.publish(payload)
            except SessionClosedError:
                pass

    run(main, backend=backend)


def role_members(url: str, n: int, backend: str) -> None:
    """n apps that accept one session each and stay until it closes."""
    from contextlib import AsyncExitStack

    import anyio

    from slim_agents import open_app

    async def member(app) -> None:  # type: ignore[no-untyped-def]
        session = await app.listen_for_session()
        await session.wait_closed()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            apps = [await stack.enter_async_context(
                open_app(f"bench/ns/member{i}", node=url, secret=SECRET)) for i in range(n)]
            emit("READY", {})
            async with anyio.create_task_group() as tg:
                for app in apps:
                    tg.start_soon(member, app)

    run(main, backend=backend)


def role_moderator(url: str, n: int, mls: bool, backend: str) -> None:

    from slim_agents import open_app

    async def main() -> None:
        async with open_app("bench/ns/moderator", node=url, secret=SECRET) as app:
            group = await app.create_session("bench/ns/chan", _config(mls, group=True))
            t0 = time.perf_counter()
            for i in range(n):
                await group.invite(f"bench/ns/member{i}")
            invite_ms = (time.perf_counter() - t0) / n * 1e3
            t0 = time.perf_counter()
            await group.remove(f"bench/ns/member{n // 2}")
            remove_ms = (time.perf_counter() - t0) * 1e3
            emit("RESULT", {"invite_ms": invite_ms, "remove_ms": remove_ms})
            await group.close()

    run(main, backend=backend)


# -- driver -----------------------------------------------------------------------------


def run_p2p(backend: str, size: int, mls: bool) -> float:
    quiet_gate()
    node, url = start_node(backend)
    recv = spawn([HERE, "role", "receiver", "--url", url, "--backend", backend])  # sessions.py's
    send = spawn([HERE, "role", "sender", "--url", url, "--size", str(size),
                  "--backend", backend] + (["--mls"] if mls else []))
    try:
        return float(recv.result()["rate"])
    finally:
        for c in (send, recv, node):
            c.stop()


def run_group(backend: str, n: int, mls: bool) -> tuple[float, float]:
    quiet_gate()
    node, url = start_node(backend)
    members = spawn([HERE, "role", "members", "--url", url, "--n", str(n),
                     "--backend", backend], timeout=120)
    mod = spawn([HERE, "role", "moderator", "--url", url, "--n", str(n), "--backend", backend]
                + (["--mls"] if mls else []), ready_prefix="RESULT ", timeout=300)
    try:
        return float(mod.ready["invite_ms"]), float(mod.ready["remove_ms"])
    finally:
        for c in (mod, members, node):
            c.stop()


def main() -> None:
    parser, role = bench_parser(__doc__)
    role.add_argument("--n", type=int, default=8)
    role.add_argument("--size", type=int, default=64)
    role.add_argument("--mls", action="store_true")
    parser.add_argument("--only", choices=("p2p", "groups"), help="run one part")
    args = parser.parse_args()
    if args.cmd == "role":
        b = args.backend
        {"receiver": lambda: role_receiver(args.url, "bench/ns/receiver", b),
         "sender": lambda: role_sender(args.url, args.size, args.mls, b),
         "members": lambda: role_members(args.url, args.n, b),
         "moderator": lambda: role_moderator(args.url, args.n, args.mls, b),
         }[args.name]()
        return

    backend = args.backend
    print(f"slim_agents end-to-end encryption, backend {backend}, {args.reps} interleaved "
          f"reps, {os.cpu_count()} CPUs; apps and node in separate processes")
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    for rep in range(args.reps):
        for size in (64, 1024) if args.only != "groups" else ():
            for mls in (False, True):
                add(f"p2p{size}{mls}", run_p2p(backend, size, mls))
        for n in GROUP_SIZES if args.only != "p2p" else ():
            for mls in (False, True):
                invite, remove = run_group(backend, n, mls)
                add(f"inv{n}{mls}", invite)
                add(f"rm{n}{mls}", remove)
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)

    def cell(key: str, unit: str) -> str:
        v = res[key]
        shown = fmt_rate(median(v)) if unit == "/s" else f"{median(v):.1f}"
        return f"{shown}{unit} ±{spread(v):.0%}"

    rows = []
    for size in (64, 1024) if args.only != "groups" else ():
        plain, enc = median(res[f"p2p{size}False"]), median(res[f"p2p{size}True"])
        ratio = enc / plain
        rows.append([f"{size} B", cell(f"p2p{size}True", "/s"), cell(f"p2p{size}False", "/s"),
                     f"{ratio:.2f}x", "ok" if ratio >= 0.5 else "BELOW 0.5x"])
    if rows:
        print_table("Reliable p2p one-way messages/s (receiver side)",
                    ["payload", "encrypted", "plain", "ratio", "target"], rows)
    if args.only == "p2p":
        return
    rows = []
    for n in GROUP_SIZES:
        enc, plain = median(res[f"inv{n}True"]), median(res[f"inv{n}False"])
        rows.append([str(n), cell(f"inv{n}True", " ms"), cell(f"inv{n}False", " ms"),
                     f"{enc / plain:.2f}x"])
    print_table("Mean invite time per member while the group grows to n",
                ["n", "encrypted", "plain", "ratio"], rows)
    rows = []
    for n in REMOVE_AT:
        enc, plain = median(res[f"rm{n}True"]), median(res[f"rm{n}False"])
        rows.append([str(n), cell(f"rm{n}True", " ms"), cell(f"rm{n}False", " ms"),
                     f"{enc / plain:.2f}x",
                     "ok" if n != 256 or enc < 1000 else "ABOVE 1 s"])
    print_table("Remove one member from a group of n",
                ["n", "encrypted", "plain", "ratio", "target"], rows)


if __name__ == "__main__":
    main()
