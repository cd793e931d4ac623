"""The group tutorial, followed step by step through the CLI in subprocesses."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from tests.helpers import TUTORIAL_CONFIG

pytestmark = pytest.mark.anyio
CLI = [sys.executable, "-c", "import sys; from slim_agents._cli import main; sys.exit(main())"]


CONTROLLER_CONFIG = """\
northbound:
  httpHost: 0.0.0.0
  httpPort: 50051
  logging:
    level: DEBUG

southbound:
  httpHost: 0.0.0.0
  httpPort: 50052
  # number of node reconciler threads
  reconciler:
    threads: 3
  logging:
    level: INFO
"""

SLIM_CONTROLLER_CONFIG = TUTORIAL_CONFIG.replace("""    controller:
      servers: []
""", """    controller:
      servers: []
      clients:
        - endpoint: "http://host.docker.internal:50052"
          tls:
            insecure: true
      token_provider:
        shared_secret: "secret"
""")


class Proc:
    """A CLI subprocess with line-oriented stdout and a stdin pipe."""

    def __init__(self, process: Process, label: str) -> None:
        self.process = process
        self.label = label
        self.lines: list[str] = []
        self._buffer = b""
        self._seen = 0

    async def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for a stdout line matching ``pattern`` after the last one matched."""
        regex = re.compile(pattern)
        assert self.process.stdout is not None
        with anyio.move_on_after(timeout):
            return await self._expect(regex)
        raise AssertionError(f"{self.label}: no line matching {pattern!r} within {timeout} s; "
                             f"output: {self.lines}")

    async def _expect(self, regex: re.Pattern[str]) -> re.Match[str]:
        assert self.process.stdout is not None
        if True:
            while True:
                for i in range(self._seen, len(self.lines)):
                    m = regex.search(self.lines[i])
                    if m:
                        self._seen = i + 1
                        return m
                self._seen = len(self.lines)
                try:
                    chunk = await self.process.stdout.receive()
                except anyio.EndOfStream:
                    raise AssertionError(f"{self.label} ended before printing "
                                         f"{regex.pattern!r}; output: {self.lines}") from None
                self._buffer += chunk
                *done, self._buffer = self._buffer.split(b"\n")
                self.lines += [d.decode(errors="replace") for d in done]
                self._seen = max(0, self._seen - len(done))

    def rewind(self) -> None:
        self._seen = 0

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send((line + "\n").encode())

    async def wait(self, timeout: float = 20.0) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def spawn(args: list[str], label: str, *, logs: bool = False) -> AsyncIterator[Proc]:
    process = await anyio.open_process([*CLI, *args], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT if logs else None,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = Proc(process, label)
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()


def slim_arg(endpoint: str) -> str:
    return json.dumps({"endpoint": f"http://{endpoint}", "tls": {"insecure": True}})


async def start_node(stack: AsyncExitStack, tmp_path: Path, config: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    node = await stack.enter_async_context(spawn(
        ["node", "--config", str(path), "--endpoint", "127.0.0.1:0"], "node"))
    m = await node.expect(r"node_lite ready (\S+)")
    return m.group(1)


async def participant(stack: AsyncExitStack, endpoint: str, name: str,
                      *extra: str) -> Proc:
    p = await stack.enter_async_context(spawn(
        ["group", "--local", name, "--slim", slim_arg(endpoint), "--shared-secret", "secret",
         *extra], name))
    await p.expect("Falling back to shared-secret authentication")
    m = await p.expect(r"^(\S+) Created app$")
    assert m.group(1).lower().startswith(name)
    await p.expect(r"Connected to http://")
    return p


async def test_group_tutorial_with_an_in_app_moderator(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        endpoint = await start_node(stack, tmp_path, TUTORIAL_CONFIG)
        c1 = await participant(stack, endpoint, "agntcy/ns/client-1")
        c2 = await participant(stack, endpoint, "agntcy/ns/client-2")
        for c in (c1, c2):
            await c.expect("Waiting for session...")
        mod = await participant(stack, endpoint, "agntcy/ns/moderator", "--remote",
                                "agntcy/ns/chat", "--invites", "agntcy/ns/client-1",
                                "--invites", "agntcy/ns/client-2", "--enable-mls")
        await mod.expect(r"Creating new group session \(moderator\)\.\.\. .*agntcy/ns/moderator")
        await mod.expect(r"agntcy/ns/moderator -> add .*agntcy/ns/client-1.* to the group")
        await mod.expect(r"agntcy/ns/moderator -> add .*agntcy/ns/client-2.* to the group")
        for p in (mod, c1, c2):
            await p.expect(r"Welcome to the group .*agntcy/ns/chat.*!")
            await p.expect("Send a message to the group, or type 'exit' or 'quit' to quit.")
        await c1.send("hello from client-1")
        for p in (mod, c2):
            await p.expect(r"agntcy/ns/client-1/\S* > hello from client-1$")
        await mod.send("hello from the moderator")
        for p in (c1, c2):
            await p.expect(r"agntcy/ns/moderator/\S* > hello from the moderator$")
        await c2.send("quit")
        assert await c2.wait() == 0
        await mod.send("exit")  # the moderator leaving closes the group
        assert await mod.wait() == 0
        assert await c1.wait() == 0  # its receive loop ended


async def test_group_tutorial_with_the_controller(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        cfg = tmp_path / "config-controller.yaml"
        cfg.write_text(CONTROLLER_CONFIG)
        controller = await stack.enter_async_context(spawn(
            ["controller", "--config", str(cfg), "--northbound", "127.0.0.1:0",
             "--southbound", "127.0.0.1:0"], "controller", logs=True))
        m = await controller.expect(r"controller ready northbound=(\S+) southbound=(\S+)")
        north, south = m.group(1), m.group(2)
        node_config = SLIM_CONTROLLER_CONFIG.replace("host.docker.internal:50052", south)
        endpoint = await start_node(stack, tmp_path, node_config)
        clients = [await participant(stack, endpoint, f"agntcy/ns/client-{i}")
                   for i in (1, 2, 3)]
        full = {}
        for c in clients:
            c.rewind()
            m = await c.expect(r"^(\S+) Created app$")
            full[c.label] = m.group(1)[0].lower() + m.group(1)[1:]
            await c.expect("Waiting for session...")

        async def ctl(*args: str, ok: bool = True) -> list[str]:
            result = await anyio.run_process([*CLI, "ctl", "--server", north, *args],
                                             check=False)
            out = result.stdout.decode().splitlines()
            assert (result.returncode == 0) == ok, (args, out, result.stderr.decode())
            return out + result.stderr.decode().splitlines()

        out = await ctl("channel", "create", f"moderators={full['agntcy/ns/client-1']}")
        (line,) = out
        m = re.fullmatch(r"Received response: (agntcy/ns/[A-Za-z0-9]{18})", line)
        assert m, out
        channel = m.group(1)
        await clients[0].expect(rf"Welcome to the group .*{channel}.*!")
        for i in (2, 3):
            out = await ctl("participant", "add", "-c", channel, f"agntcy/ns/client-{i}")
            assert out == [f"Adding participant to channel ID {channel}: agntcy/ns/client-{i}",
                           f"Participant added successfully to channel ID {channel}: "
                           f"agntcy/ns/client-{i}"]
            await clients[i - 1].expect(rf"Welcome to the group .*{channel}.*!")
        await clients[1].send("hi from client-2")
        for c in (clients[0], clients[2]):
            await c.expect(r"agntcy/ns/client-2/\S* > hi from client-2$")
        out = await ctl("participant", "list", "-c", channel)
        assert out[0] == f"Listing participants for channel ID: {channel}"
        assert "agntcy/ns/client-3" in out[1]
        # the first participant is the moderator: deleting it is refused
        out = await ctl("participant", "delete", "-c", channel, "agntcy/ns/client-1", ok=False)
        assert any("delete the channel" in line for line in out)
        out = await ctl("participant", "delete", "-c", channel, "agntcy/ns/client-3")
        assert out == [f"Deleting participant from channel ID {channel}: agntcy/ns/client-3",
                       f"Participant deleted successfully from channel ID {channel}: "
                       "agntcy/ns/client-3"]
        assert await clients[2].wait() == 0  # its session closed: the receive loop ended
        await clients[0].send("still here")
        await clients[1].expect(r"agntcy/ns/client-1/\S* > still here$")
        out = await ctl("channel", "list")
        assert out == [f"Following channels found: ['{channel}']"]
        out = await ctl("channel", "delete", channel)
        assert out == [f"Channel deleted successfully with ID: {channel}"]
        for c in clients[:2]:
            assert await c.wait() == 0
        out = await ctl("channel", "delete", channel, ok=False)
        assert any("not found" in line for line in out)
        controller.rewind()
        await controller.expect(r"INF Registering node with ID: slim/0 svc=southbound")


async def test_ctl_reports_an_unreachable_controller() -> None:
    result = await anyio.run_process([*CLI, "ctl", "--server", "127.0.0.1:1", "channel", "list"],
                                     check=False)
    assert result.returncode == 1
    assert b"Error:" in result.stderr
