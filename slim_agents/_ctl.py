# `slim-agents ctl`: the slimctl commands the tutorial uses, against our controller.
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import anyio

from node_lite import ConnectError
from node_lite._controller import COMMAND_TIMEOUT, call_controller

DEFAULT_SERVER = "localhost:50051"


def add_ctl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("SLIMCTL_COMMON_OPTS_SERVER"),
                        help=f"controller HOST:PORT (default {DEFAULT_SERVER}, or "
                        "$SLIMCTL_COMMON_OPTS_SERVER)")
    sub = parser.add_subparsers(dest="resource", metavar="RESOURCE", required=True)
    channel = sub.add_parser("channel", help="create, delete or list channels")
    csub = channel.add_subparsers(dest="action", required=True)
    create = csub.add_parser("create", help="create a channel: moderators=<org/ns/app/id>")
    create.add_argument("assignments", nargs="+", metavar="moderators=NAME[,NAME]")
    delete = csub.add_parser("delete", help="delete a channel")
    delete.add_argument("channel")
    csub.add_parser("list", help="list channels")
    participant = sub.add_parser("participant", help="add, delete or list participants")
    psub = participant.add_subparsers(dest="action", required=True)
    for action in ("add", "delete"):
        p = psub.add_parser(action, help=f"{action} a participant")
        p.add_argument("-c", "--channel", required=True)
        p.add_argument("name")
    plist = psub.add_parser("list", help="list the participants of a channel")
    plist.add_argument("-c", "--channel", required=True)
    node = sub.add_parser("node", help="ask a node directly (statistics)")
    nsub = node.add_subparsers(dest="action", required=True)
    stats = nsub.add_parser("stats", help="print a node's report as JSON: totals, drops, "
                            "links, connections, channels")
    stats.add_argument("--node", dest="node_url", default="http://127.0.0.1:46357")
    stats.add_argument("--secret", default=None,
                       help="the node's shared secret (or $SLIM_SHARED_SECRET)")


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if args.resource == "channel":
        if args.action == "create":
            values: dict[str, Any] = {}
            for item in args.assignments:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"expected key=value, got {item!r}")
                values[key] = value
            moderators = [m for m in values.get("moderators", "").split(",") if m]
            if not moderators:
                raise ValueError("moderators=<org/ns/app/id> is required")
            return "channel_create", {"moderators": moderators}
        if args.action == "delete":
            return "channel_delete", {"channel": args.channel}
        return "channel_list", {}
    if args.action == "list":
        return "participant_list", {"channel": args.channel}
    return f"participant_{args.action}", {"channel": args.channel, "participant": args.name}


def run_ctl(args: argparse.Namespace) -> int:
    if args.resource == "node":
        from ._cli_examples import run
        from ._top import run_top_command

        args.node, args.json, args.count, args.interval = args.node_url, True, 1, 0.0
        return run(run_top_command, args)
    server = args.server or DEFAULT_SERVER
    try:
        op, payload = _request(args)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    channel, name = payload.get("channel"), payload.get("participant")
    if op == "participant_add":
        print(f"Adding participant to channel ID {channel}: {name}", flush=True)
    elif op == "participant_delete":
        print(f"Deleting participant from channel ID {channel}: {name}", flush=True)
    elif op == "participant_list":
        print(f"Listing participants for channel ID: {channel}", flush=True)

    async def call() -> Any:
        with anyio.fail_after(COMMAND_TIMEOUT + 5):
            return await call_controller(server, op, payload)

    try:
        result = anyio.run(call)
    except (ConnectError, TimeoutError) as exc:
        print(f"Error: {exc or 'the controller did not answer in time'}", file=sys.stderr)
        return 1
    if not result.ok:
        print(f"Error: {result.error}", file=sys.stderr)
        return 1
    if op == "channel_create":
        print(f"Received response: {result.result['channel']}")
    elif op == "channel_delete":
        print(f"Channel deleted successfully with ID: {channel}")
    elif op == "channel_list":
        print(f"Following channels found: {result.result.get('channels', [])}")
    elif op == "participant_add":
        print(f"Participant added successfully to channel ID {channel}: {name}")
    elif op == "participant_delete":
        print(f"Participant deleted successfully from channel ID {channel}: {name}")
    else:
        print(f"Following participants found for channel ID {channel}: "
              f"{result.result.get('participants', [])}")
    return 0
