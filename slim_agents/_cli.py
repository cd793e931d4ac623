# The `slim-agents` command. Each subcommand lives with the code it drives;
# this module only wires the argument parser.
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from node_lite._controller import add_controller_arguments, run_controller_from_args
from node_lite._process import add_node_arguments, run_from_args

from ._cli_examples import add_group_arguments, add_p2p_arguments, run, run_group, run_p2p
from ._ctl import add_ctl_arguments, run_ctl
from ._demo import main as run_demo_main
from ._swarm import add_swarm_arguments, run_swarm
from ._top import add_top_arguments, run_top_command
from ._trace import add_trace_arguments, run_trace


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slim-agents",
        description="SLIM messaging for Python agents: nodes, sessions, groups and agents.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    node = sub.add_parser("node", help="run a node (upstream's YAML config is accepted)")
    add_node_arguments(node)
    node.set_defaults(func=run_from_args)
    controller = sub.add_parser("controller",
                                help="run a controller (the tutorial's config-controller.yaml)")
    add_controller_arguments(controller)
    controller.set_defaults(func=run_controller_from_args)
    ctl = sub.add_parser("ctl", help="manage channels and participants (slimctl commands)")
    add_ctl_arguments(ctl)
    ctl.set_defaults(func=run_ctl)
    group = sub.add_parser("group", help="the tutorial's group chat example")
    add_group_arguments(group)
    group.set_defaults(func=lambda a: run(run_group, a))
    p2p = sub.add_parser("p2p", help="the sessions document's point-to-point example")
    add_p2p_arguments(p2p)
    p2p.set_defaults(func=lambda a: run(run_p2p, a))
    demo = sub.add_parser("demo", help="the group tutorial in one command: an embedded node, "
                          "three apps, an encrypted chat, a removal, a channel delete")
    demo.add_argument("--trace", metavar="FILE", default=None,
                      help="also record the session's frames to FILE (render with "
                      "slim-agents trace render FILE)")
    demo.set_defaults(func=run_demo_main)
    top = sub.add_parser("top", help="a live view of a node: links, apps, channels and their "
                         "members, rates and drops")
    add_top_arguments(top)
    top.set_defaults(func=lambda a: run(run_top_command, a))
    trace = sub.add_parser("trace", help="record session frames at a node; draw them as a "
                           "sequence diagram")
    add_trace_arguments(trace)
    trace.set_defaults(func=run_trace)
    swarm = sub.add_parser("swarm", help="run many agents across worker processes")
    add_swarm_arguments(swarm)
    swarm.set_defaults(func=lambda a: run(run_swarm, a))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
