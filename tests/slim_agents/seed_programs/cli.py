"""Stand-ins for what the seed programs take from click and prompt_toolkit.

Tests have no terminal: ``print_formatted_text`` prints plainly (and remembers
what it printed), and ``PromptSession.prompt_async`` answers from a script
given with ``--input`` options. A script line ``wait:TEXT`` is not typed: it
waits until TEXT has been printed (say, a message from another participant).
Once the script is used up, the prompt waits forever, like a user who types
nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

# What was printed through print_formatted_text, and a wake-up for waiters.
_printed: list[str] = []
_changed: asyncio.Event | None = None
_script: list[str] = []
# How long a "wait:" line waits before giving up.
WAIT_TIMEOUT = 20.0


def print_formatted_text(*values: object, style: object = None) -> None:
    global _changed
    text = " ".join(str(v) for v in values)
    print(text, flush=True)
    _printed.append(text)
    if _changed is not None:
        _changed.set()
        _changed = None


async def _wait_printed(text: str) -> None:
    global _changed
    async with asyncio.timeout(WAIT_TIMEOUT):
        while not any(text in line for line in _printed):
            if _changed is None:
                _changed = asyncio.Event()
            await _changed.wait()


class PromptSession:
    """Answers ``prompt_async`` from the ``--input`` script."""

    def __init__(self, style: object = None) -> None:
        self.style = style

    async def prompt_async(self, message: str) -> str:
        while _script:
            line = _script.pop(0)
            if line.startswith("wait:"):
                try:
                    await _wait_printed(line[5:])
                except TimeoutError:
                    print(f"script: gave up waiting for {line[5:]!r}", flush=True)
                continue
            print(f"{message}{line}", flush=True)
            return line
        print(message, flush=True)
        await asyncio.Event().wait()  # nothing more will be typed
        raise AssertionError("unreachable")


custom_style = None


def parse_args(description: str, argv: list[str] | None = None) -> dict[str, Any]:
    """The options of upstream's examples (common_options), plus ``--input``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--local", required=True,
                   help="Local ID in the format organization/namespace/application")
    p.add_argument("--remote", help="Remote ID in the format organization/namespace/"
                   "application-or-stream")
    p.add_argument("--slim", type=json.loads,
                   default={"endpoint": "http://127.0.0.1:46357", "tls": {"insecure": True}},
                   help="slim connection parameters (JSON)")
    p.add_argument("--enable-opentelemetry", action="store_true")
    p.add_argument("--shared-secret", default="secret")
    p.add_argument("--jwt")
    p.add_argument("--spire-trust-bundle", "--bundle", dest="spire_trust_bundle")
    p.add_argument("--audience", action="append")
    p.add_argument("--invites", action="append")
    p.add_argument("--remove", help="participant to remove after the exchange (moderator)")
    p.add_argument("--enable-mls", action="store_true")
    p.add_argument("--input", action="append", default=[],
                   help="a scripted line for the prompt (tests)")
    args = vars(p.parse_args(argv))
    _script[:] = args.pop("input")
    return args
