# Running a node as its own process: the entry point behind
# `python -m node_lite` and `slim-agents node`, and a helper that spawns one
# and waits for its ready line.
from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TextIO

import anyio
from anyio.abc import Process

from ._config import ClientConfig, NodeConfig, ServerConfig, load_config, parse_duration
from ._errors import ConfigError, SlimError
from ._server import open_node
from ._util import BACKENDS, run

#: Printed on stdout, followed by the bound endpoints, once the node serves.
READY_PREFIX = "node_lite ready"
_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}

log = logging.getLogger("node_lite.node")


class _UtcFormatter(logging.Formatter):
    # Upstream's log lines start with an RFC 3339 UTC timestamp; keep that look.
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.created % 1 * 1e6):06d}Z"


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """Log to stderr in upstream's style: ``<time>  INFO <logger>: <message>``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_UtcFormatter("%(asctime)s %(levelname)5s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))


def build_parser(prog: str = "python -m node_lite") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a node_lite node.")
    add_node_arguments(parser)
    return parser


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="node configuration file (upstream's YAML format)")
    parser.add_argument("--endpoint", help="listen on HOST:PORT (port 0 picks a free port); "
                        "default 127.0.0.1:46357 without --config")
    parser.add_argument("--node-id", help="node id (default: the service key, slim/0)")
    parser.add_argument("--link", action="append", default=[], metavar="URL",
                        help="link to another node, e.g. http://127.0.0.1:46358 (repeatable)")
    parser.add_argument("--shared-secret", help="verify app tokens with this shared secret")
    parser.add_argument("--log-level", help="trace, debug, info, warn or error")
    parser.add_argument("--busy-poll", metavar="DURATION",
                        help="keep polling the sockets this long after each read instead of "
                        "sleeping, e.g. 300us: lower latency for otherwise idle CPU (default off)")
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio",
                        help="event loop: asyncio, uvloop (asyncio on uvloop) or trio "
                        "(default asyncio)")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The configuration described by the command line (a file, then overrides)."""
    cfg = load_config(args.config) if args.config else NodeConfig(
        servers=(ServerConfig(endpoint="127.0.0.1:46357"),))
    changes: dict[str, object] = {}
    if args.endpoint:
        changes["servers"] = (ServerConfig(endpoint=args.endpoint),)
    if args.node_id:
        changes["node_id"] = args.node_id
    if args.link:
        changes["links"] = cfg.links + tuple(ClientConfig(endpoint=u) for u in args.link)
    if args.shared_secret:
        changes["shared_secret"] = args.shared_secret
    if args.log_level:
        changes["log_level"] = args.log_level
    if args.busy_poll is not None:
        changes["busy_poll"] = parse_duration(args.busy_poll, "--busy-poll")
    return cfg.replace(**changes) if changes else cfg


async def serve_until_signalled(cfg: NodeConfig, out: TextIO) -> None:
    """Run a node until SIGTERM or SIGINT, then drain and return."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_node(cfg) as node:
            print(f"{READY_PREFIX} {' '.join(node.endpoints)}", file=out, flush=True)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                break


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m node_lite") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)
    try:
        run(serve_until_signalled, cfg, sys.stdout, backend=args.backend)
    except SlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class NodeProcess:
    """A node running in a child process (see :func:`open_node_process`)."""

    process: Process
    endpoints: tuple[str, ...]
    #: The command-line arguments the node was started with (after ``-m node_lite``).
    args: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return self.endpoints[0]

    @property
    def url(self) -> str:
        host, _, port = self.endpoint.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{port}"


@asynccontextmanager
async def open_node_process(
    args: Sequence[str] = ("--endpoint", "127.0.0.1:0"),
    *,
    ready_timeout: float = 20.0,
    stop_timeout: float = 10.0,
) -> AsyncIterator[NodeProcess]:
    """Start ``python -m node_lite <args>`` and wait for its ready line.

    On exit the process gets SIGTERM, then SIGKILL after ``stop_timeout``.

    :raises SlimError: if the process exits or stays silent before it is ready.
    """
    process = await anyio.open_process(
        [sys.executable, "-m", "node_lite", *args],
        stdout=subprocess.PIPE, stderr=None,
    )
    try:
        assert process.stdout is not None
        buffered = b""
        with anyio.move_on_after(ready_timeout):
            async for chunk in process.stdout:
                buffered += chunk
                if b"\n" in buffered:
                    break
        line = buffered.split(b"\n", 1)[0].decode(errors="replace")
        if not line.startswith(READY_PREFIX):
            raise SlimError(f"node process did not become ready (got {line!r})")
        yield NodeProcess(process, tuple(line[len(READY_PREFIX):].split()), tuple(args))
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(stop_timeout):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()
