"""Agent tool-call benchmarks: caller, callee and node in separate processes.

    python bench/agents.py                 # asyncio, 3 interleaved reps
    python bench/agents.py --backend trio --reps 1

Measures an agent calling another agent's tool by name across processes:
round trip p50/p99 one call at a time, and calls/s with 32 concurrent
callers (tasks of one agent). Baselines from the same run: a raw reliable
session echo (bench/sessions.py's echo role) one message at a time and with
32 messages in flight, so the ratios show what the agent layer (JSON, call
matching, handler scheduling) costs on top of sessions.
Targets: tool-call p50 <= 1 ms; >= 5 k calls/s with 32 callers.
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
from bench.sessions import SECRET, start_node
from node_lite._util import run

HERE = os.path.abspath(__file__)
SESSIONS = os.path.join(os.path.dirname(HERE), "sessions.py")
WARMUP = 0.3
WINDOW = 1.5
CALLERS = 32
COUNT = 2000


# -- roles (each runs in its own process) ----------------------------------------------


def role_callee(url: str, backend: str) -> None:
    import anyio

    from slim_agents import Agent
    from slim_agents._plugins import make_plugin_manager

    agent = Agent("bench/ns/calc", plugins=make_plugin_manager(allow=False))

    @agent.tool
    async def add(a: int, b: int) -> int:
        """Add two integers.

        :param a: first
        :param b: second
        """
        return a + b

    async def main() -> None:
        async with agent.run(url, secret=SECRET):
            emit("READY", {})
            await anyio.sleep_forever()

    run(main, backend=backend)


def role_caller(url: str, backend: str) -> None:
    import anyio

    from slim_agents import Agent
    from slim_agents._plugins import make_plugin_manager

    agent = Agent("bench/ns/caller", plugins=make_plugin_manager(allow=False))

    async def main() -> None:
        async with agent.run(url, secret=SECRET) as me:
            for i in range(200):
                await me.call("bench/ns/calc", "add", a=i, b=1)
            samples = []
            for i in range(COUNT):
                t0 = time.perf_counter()
                await me.call("bench/ns/calc", "add", a=i, b=1)
                samples.append(time.perf_counter() - t0)
            samples.sort()
            count = 0
            stop = time.perf_counter() + WARMUP + WINDOW
            measure_from = time.perf_counter() + WARMUP

            async def caller(k: int) -> None:
                nonlocal count
                i = 0
                while (now := time.perf_counter()) < stop:
                    assert await me.call("bench/ns/calc", "add", a=k, b=i) == k + i
                    if now >= measure_from:
                        count += 1
                    i += 1

            async with anyio.create_task_group() as tg:
                for k in range(CALLERS):
                    tg.start_soon(caller, k)
            emit("RESULT", {"p50": samples[len(samples) // 2] * 1e6,
                            "p99": samples[int(len(samples) * 0.99)] * 1e6,
                            "rate": count / WINDOW})

    run(main, backend=backend)


def role_pipeliner(url: str, backend: str) -> None:
    """Raw reliable session to the echo role, CALLERS messages in flight."""
    import anyio

    from slim_agents import SessionConfig, open_app

    async def main() -> None:
        async with open_app("bench/ns/pipeliner", node=url, secret=SECRET) as app:
            session = await app.create_session("bench/ns/echo",
                                               SessionConfig(timeout=1.0, max_retries=10))
            credit = anyio.Semaphore(CALLERS)
            count = 0
            stop = time.perf_counter() + WARMUP + WINDOW
            measure_from = time.perf_counter() + WARMUP

            async def send() -> None:
                while time.perf_counter() < stop:
                    await credit.acquire()
                    await session.publish(b"p" * 48)

            async def receive() -> None:
                nonlocal count
                while (now := time.perf_counter()) < stop:
                    await session.get_message()
                    credit.release()
                    if now >= measure_from:
                        count += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                tg.start_soon(receive)
                await anyio.sleep(WARMUP + WINDOW + 0.5)
                tg.cancel_scope.cancel()
            emit("RESULT", {"rate": count / WINDOW})

    run(main, backend=backend)


# -- runs ---------------------------------------------------------------------------------


def run_calls(backend: str) -> dict[str, float]:
    quiet_gate()
    node, url = start_node(backend)
    callee = spawn([HERE, "role", "callee", "--url", url, "--backend", backend])
    caller = spawn([HERE, "role", "caller", "--url", url, "--backend", backend],
                   ready_prefix="RESULT ", timeout=120)
    try:
        return {k: float(v) for k, v in caller.ready.items()}
    finally:
        for c in (caller, callee, node):
            c.stop()


def run_baseline(backend: str) -> dict[str, float]:
    quiet_gate()
    node, url = start_node(backend)
    echo = spawn([SESSIONS, "role", "echo", "--url", url, "--backend", backend])
    ping = spawn([SESSIONS, "role", "pinger", "--url", url, "--count", str(COUNT),
                  "--backend", backend, "--reliable"], ready_prefix="RESULT ", timeout=120)
    out = {k: float(v) for k, v in ping.ready.items()}
    ping.stop()
    echo.stop()
    # The echo role serves one session: start a fresh one for the pipelined run.
    echo = spawn([SESSIONS, "role", "echo", "--url", url, "--backend", backend])
    pipe = spawn([HERE, "role", "pipeliner", "--url", url, "--backend", backend],
                 ready_prefix="RESULT ", timeout=120)
    try:
        out["rate"] = float(pipe.ready["rate"])
        return out
    finally:
        for c in (pipe, echo, node):
            c.stop()


def main() -> None:
    parser, _ = bench_parser(__doc__)
    args = parser.parse_args()
    if args.cmd == "role":
        {"callee": role_callee, "caller": role_caller,
         "pipeliner": role_pipeliner}[args.name](args.url, args.backend)
        return

    backend = args.backend
    print(f"slim_agents tool calls, backend {backend}, {args.reps} interleaved reps, "
          f"{os.cpu_count()} CPUs; caller, callee and node in separate processes")
    res: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for key, value in run_baseline(backend).items():
            res.setdefault(f"base_{key}", []).append(value)
        for key, value in run_calls(backend).items():
            res.setdefault(key, []).append(value)
        print(f"  rep {rep + 1}/{args.reps} done", file=sys.stderr)

    def cell(key: str, unit: str) -> str:
        return f"{fmt_rate(median(res[key]))}{unit} ±{spread(res[key]):.0%}"

    p50, rate = median(res["p50"]), median(res["rate"])
    rows = [
        ["round trip p50", cell("p50", " us"), cell("base_p50", " us"),
         f"{p50 / median(res['base_p50']):.2f}x", "ok" if p50 <= 1000 else "ABOVE 1 ms"],
        ["round trip p99", cell("p99", " us"), cell("base_p99", " us"),
         f"{median(res['p99']) / median(res['base_p99']):.2f}x", ""],
        [f"{CALLERS} callers", cell("rate", "/s"), cell("base_rate", "/s"),
         f"{rate / median(res['base_rate']):.2f}x", "ok" if rate >= 5000 else "BELOW 5 k/s"],
    ]
    print_table("agent tool calls vs raw reliable session echo",
                ["measure", "tool call", "session echo", "ratio", "target"], rows)


if __name__ == "__main__":
    main()
