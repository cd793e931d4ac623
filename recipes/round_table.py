"""Round table: agents in a group take turns with a talking stick until the moderator adjourns.

    python recipes/round_table.py                        # a moderator, 3 members, 2 rounds
    python recipes/round_table.py --members 5 --rounds 3 --backend trio

The moderator creates a group with every member and opens the first round. The
table runs on two message types (payload_type), never on what the text says:

  round-table/turn     a remark; metadata "next" names who holds the stick now and
                       "turn" numbers the remark. Only the named agent speaks.
  round-table/adjourn  the moderator closes the table; members stop on this type.

Each member passes the stick to the next seat; the last one passes it back to
the moderator, who opens another round or adjourns. All agents run in this
process, on an embedded node unless --node is given.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack

import anyio

from node_lite import Node
from slim_agents import Agent, Message, Session, open_node

TURN = "round-table/turn"
ADJOURN = "round-table/adjourn"
CHANNEL = "org/table/chamber"
MODERATOR = "org/table/moderator"
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


async def speak(session: Session, text: str, turn: int, next_speaker: str) -> None:
    """Say something to the whole table and hand the stick to ``next_speaker``."""
    await session.publish(text.encode(), payload_type=TURN,
                          metadata={"turn": str(turn), "next": next_speaker})


def member(name: str, passes_to: str, adjourned: anyio.Event) -> Agent:
    agent = Agent(name, description="a member of the round table")

    @agent.on_message
    async def listen(msg: Message, session: Session) -> None:
        ctx = msg.context
        if ctx.payload_type == ADJOURN:
            adjourned.set()
        elif ctx.payload_type == TURN and ctx.metadata.get("next") == name:
            turn = int(ctx.metadata["turn"]) + 1
            await speak(session, f"thank you {ctx.source_name.app}; here is my point",
                        turn, passes_to)
        # Returning None: a remark is for the table, not a reply to one sender.

    return agent


class Moderator:
    """Chairs the table: opens each round, keeps the transcript, adjourns."""

    def __init__(self, first: str, rounds: int) -> None:
        self.agent = Agent(MODERATOR, description="chairs the round table")
        self.agent.on_message(self.chair)
        self.first, self.rounds = first, rounds
        self.finished = 0  # rounds completed
        self.transcript: list[tuple[int, str, str]] = []  # (turn, speaker, text)
        self.done = anyio.Event()

    async def open_round(self, session: Session, turn: int) -> None:
        text = f"round {self.finished + 1}: {self.first.rpartition('/')[2]}, you have the floor"
        self.transcript.append((turn, "moderator", text))
        await speak(session, text, turn, self.first)

    async def chair(self, msg: Message, session: Session) -> None:
        ctx = msg.context
        if ctx.payload_type != TURN:
            return
        turn = int(ctx.metadata["turn"])
        self.transcript.append((turn, ctx.source_name.app, msg.payload.decode()))
        if ctx.metadata["next"] != MODERATOR:
            return
        # The stick came back: the round is over.
        self.finished += 1
        if self.finished < self.rounds:
            await self.open_round(session, turn + 1)
        else:
            await session.publish(b"the table is adjourned", payload_type=ADJOURN,
                                  metadata={"turns": str(turn)})
            self.done.set()


async def run_table(node: Node | str, args: argparse.Namespace) -> int:
    seats = [f"org/table/{NAMES[i] if i < len(NAMES) else f'member-{i}'}"
             for i in range(args.members)]
    adjourned = [anyio.Event() for _ in seats]
    chair = Moderator(seats[0], args.rounds)
    async with AsyncExitStack() as stack:
        for i, seat in enumerate(seats):
            # The last seat passes the stick back to the moderator.
            passes_to = seats[i + 1] if i + 1 < len(seats) else MODERATOR
            await stack.enter_async_context(
                member(seat, passes_to, adjourned[i]).run(node, secret=args.secret))
        me = await stack.enter_async_context(chair.agent.run(node, secret=args.secret))
        group = await me.create_group(CHANNEL, seats)
        print(f"{MODERATOR} opened {CHANNEL} with {len(seats)} members")
        await chair.open_round(group, turn=1)
        await chair.done.wait()
        for event in adjourned:  # every member saw the adjourn message
            await event.wait()

    transcript = sorted(chair.transcript)  # by turn: handlers run concurrently
    for turn, speaker, text in transcript:
        print(f"  turn {turn:2}  {speaker:>9}: {text}")
    speakers = [speaker for _, speaker, _ in transcript]
    expected = (["moderator"] + [s.rpartition("/")[2] for s in seats]) * args.rounds
    if speakers != expected:
        print(f"FAILED: speakers {speakers}, expected {expected}")
        return 1
    print(f"adjourned after {len(transcript)} turns")
    return 0


async def main(args: argparse.Namespace) -> int:
    try:
        with anyio.fail_after(args.timeout):
            if args.node:
                return await run_table(args.node, args)
            async with open_node() as node:  # embedded: the agents connect in memory
                return await run_table(node, args)
    except TimeoutError:
        print(f"FAILED: the table did not adjourn within {args.timeout:g} s")
        return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--node", help="node URL (default: start one here)")
    parser.add_argument("--secret", help="the node's shared secret (with --node)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    sys.exit(anyio.run(main, args, backend=args.backend))
