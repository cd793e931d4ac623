# `slim-agents demo`: the group tutorial in one process and one command. An
# embedded node, a moderator and two participants, an encrypted group chat
# printed the way the tutorial shows it, then a removal and a channel delete.
from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio

from node_lite import NodeConfig, open_node

from ._app import open_app
from ._cli_examples import FALLBACK_WARNING, display
from ._config import SessionConfig
from ._errors import SessionClosedError
from ._session import Session
from ._trace import TraceRecorder, record_node

SECRET = "demo-shared-secret-for-development-only-0123456789"
SCRIPT = [
    ("moderator", "Hello everyone, welcome to the chat!"),
    ("client-1", "Hi! Glad to be here."),
    ("client-2", "Hello from client-2. Everything we say is end-to-end encrypted."),
    ("moderator", "Great. client-2, you are leaving us shortly: thanks for joining."),
]
LAST_WORDS = "Just the two of us now."


class _Tap:
    """Counts what the node forwards and whether a message body ever appears in clear."""

    def __init__(self) -> None:
        self.frames = 0
        self.leaks = 0

    def check(self, conn_id: int, data: bytes | None) -> None:
        # A node tap: every chunk the node reads, as a wiretap on the node would see it.
        if data is None:
            return
        self.frames += 1
        if any(text.encode() in data for text in [*(t for _, t in SCRIPT), LAST_WORDS]):
            self.leaks += 1


async def run_demo(out: Callable[[str], None] = print, *, encrypt: bool = True,
                   trace: str | None = None) -> int:
    """Run the scripted group chat; returns the exit status.

    :param trace: a file to record the session's frames to (JSON lines).
    """
    tap = _Tap()
    async with open_node(NodeConfig()) as node, AsyncExitStack() as stack:
        node.core.taps.append(tap.check)
        if trace is not None:
            trace_file = stack.enter_context(
                await anyio.to_thread.run_sync(functools.partial(open, trace, "w")))
            stack.enter_context(record_node(node, TraceRecorder(trace_file)))
        out(f"Embedded node listening on {node.endpoint} (no server to start by hand)")
        out(FALLBACK_WARNING)
        apps = {}
        for who in ("moderator", "client-1", "client-2"):
            app = await stack.enter_async_context(
                open_app(f"agntcy/ns/{who}", node=node.url, secret=SECRET))
            out(f"{app.id_str[:1].upper()}{app.id_str[1:]} Created app")
            out(f"{app.id_str[:1].upper()}{app.id_str[1:]} Connected to {node.url}")
            apps[who] = app
        for who in ("client-1", "client-2"):
            out(f"[{who}] Waiting for session...")

        moderator = apps["moderator"]
        out("Creating new group session (moderator)... "
            f"{display(moderator.name.with_id(None))}")
        config = SessionConfig.group(timeout=1.0, max_retries=5, mls_enabled=encrypt)
        group = await moderator.create_session("agntcy/ns/chat", config)
        sessions: dict[str, Session] = {"moderator": group}
        for who in ("client-1", "client-2"):
            added = await group.invite(f"agntcy/ns/{who}")
            out(f"agntcy/ns/moderator -> add {display(added.with_id(None))} to the group")
            sessions[who] = await apps[who].listen_for_session()
        for who in ("moderator", "client-1", "client-2"):
            out(f"[{who}] Welcome to the group {display(sessions[who].dst)}!")
        out("")

        async def hear(listeners: list[str], count: int) -> None:
            async def one(who: str) -> None:
                for _ in range(count):
                    msg = await sessions[who].get_message()
                    out(f"[{who}] {display(msg.context.source_name)} > "
                        f"{msg.payload.decode()}")

            async with anyio.create_task_group() as tg:
                for who in listeners:
                    tg.start_soon(one, who)

        for speaker, text in SCRIPT:
            out(f"[{speaker}] {display(sessions[speaker].src)} > {text}")
            await (await sessions[speaker].publish(text.encode()))
            await _within(hear([w for w in sessions if w != speaker], 1))

        out("")
        out(f"agntcy/ns/moderator -> remove {display(apps['client-2'].name)} from the group")
        await group.remove(apps["client-2"].name)
        reason = await sessions["client-2"].wait_closed()
        out(f"[client-2] session closed ({reason}): its receive loop ends")
        out(f"[moderator] participants now: {', '.join(str(n) for n in group.participants)}")
        await (await group.publish(LAST_WORDS.encode()))
        out(f"[moderator] {display(group.src)} > {LAST_WORDS}")
        await _within(hear(["client-1"], 1))

        out("")
        out("agntcy/ns/moderator -> delete the channel")
        await group.close()
        reason = await sessions["client-1"].wait_closed()
        out(f"[client-1] session closed ({reason}): its receive loop ends")
        try:
            await sessions["client-1"].publish(b"anyone?")
        except SessionClosedError as exc:
            out(f"[client-1] -> Error sending message: {exc}")
    out("")
    if encrypt:
        verdict = "never" if not tap.leaks else f"{tap.leaks} times"
        out(f"End-to-end encryption: the node forwarded {tap.frames} frames and saw a "
            f"message body in clear {verdict}.")
    return 0 if not (encrypt and tap.leaks) else 1


async def _within(aw: Awaitable[Any], seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        await aw


def main(args: Any = None) -> int:
    try:
        trace = getattr(args, "trace", None)
        return int(anyio.run(functools.partial(run_demo, trace=trace)))
    except KeyboardInterrupt:
        return 130
    except TimeoutError:
        print("error: the demo did not complete in time", file=sys.stderr)
        return 1
