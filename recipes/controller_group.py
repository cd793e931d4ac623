"""Controller-managed group: an operator creates a channel and manages its members remotely.

    python recipes/controller_group.py                   # controller, node and apps, here
    python recipes/controller_group.py --participants 4 --backend trio
    # against a running controller and node (the tutorial's deployment):
    python recipes/controller_group.py --controller 127.0.0.1:50051 \\
        --node http://127.0.0.1:46357 --secret <the node's shared secret>

The tutorial's `slim-agents ctl` steps as one script. Nobody in the group calls
create or invite itself: the operator sends each operation to the controller's
northbound port (call_controller, which is what `slim-agents ctl` does), the
controller hands it to the node the moderator app is connected to, and the node
to the app, which carries it out in its group session:

    channel create moderators=<moderator>     the moderator starts a group on a new channel
    participant add -c <channel> <name>       the moderator invites <name>
    participant delete -c <channel> <name>    the moderator removes <name>
    channel delete <channel>                  the moderator closes the group for everyone

Apps only wait for the sessions that these operations give them. The
controller and its client (open_controller, call_controller) come from
node_lite, as used by `slim-agents controller` and `ctl`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio

from node_lite import (
    ClientConfig,
    ControllerConfig,
    Node,
    NodeConfig,
    call_controller,
    open_controller,
)
from slim_agents import Session, SessionClosedError, open_app, open_node

SECRET = "a-shared-secret-for-development-only-0123"
MODERATOR = "agntcy/ns/moderator"


# Each operation, as the `slim-agents ctl` command line that sends it.
CTL_LINES = {
    "channel_create": "channel create moderators={moderators[0]}",
    "participant_add": "participant add -c {channel} {participant}",
    "participant_list": "participant list -c {channel}",
    "participant_delete": "participant delete -c {channel} {participant}",
    "channel_delete": "channel delete {channel}",
    "channel_list": "channel list",
}


async def ctl(server: str, op: str, **args: Any) -> dict[str, Any]:
    """Send one operation to the controller and return its result."""
    print(f"$ slim-agents ctl --server {server} {CTL_LINES[op].format(**args)}")
    result = await call_controller(server, op, args)
    if not result.ok:
        raise RuntimeError(f"{op} failed: {result.error}")
    if result.result:
        print(f"  -> {result.result}")
    return dict(result.result or {})


async def say(speaker: str, session: Session, text: str, listeners: Mapping[str, Session]
              ) -> int:
    """``speaker`` says ``text`` to the group; each listener must hear exactly that."""
    await (await session.publish(text.encode()))  # returns once every member acknowledged
    for who, s in listeners.items():
        msg = await s.get_message()
        if msg.payload.decode() != text or msg.context.source_name.app != speaker:
            raise RuntimeError(f"{who} heard {msg.payload!r} from {msg.context.source_name}")
        print(f"  {who} heard {speaker}: {text}")
    return len(listeners)


async def run(server: str, node: Node | str, args: argparse.Namespace) -> int:
    names = [f"client-{i}" for i in range(1, args.participants + 1)]
    async with AsyncExitStack() as stack:
        moderator = await stack.enter_async_context(
            open_app(MODERATOR, node=node, secret=args.secret))
        apps = {n: await stack.enter_async_context(
            open_app(f"agntcy/ns/{n}", node=node, secret=args.secret)) for n in names}
        print(f"apps connected: {moderator.id_str}, {', '.join(names)}")

        # 1. A channel, moderated by our app: the controller needs its full name (with id).
        channel = (await ctl(server, "channel_create", moderators=[moderator.id_str]))["channel"]
        group = await moderator.listen_for_session()  # the group the command started

        # 2. Members join when the operator adds them.
        members: dict[str, Session] = {}
        for n in names:
            await ctl(server, "participant_add", channel=channel, participant=f"agntcy/ns/{n}")
            members[n] = await apps[n].listen_for_session()
            print(f"  {n} joined {members[n].dst}")

        # 3. Everyone hears the moderator, and the moderator and the others hear a member.
        heard = await say("moderator", group, "welcome to the channel", members)
        others = {"moderator": group, **{n: s for n, s in members.items() if n != names[0]}}
        heard += await say(names[0], members[names[0]], "glad to be here", others)
        await ctl(server, "participant_list", channel=channel)

        # 4. The operator removes the last member: its session ends, it hears no more.
        leaving = names[-1]
        await ctl(server, "participant_delete", channel=channel,
                  participant=f"agntcy/ns/{leaving}")
        removed = members.pop(leaving)
        print(f"  {leaving}: session closed ({await removed.wait_closed()})")
        heard += await say("moderator", group, f"{leaving} has left us", members)
        try:
            msg = await removed.get_message()
            raise RuntimeError(f"{leaving} heard {msg.payload!r} after its removal")
        except SessionClosedError:
            pass

        # 5. Deleting the channel closes the group for every member.
        await ctl(server, "channel_delete", channel=channel)
        for n, s in members.items():
            print(f"  {n}: session closed ({await s.wait_closed()})")
        channels = (await ctl(server, "channel_list"))["channels"]
    if channel in channels:
        raise RuntimeError(f"{channel} is still listed after its deletion")
    print(f"OK: channel {channel}: {heard} messages heard, {leaving} removed, channel deleted")
    return 0


async def main(args: argparse.Namespace) -> int:
    try:
        with anyio.fail_after(args.timeout):
            if args.controller:
                return await run(args.controller, args.node, args)
            # Embedded: a controller, and a node that registers on its southbound port.
            ports = ControllerConfig(northbound="127.0.0.1:0", southbound="127.0.0.1:0")
            async with open_controller(ports) as controller:
                to_controller = ClientConfig(endpoint=f"http://{controller.southbound}")
                config = NodeConfig(shared_secret=args.secret, controller_clients=(to_controller,))
                async with open_node(config) as node:
                    await controller.wait_for_node()
                    print(f"controller {controller.northbound}, node {node.url} registered")
                    return await run(controller.northbound, node, args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"FAILED: {str(exc) or 'timed out'}")
        return 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=3)
    parser.add_argument("--controller", help="controller northbound HOST:PORT (with --node)")
    parser.add_argument("--node", help="URL of a node registered with that controller")
    parser.add_argument("--secret", default=SECRET, help="the node's shared secret")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    if bool(args.controller) != bool(args.node):
        parser.error("--controller and --node go together")
    sys.exit(anyio.run(main, args, backend=args.backend))
