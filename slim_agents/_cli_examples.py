# `slim-agents group` and `slim-agents p2p`: the tutorial's group example and the
# sessions document's point-to-point example, on the native API. Lines a member
# types (or pipes in) go to the group; what others send prints as "<source> > <text>".
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio

from node_lite import AuthenticationError, ConfigError, ConnectError, Name, SlimError

from ._app import App, open_app
from ._config import SessionConfig
from ._errors import MessageLostError, SessionClosedError
from ._session import Session

FALLBACK_WARNING = ("Warning: Falling back to shared-secret authentication. "
                    "Don't use this in production!")


def display(name: Name | None) -> str:
    """A name as the tutorial prints it (hashed components when xxhash is available)."""
    if name is None:
        return "-"
    try:
        from .compat.v0_6 import PyName
    except ImportError:
        return str(name)
    return str(PyName(name.org, name.ns, name.app, name.id))


def _say(text: str, label: str) -> None:
    # The tutorial's format_message_print: "<Capitalised text> <label>".
    print(f"{text[:1].upper()}{text[1:]} {label}", flush=True)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--local", required=True, help="this app's name, org/ns/app")
    parser.add_argument("--slim", default='{"endpoint": "http://127.0.0.1:46357", '
                        '"tls": {"insecure": true}}',
                        help="JSON connection settings, e.g. "
                        '\'{"endpoint": "http://localhost:46357", "tls": {"insecure": true}}\'')
    parser.add_argument("--shared-secret", default="secret",
                        help="shared secret for identities (development only)")
    parser.add_argument("--jwt", help="path to a JWT for this app's identity")
    parser.add_argument("--spire-trust-bundle", help="SPIRE trust bundle (JSON) to verify JWTs")
    parser.add_argument("--audience", action="append", help="accepted JWT audience (repeatable)")
    parser.add_argument("--enable-opentelemetry", action="store_true",
                        help="export traces over OTLP (needs the otel extra)")
    parser.add_argument("--enable-mls", action="store_true",
                        help="end-to-end encrypt the session")


def add_group_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--remote", help="channel name (moderator), org/ns/channel")
    parser.add_argument("--invites", action="append", default=[],
                        help="participant to invite, org/ns/app (repeatable; makes this the "
                        "moderator)")


def add_p2p_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--remote", help="service to talk to, org/ns/app (sender side)")
    parser.add_argument("--message", help="message to send (sender side)")
    parser.add_argument("--iterations", type=int, default=1, help="times to send it")


def _endpoint(slim: str) -> str:
    try:
        settings = json.loads(slim)
        endpoint = settings["endpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--slim must be JSON with an endpoint: {exc}") from None
    if not isinstance(endpoint, str):
        raise ConfigError("--slim endpoint must be a string")
    return endpoint


def _identity(args: argparse.Namespace) -> dict[str, Any]:
    if args.jwt and args.spire_trust_bundle and args.audience:
        from node_lite import JwtVerifier, StaticJwtProvider, load_trust_bundle

        print("Using JWT + JWKS authentication.", flush=True)
        return {"provider": StaticJwtProvider(args.jwt),
                "verifier": JwtVerifier(keys=load_trust_bundle(args.spire_trust_bundle),
                                        audience=args.audience)}
    print(FALLBACK_WARNING, flush=True)
    return {"secret": args.shared_secret}


async def _lines(on_line: Callable[[str], Any]) -> None:
    """Feed stdin lines (a terminal or a pipe) to ``on_line`` until EOF or exit/quit.

    Waits on the file descriptor rather than in a thread, so that the program
    can end while nobody types.
    """
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        await anyio.wait_readable(fd)
        data = os.read(fd, 65536)
        if not data:
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            text = raw.decode(errors="replace").rstrip("\r")
            if text.strip().lower() in ("exit", "quit"):
                raise _Quit
            if text:
                await on_line(text)


class _Quit(Exception):
    pass


def _config(args: argparse.Namespace, *, group: bool) -> SessionConfig:
    kw: dict[str, Any] = {"timeout": 5.0, "max_retries": 5, "mls_enabled": args.enable_mls}
    return SessionConfig.group(**kw) if group else SessionConfig(**kw)


