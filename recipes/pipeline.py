"""Pipeline: items flow through three agents, each forwarding to the next stage by name.

    python recipes/pipeline.py                     # 20 sentences through the pipeline
    python recipes/pipeline.py --items 500 --window 50 --backend trio

    client -> tokenize -> shout -> stats -> client

Each stage is an agent whose loop takes mail from its mailbox, does its step
and sends the item on to the next stage by name; the last stage sends it back to
the client named in the item. Every item carries its sequence number: the
mailbox does not promise arrival order on every backend, so the client puts the
results back in order by "seq" before checking them. The client keeps at most
--window items in flight, because a mailbox is bounded (it drops its oldest mail
when full) and the client must not outrun the pipeline. All agents run in this
process, on an embedded node unless --node is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio

from node_lite import Node
from slim_agents import Agent, RunningAgent, open_node

CLIENT = "org/pipeline/client"
Item = dict[str, Any]


# The three steps. Each takes the item and returns it with its own field added.
def tokenize(item: Item) -> Item:
    return {**item, "words": item["text"].split()}


def shout(item: Item) -> Item:
    return {**item, "words": [w.upper() for w in item["words"]]}


def stats(item: Item) -> Item:
    words = item["words"]
    return {**item, "count": len(words), "longest": max(words, key=len, default="")}


STAGES: list[tuple[str, Callable[[Item], Item]]] = [
    ("org/pipeline/tokenize", tokenize), ("org/pipeline/shout", shout),
    ("org/pipeline/stats", stats)]


async def run_stage(me: RunningAgent, step: Callable[[Item], Item], next_stage: str | None
                    ) -> None:
    """Forever: take the oldest mail, transform it, pass it on."""
    while True:
        mail = await me.wait_mailbox()
        item = step(json.loads(mail.message.payload))
        await me.send(next_stage or item["reply_to"], json.dumps(item))


WORDS = "agents pass each item along a chain of small steps and hand back the answers".split()


def sentence(k: int) -> str:
    """Item k's text: a few words, different from one item to the next."""
    start = k % len(WORDS)
    return " ".join(WORDS[start:start + 2 + k % 5])


async def run_pipeline(node: Node | str, args: argparse.Namespace) -> int:
    async with AsyncExitStack() as stack:
        stages = [await stack.enter_async_context(Agent(name).run(node, secret=args.secret))
                  for name, _ in STAGES]
        client = await stack.enter_async_context(Agent(CLIENT).run(node, secret=args.secret))
        window = anyio.Semaphore(args.window)  # items in flight

        async def feed() -> None:
            for k in range(args.items):
                await window.acquire()  # released when a result comes back
                item = {"seq": k, "reply_to": CLIENT, "text": sentence(k)}
                await client.send(STAGES[0][0], json.dumps(item))

        results: list[Item] = []  # in the order sent
        early: dict[int, Item] = {}  # arrived before an item sent earlier (at most a window)
        overtakes = 0
        async with anyio.create_task_group() as tg:
            for i, (me, (name, step)) in enumerate(zip(stages, STAGES, strict=True)):
                next_stage = STAGES[i + 1][0] if i + 1 < len(STAGES) else None
                tg.start_soon(run_stage, me, step, next_stage)
                print(f"stage {i + 1}: {name} -> {next_stage or 'the client'}")
            tg.start_soon(feed)
            while len(results) < args.items:
                item = json.loads((await client.wait_mailbox()).message.payload)
                window.release()
                overtakes += item["seq"] != len(results)
                early[item["seq"]] = item
                while len(results) in early:  # put the results back in order by seq
                    results.append(early.pop(len(results)))
            tg.cancel_scope.cancel()  # the stages loop forever

    # Check: every result, in the order sent, equals the steps applied here.
    expected = [stats(shout(tokenize({"seq": k, "reply_to": CLIENT, "text": sentence(k)})))
                for k in range(args.items)]
    for got in results[:3]:
        print(f"  #{got['seq']} {got['text']!r}: {got['count']} words, "
              f"longest {got['longest']!r}")
    if results != expected:
        wrong = next(k for k, (a, b) in enumerate(zip(results, expected, strict=True)) if a != b)
        print(f"FAILED: result {wrong} is {results[wrong]}, expected {expected[wrong]}")
        return 1
    print(f"OK: {len(results)} items through {len(STAGES)} stages, in order "
          f"({overtakes} arrived ahead of their turn)")
    return 0


async def main(args: argparse.Namespace) -> int:
    try:
        with anyio.fail_after(args.timeout):
            if args.node:
                return await run_pipeline(args.node, args)
            async with open_node() as node:  # embedded: the agents connect in memory
                return await run_pipeline(node, args)
    except TimeoutError:
        print(f"FAILED: not every result came back within {args.timeout:g} s")
        return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--window", type=int, default=16, help="items in flight (<= 1000)")
    parser.add_argument("--node", help="node URL (default: start one here)")
    parser.add_argument("--secret", help="the node's shared secret (with --node)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    sys.exit(anyio.run(main, args, backend=args.backend))
