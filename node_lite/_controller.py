# The controller of the tutorial: nodes register on its southbound port,
# operators (`slim-agents ctl`) call its northbound port, and channel
# operations become commands that a node hands to the moderator app.
from __future__ import annotations

import itertools
import logging
import secrets
import string
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import yaml
from anyio.abc import SocketAttribute, TaskGroup, TaskStatus

from ._config import split_endpoint
from ._errors import ConfigError, ProtocolError
from ._names import Name
from ._transport import Outbox, dial, pause_reading, tune_reading
from ._util import collapse_excgroups
from .wire import (
    Command,
    CommandResult,
    FrameDecoder,
    Register,
    decode_frame,
    decode_message,
    encode_frame,
)

log = logging.getLogger("node_lite.controller")
# Upstream's controller ports.
DEFAULT_NORTHBOUND = "0.0.0.0:50051"
DEFAULT_SOUTHBOUND = "0.0.0.0:50052"
# How long an operation waits for the app that carries it out.
COMMAND_TIMEOUT = 30.0
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True, kw_only=True, slots=True)
class ControllerConfig:
    """Where a controller listens (the tutorial's config-controller.yaml)."""

    northbound: str = DEFAULT_NORTHBOUND
    southbound: str = DEFAULT_SOUTHBOUND
    log_level: str = "info"

    def __post_init__(self) -> None:
        split_endpoint(self.northbound, "northbound", default_port=50051)
        split_endpoint(self.southbound, "southbound", default_port=50052)


def _listener(section: object, where: str, default: str) -> str:
    if section is None:
        return default
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping")
    if "endpoint" in section:  # upstream's newer form
        endpoint = section["endpoint"]
        if not isinstance(endpoint, str):
            raise ConfigError(f"{where}.endpoint: expected host:port")
        return endpoint
    host = section.get("httpHost", default.rsplit(":", 1)[0])
    port = section.get("httpPort", int(default.rsplit(":", 1)[1]))
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        raise ConfigError(f"{where}: httpHost is a string and httpPort an integer")
    return f"{host}:{port}"


