# The `slim-agents` command. Each subcommand lives with the code it drives;
# this module only wires the argument parser.
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from node_lite._process import add_node_arguments, run_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slim-agents",
        description="SLIM messaging for Python agents: nodes, sessions, groups and agents.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    node = sub.add_parser("node", help="run a node (upstream's YAML config is accepted)")
    add_node_arguments(node)
    node.set_defaults(func=run_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
