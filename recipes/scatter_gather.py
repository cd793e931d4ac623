"""Scatter/gather: a coordinator fans work out to agents in several processes, then reduces.

    python recipes/scatter_gather.py                      # 8 workers in 2 processes
    python recipes/scatter_gather.py --workers 16 --processes 4 --limit 500000

The job: count the primes below --limit. A swarm runs --workers agents across
--processes worker processes; each offers a typed `count_primes` tool. The
coordinator (an agent in this process) first calls the roll in a group, then
gives every worker one slice of the range, concurrently, adds up the counts
and checks the total against a count done here.

Without --node, the swarm starts an embedded node; with --node, pass its --secret.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import anyio

from slim_agents import Agent, AgentSpec, Message, Session, open_swarm


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def count_primes_between(start: int, stop: int) -> int:
    return sum(1 for n in range(start, stop) if is_prime(n))


# The factory runs in each worker process: the swarm loads this file there
# (module-level functions only) and calls worker(name) once per agent.
def worker(name: str) -> Agent:
    agent = Agent(name, description="counts primes in a range")

    @agent.tool
    async def count_primes(start: int, stop: int) -> dict[str, int]:
        """Count the primes n with start <= n < stop.

        :param start: first number of the slice
        :param stop: end of the slice (excluded)
        """
        # A thread keeps this agent's event loop free to answer while it computes.
        count = await anyio.to_thread.run_sync(count_primes_between, start, stop)
        return {"count": count, "pid": os.getpid()}

    @agent.on_message
    async def roll_call(msg: Message, session: Session) -> str:
        return f"{name} here, in process {os.getpid()}"

    return agent


def slices(limit: int, parts: int) -> list[tuple[int, int]]:
    return list(itertools.pairwise(limit * i // parts for i in range(parts + 1)))


async def scatter(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Start the swarm, call the roll, hand out the slices: each worker's answer by name."""
    specs = AgentSpec.many(worker, "org/scatter/worker-{i}", args.workers)
    async with open_swarm(specs, node=args.node, secret=args.secret,
                          processes=args.processes) as swarm:
        print(f"swarm ready: {len(swarm.names)} workers in processes {swarm.pids}")
        coordinator = Agent("org/scatter/coordinator")
        async with coordinator.run(swarm.url, secret=swarm.secret) as me:
            # Gather: one message to the group, one reply per member.
            await me.create_group("org/scatter/all", swarm.names)
            async for reply in me.gather("org/scatter/all", "roll call"):
                print(f"  roll call: {reply.payload.decode()}")

            # Scatter: one tool call per worker, all in flight at once.
            answers: dict[str, dict[str, int]] = {}

            async def ask(name: str, start: int, stop: int) -> None:
                answers[name] = await me.call(name, "count_primes", start=start, stop=stop)
                print(f"  {name} [{start}, {stop}): {answers[name]['count']} primes "
                      f"(pid {answers[name]['pid']})")

            async with anyio.create_task_group() as tg:
                parts = slices(args.limit, len(swarm.names))
                for name, (start, stop) in zip(swarm.names, parts, strict=True):
                    tg.start_soon(ask, name, start, stop)
    return answers


async def main(args: argparse.Namespace) -> int:
    try:
        with anyio.fail_after(args.timeout):
            answers = await scatter(args)
    except TimeoutError:
        print(f"FAILED: the workers did not all answer within {args.timeout:g} s")
        return 1

    # Reduce, and check against the same count done here.
    total = sum(a["count"] for a in answers.values())
    pids = {a["pid"] for a in answers.values()}
    expected = count_primes_between(0, args.limit)
    if total != expected or len(answers) != args.workers:
        print(f"FAILED: workers counted {total} primes below {args.limit}, expected {expected}")
        return 1
    print(f"OK: {total} primes below {args.limit}, counted by {len(answers)} workers "
          f"in {len(pids)} processes")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--limit", type=int, default=200_000, help="count primes below this")
    parser.add_argument("--node", help="node URL (default: start one here)")
    parser.add_argument("--secret", help="the node's shared secret (with --node)")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    sys.exit(anyio.run(main, args, backend=args.backend))