def load_controller_config(path: str | Path) -> ControllerConfig:
    """Read the tutorial's controller configuration file.

    :raises ConfigError: when it cannot be read or is invalid.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping")
    level = "info"
    north = doc.get("northbound")
    if isinstance(north, dict) and isinstance(north.get("logging"), dict):
        level = str(north["logging"].get("level", level)).lower()
    return ControllerConfig(
        northbound=_listener(north, "northbound", DEFAULT_NORTHBOUND),
        southbound=_listener(doc.get("southbound"), "southbound", DEFAULT_SOUTHBOUND),
        log_level=level)


@dataclass(slots=True)
class _Node:
    node_id: str
    endpoints: tuple[str, ...]
    outbox: Outbox


@dataclass(slots=True)
class Channel:
    """A channel created through the controller."""

    name: str
    moderator: Name
    node_id: str
    participants: list[str] = field(default_factory=list)


class ControllerError(Exception):
    """An operation failed; the message goes back to the operator."""


class Controller:
    """Channels and the nodes that host their moderators (see :func:`open_controller`)."""

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config or ControllerConfig()
        self.nodes: dict[str, _Node] = {}
        self.channels: dict[str, Channel] = {}
        self._waiters: dict[int, tuple[anyio.Event, list[CommandResult]]] = {}
        self._ids = itertools.count(1)
        self._tg: TaskGroup | None = None
        self.northbound = ""
        self.southbound = ""
        self._node_seen = anyio.Event()

    async def serve(self, *, task_status: TaskStatus[Controller] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        cfg = self.config
        async with anyio.create_task_group() as tg:
            self._tg = tg
            log.info("Starting route reconcilers")
            south = await self._listen(cfg.southbound, 50052)
            north = await self._listen(cfg.northbound, 50051)
            self.southbound = _bound(south, cfg.southbound)
            self.northbound = _bound(north, cfg.northbound)
            log.info("Southbound API Service is Listening on %s", self.southbound)
            log.info("Northbound API Service is listening on %s", self.northbound)
            tg.start_soon(self._accept, south, self._southbound)
            tg.start_soon(self._accept, north, self._northbound)
            task_status.started(self)

    async def _listen(self, endpoint: str, default_port: int) -> Any:
        host, port, _ = split_endpoint(endpoint, "endpoint", default_port=default_port)
        try:
            multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {endpoint}: {exc.strerror}") from exc
        return multi.listeners[0]

    async def _accept(self, listener: Any, handler: Any) -> None:
        assert self._tg is not None
        async with listener:
            while True:
                stream = await listener.accept()
                pause_reading(stream)
                self._tg.start_soon(handler, stream)

    # -- southbound: nodes ---------------------------------------------------------------

    async def _southbound(self, stream: Any) -> None:
        outbox = Outbox(stream)
        node: _Node | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(outbox.run)
                async for msg in _messages(stream):
                    if node is None:
                        if not isinstance(msg, Register):
                            return
                        node = _Node(msg.node_id, msg.endpoints, outbox)
                        self.nodes[msg.node_id] = node
                        self._node_seen.set()
                        log.info("Registering node with ID: %s svc=southbound", msg.node_id)
                        log.info("Connection details: [endpoint: %s] svc=southbound",
                                 ", ".join(msg.endpoints))
                        outbox.write(encode_frame(CommandResult(request_id=0, ok=True)))
                    elif isinstance(msg, CommandResult):
                        waiter = self._waiters.get(msg.request_id)
                        if waiter is not None:
                            waiter[1].append(msg)
                            waiter[0].set()
                tg.cancel_scope.cancel()
        finally:
            if node is not None and self.nodes.get(node.node_id) is node:
                del self.nodes[node.node_id]
                log.info("Node %s disconnected svc=southbound", node.node_id)
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _ask(self, node: _Node, target: Name, op: str, args: dict[str, Any]
                   ) -> CommandResult:
        rid = next(self._ids)
        event = anyio.Event()
        box: list[CommandResult] = []
        self._waiters[rid] = (event, box)
        try:
            node.outbox.write(encode_frame(Command(request_id=rid, op=op, args=args,
                                                   target=target)))
            with anyio.move_on_after(COMMAND_TIMEOUT):
                await event.wait()
        finally:
            del self._waiters[rid]
        if not box:
            return CommandResult(request_id=rid, ok=False, error="timed out")
        return box[0]

    # -- operations ----------------------------------------------------------------------

    async def create_channel(self, moderators: list[str], *, mls: bool = True) -> str:
        if not moderators:
            raise ControllerError("moderators=<org/ns/app/id> is required")
        try:
            moderator = Name.parse(moderators[0])
        except ValueError as exc:
            raise ControllerError(f"invalid moderator name: {exc}") from None
        if moderator.id is None:
            raise ControllerError("the moderator needs its full name with the instance id")
        channel = f"{moderator.org}/{moderator.ns}/" + "".join(
            secrets.choice(_ALNUM) for _ in range(18))
        errors = []
        for node in list(self.nodes.values()):
            res = await self._ask(node, moderator, "create_channel",
                                  {"channel": channel, "mls": mls})
            if res.ok:
                self.channels[channel] = Channel(channel, moderator, node.node_id,
                                                 [str(moderator)])
                return channel
            errors.append(res.error or "failed")
        if not self.nodes:
            raise ControllerError("no node is registered with the controller")
        raise ControllerError(f"failed to create channel {channel}: "
                              + "; ".join(e for e in errors if e != "not_here")
                              if any(e != "not_here" for e in errors)
                              else f"moderator {moderator} is not connected to any node")

    def _channel(self, name: str) -> tuple[Channel, _Node]:
        channel = self.channels.get(name)
        if channel is None:
            raise ControllerError(f"channel {name} not found")
        node = self.nodes.get(channel.node_id)
        if node is None:
            raise ControllerError(f"the node of channel {name} is not connected")
        return channel, node

    async def add_participant(self, channel_name: str, participant: str) -> None:
        channel, node = self._channel(channel_name)
        res = await self._ask(node, channel.moderator, "add_participant",
                              {"channel": channel_name, "participant": participant})
        if not res.ok:
            raise ControllerError(f"failed to add participant to session: {res.error}")
        channel.participants.append(str(res.result.get("name", participant)))

    async def delete_participant(self, channel_name: str, participant: str) -> None:
        channel, node = self._channel(channel_name)
        try:
            who = Name.parse(participant)
        except ValueError as exc:
            raise ControllerError(f"invalid participant name: {exc}") from None
        if who.same_service(channel.moderator) and who.id in (None, channel.moderator.id):
            raise ControllerError(
                f"cannot delete the moderator {channel.moderator} of channel {channel_name}: "
                "delete the channel instead")
        res = await self._ask(node, channel.moderator, "remove_participant",
                              {"channel": channel_name, "participant": participant})
        if not res.ok:
            raise ControllerError(f"failed to remove participant from session: {res.error}")
        removed = str(res.result.get("name", participant))
        channel.participants = [p for p in channel.participants
                                if p != removed and p != participant]

    async def delete_channel(self, channel_name: str) -> None:
        channel, node = self._channel(channel_name)
        res = await self._ask(node, channel.moderator, "delete_channel",
                              {"channel": channel_name})
        if not res.ok:
            raise ControllerError(f"failed to delete channel {channel_name}: {res.error}")
        del self.channels[channel_name]

    # -- northbound: operators -----------------------------------------------------------

    async def _northbound(self, stream: Any) -> None:
        outbox = Outbox(stream)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(outbox.run)
                async for msg in _messages(stream):
                    if isinstance(msg, Command):
                        result = await self._operate(msg)
                        outbox.write(encode_frame(result))
                outbox.close()
                await outbox.wait_finished()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _operate(self, cmd: Command) -> CommandResult:
        a = cmd.args
        rid = cmd.request_id
        try:
            if cmd.op == "channel_create":
                mods = a.get("moderators") or []
                name = await self.create_channel(list(mods), mls=a.get("mls", True) is not False)
                return CommandResult(request_id=rid, result={"channel": name})
            if cmd.op == "channel_delete":
                await self.delete_channel(str(a.get("channel", "")))
            elif cmd.op == "channel_list":
                return CommandResult(request_id=rid,
                                     result={"channels": sorted(self.channels)})
            elif cmd.op == "participant_add":
                await self.add_participant(str(a.get("channel", "")),
                                           str(a.get("participant", "")))
            elif cmd.op == "participant_delete":
                await self.delete_participant(str(a.get("channel", "")),
                                              str(a.get("participant", "")))
            elif cmd.op == "participant_list":
                channel, _ = self._channel(str(a.get("channel", "")))
                return CommandResult(request_id=rid,
                                     result={"participants": list(channel.participants)})
            elif cmd.op == "node_list":
                return CommandResult(request_id=rid, result={
                    "nodes": [f"{n.node_id} {' '.join(n.endpoints)}"
                              for n in self.nodes.values()]})
            else:
                raise ControllerError(f"unknown operation {cmd.op!r}")
        except ControllerError as exc:
            return CommandResult(request_id=rid, ok=False, error=str(exc))
        return CommandResult(request_id=rid)

    async def wait_for_node(self) -> None:
        """Return once at least one node is registered."""
        while not self.nodes:
            self._node_seen = anyio.Event()
            await self._node_seen.wait()


async def _messages(stream: Any) -> AsyncIterator[Any]:
    decoder = FrameDecoder()
    size = tune_reading(stream)
    while True:
        try:
            data = await stream.receive(size)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            return
        try:
            frames = decoder.feed(data)
            for f in frames:
                yield decode_message(decode_frame(f[4:]))
        except ProtocolError as exc:
            log.info("dropping a connection that sent a bad frame: %s", exc)
            return


def _bound(listener: Any, configured: str) -> str:
    host = configured.rsplit(":", 1)[0]
    port = listener.extra(SocketAttribute.local_port)
    if host in ("0.0.0.0", ""):
        host = "[::]" if host == "" else "0.0.0.0"
    return f"{host}:{port}"


@asynccontextmanager
async def open_controller(config: ControllerConfig | None = None
                          ) -> AsyncIterator[Controller]:
    """Run a controller for the duration of the block."""
    controller = Controller(config)
    with collapse_excgroups():
        async with anyio.create_task_group() as tg:
            await tg.start(controller.serve)
            try:
                yield controller
            finally:
                tg.cancel_scope.cancel()


async def call_controller(server: str, op: str, args: dict[str, Any]) -> CommandResult:
    """Send one operation to a controller's northbound port and wait for the result.

    Bound the wait with a cancel scope.

    :raises ConnectError: when the controller cannot be reached.
    """
    from ._errors import ConnectError

    host, port, _ = split_endpoint(server, "server", default_port=50051)
    try:
        stream = await dial(host, port)
    except OSError as exc:
        raise ConnectError(f"cannot reach the controller at {server}: {exc}") from exc
    async with stream:
        await stream.send(encode_frame(Command(request_id=1, op=op, args=args)))
        async for msg in _messages(stream):
            if isinstance(msg, CommandResult):
                return msg
    raise ConnectError("the controller closed the connection without an answer")


def controller_log_format() -> logging.Formatter:
    """The Go controller's look: ``2025-10-06T08:06:06Z INF message``."""

    class _Fmt(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
            level = {"INFO": "INF", "WARNING": "WRN", "ERROR": "ERR", "DEBUG": "DBG"}.get(
                record.levelname, record.levelname[:3])
            return f"{stamp} {level} {record.getMessage()}"

    return _Fmt()


def add_controller_arguments(parser: Any) -> None:
    parser.add_argument("--config", help="controller configuration (the tutorial's "
                        "config-controller.yaml)")
    parser.add_argument("--northbound",
                        help="operators' endpoint HOST:PORT (default 0.0.0.0:50051)")
    parser.add_argument("--southbound",
                        help="nodes' endpoint HOST:PORT (default 0.0.0.0:50052)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")


#: Printed on stdout once the controller listens.
CONTROLLER_READY = "controller ready"


def run_controller_from_args(args: Any) -> int:
    import signal
    import sys

    try:
        cfg = load_controller_config(args.config) if args.config else ControllerConfig()
        if args.northbound or args.southbound:
            cfg = ControllerConfig(northbound=args.northbound or cfg.northbound,
                                   southbound=args.southbound or cfg.southbound,
                                   log_level=cfg.log_level)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(controller_log_format())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if cfg.log_level == "debug" else logging.INFO)

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_controller(cfg) as controller:
                print(f"{CONTROLLER_READY} northbound={controller.northbound} "
                      f"southbound={controller.southbound}", flush=True)
                async for _ in signals:
                    break

    try:
        anyio.run(main, backend=args.backend)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
