"""The SLIM group tutorial's example (group.py), written against slim_agents' native API.

    # a participant (waits to be invited)
    python recipes/group.py --local agntcy/ns/client-1 --node http://127.0.0.1:46357
    # the moderator: creates the channel and invites
    python recipes/group.py --local agntcy/ns/moderator --node http://127.0.0.1:46357 \\
        --remote agntcy/ns/chat --invites agntcy/ns/client-1 --enable-mls

Lines typed (or piped) go to the group; received lines print as "<source> > <text>".
'exit' or 'quit' leaves. Without --node, an embedded node is started for a self-contained run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator

import anyio

from slim_agents import Name, Session, SessionClosedError, SessionConfig, open_app, open_node


async def receive_loop(session: Session) -> None:
    # Ends when the session closes: removed, moderator gone, or channel deleted.
    async for msg in session:
        print(f"{msg.context.source_name} > {msg.payload.decode()}", flush=True)


async def stdin_lines() -> AsyncIterator[str]:
    # Wait on the descriptor, not in a thread: the loop can be cancelled at any time.
    fd, pending = sys.stdin.fileno(), b""
    while data := (await anyio.wait_readable(fd), os.read(fd, 65536))[1]:
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.decode(errors="replace").strip()


async def keyboard_loop(session: Session) -> None:
    async for text in stdin_lines():
        if text.lower() in ("exit", "quit"):
            break
        if text:
            try:
                await session.publish(text.encode())
            except SessionClosedError:
                break
    await session.close()


async def run(args: argparse.Namespace, node_url: str) -> None:
    async with open_app(args.local, node=node_url, secret=args.shared_secret) as app:
        print(f"{app.id_str} Created app, connected to {node_url}", flush=True)
        if args.remote and args.invites:
            config = SessionConfig.group(timeout=5.0, max_retries=5, mls_enabled=args.enable_mls)
            session = await app.create_session(Name.parse(args.remote), config)
            for invite in args.invites:
                added = await session.invite(invite)
                print(f"{args.local} -> add {added} to the group", flush=True)
        else:
            print("Waiting for session...", flush=True)
            session = await app.listen_for_session()
        print(f"Welcome to the group {session.dst}!\n"
              "Send a message to the group, or type 'exit' or 'quit' to quit.", flush=True)
        async with anyio.create_task_group() as tg:
            async def receive_then_stop() -> None:
                await receive_loop(session)
                tg.cancel_scope.cancel()

            tg.start_soon(receive_then_stop)
            tg.start_soon(keyboard_loop, session)


async def main(args: argparse.Namespace) -> None:
    if args.node:
        await run(args, args.node)
        return
    async with open_node() as node:  # self-contained: an embedded node
        await run(args, node.url)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", required=True)
    parser.add_argument("--node", help="node URL, e.g. http://127.0.0.1:46357")
    parser.add_argument("--remote", help="channel to create (moderator)")
    parser.add_argument("--invites", action="append", default=[])
    parser.add_argument("--shared-secret", default="a-shared-secret-for-development-only-0123")
    parser.add_argument("--enable-mls", action="store_true")
    anyio.run(main, parser.parse_args())