async def _open(args: argparse.Namespace) -> Any:
    endpoint = _endpoint(args.slim)
    if args.enable_opentelemetry:
        from ._otel import enable_tracing

        collector = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
        try:
            enable_tracing(endpoint=collector)
            print(f"-> OpenTelemetry: spans go to {collector}", file=sys.stderr, flush=True)
        except ConfigError as exc:
            print(f"-> {exc}; running without it", file=sys.stderr, flush=True)
    return open_app(args.local, node=endpoint, **_identity(args)), endpoint


async def run_group(args: argparse.Namespace) -> int:
    ctx, endpoint = await _open(args)
    async with ctx as app:
        _say(app.id_str, "Created app")
        _say(app.id_str, f"Connected to {endpoint}")
        session: Session | None = None
        if args.remote and args.invites:
            channel = Name.parse(args.remote)
            print(f"Creating new group session (moderator)... {display(app.name.with_id(None))}",
                  flush=True)
            session = await app.create_session(channel, _config(args, group=True))
            for invite in args.invites:
                added = await session.invite(Name.parse(invite))
                print(f"{args.local} -> add {display(added.with_id(None))} to the group",
                      flush=True)
        return await _chat(app, session)


async def _chat(app: App, session: Session | None) -> int:
    if session is None:
        print("Waiting for session...", flush=True)
        session = await app.listen_for_session()
    assert session is not None
    print(f"Welcome to the group {display(session.dst)}!\n"
          "Send a message to the group, or type 'exit' or 'quit' to quit.", flush=True)
    interactive = sys.stdin.isatty()

    async def receive() -> None:
        while True:
            try:
                msg = await session.get_message()
            except MessageLostError as exc:
                print(f"-> Error receiving message: {exc}", flush=True)
                continue
            except SessionClosedError:
                return
            print(f"{display(msg.context.source_name)} > {msg.payload.decode(errors='replace')}",
                  flush=True)

    async def send(text: str) -> None:
        try:
            await session.publish(text.encode())
        except SessionClosedError as exc:
            print(f"-> Error sending message: {exc}", flush=True)
        if interactive:
            print(f"{display(session.src)} > ", end="", flush=True)

    async with anyio.create_task_group() as tg:
        async def keyboard() -> None:
            if interactive:
                print(f"{display(session.src)} > ", end="", flush=True)
            try:
                await _lines(send)
            except _Quit:
                await session.close()
                tg.cancel_scope.cancel()

        async def watch_close() -> None:
            await receive()
            tg.cancel_scope.cancel()  # the session ended: the receive loop is over

        tg.start_soon(keyboard)
        tg.start_soon(watch_close)
    return 0


async def run_p2p(args: argparse.Namespace) -> int:
    ctx, endpoint = await _open(args)
    async with ctx as app:
        _say(app.id_str, "Created app")
        _say(app.id_str, f"Connected to {endpoint}")
        if args.remote:
            session = await app.create_session(Name.parse(args.remote),
                                               _config(args, group=False))
            for i in range(args.iterations):
                text = args.message or f"hello {i}"
                await (await session.publish(text.encode()))
                print(f"{display(session.src)} -> {display(session.dst)}: {text}", flush=True)
                msg = await session.get_message()
                print(f"{display(msg.context.source_name)} > "
                      f"{msg.payload.decode(errors='replace')}", flush=True)
            await session.close()
            return 0
        print("Waiting for session...", flush=True)
        while True:
            session = await app.listen_for_session()
            print(f"New session {session.id} from {display(session.dst)}", flush=True)
            async for msg in session:
                text = msg.payload.decode(errors="replace")
                print(f"{display(msg.context.source_name)} > {text}", flush=True)
                await session.publish_to(msg.context, msg.payload)


def run(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run an example until it ends, Ctrl-C or SIGTERM; errors become exit codes."""
    async def main() -> int:
        result = [0]
        async with anyio.create_task_group() as tg:
            async def body() -> None:
                result[0] = await func(args)
                tg.cancel_scope.cancel()

            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(body)
            tg.start_soon(signals)
        return result[0]

    try:
        return int(anyio.run(main))
    except (ConnectError, AuthenticationError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
