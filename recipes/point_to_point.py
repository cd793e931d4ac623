"""The sessions document's point-to-point example, on slim_agents' native API.

    # the receiver(s): echo every message back
    python recipes/point_to_point.py --local agntcy/ns/bob --node http://127.0.0.1:46357
    # the sender: discovers one instance of bob and sticks to it
    python recipes/point_to_point.py --local agntcy/ns/alice --node http://127.0.0.1:46357 \\
        --remote agntcy/ns/bob --message hello --iterations 3

Without --node, an embedded node and an echoing "bob" are started for a self-contained run.
"""

from __future__ import annotations

import argparse

import anyio

from slim_agents import SessionConfig, open_app, open_node

SECRET = "a-shared-secret-for-development-only-0123"


async def echo(node_url: str, name: str, ready: anyio.Event | None = None) -> None:
    async with open_app(name, node=node_url, secret=SECRET) as app:
        print(f"{app.id_str} waiting for sessions", flush=True)
        if ready is not None:
            ready.set()
        while True:
            session = await app.listen_for_session()
            async for msg in session:
                print(f"{app.name} got {msg.payload.decode()!r} from {msg.context.source_name}",
                      flush=True)
                await session.publish_to(msg.context, msg.payload)


async def send(node_url: str, args: argparse.Namespace) -> None:
    config = SessionConfig(timeout=5.0, max_retries=5, mls_enabled=args.enable_mls)
    async with open_app(args.local, node=node_url, secret=SECRET) as app:
        # Discovery binds the session to one instance; every message goes to it.
        session = await app.create_session(args.remote, config)
        print(f"{app.name} bound to {session.dst}", flush=True)
        for i in range(args.iterations):
            report = await (await session.publish(f"{args.message} {i}".encode()))
            reply = await session.get_message()
            print(f"sent to {report.delivered[0]}, reply: {reply.payload.decode()!r}", flush=True)
        await session.close()


async def main(args: argparse.Namespace) -> None:
    if args.node:
        if args.remote:
            await send(args.node, args)
        else:
            await echo(args.node, args.local)
        return
    async with open_node() as node, anyio.create_task_group() as tg:
        ready = anyio.Event()
        tg.start_soon(echo, node.url, args.remote or "agntcy/ns/bob", ready)
        await ready.wait()
        args.remote = args.remote or "agntcy/ns/bob"
        await send(node.url, args)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", default="agntcy/ns/alice")
    parser.add_argument("--node", help="node URL, e.g. http://127.0.0.1:46357")
    parser.add_argument("--remote", help="service to talk to (sender)")
    parser.add_argument("--message", default="hello")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--enable-mls", action="store_true")
    anyio.run(main, parser.parse_args())
