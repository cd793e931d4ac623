"""MCP adapter: slim tools as an MCP server, MCP over slim sessions, MCP tools as slim tools.

Serve tools to any MCP client::

    server = mcp_server(running.messaging_tools() + await running.remote_tools("org/ns/calc"))

Carry MCP over SLIM, one point-to-point session per MCP connection::

    async with open_app("org/ns/tools-mcp", node=url, secret=secret) as app:
        await serve_mcp(app, server)                      # until cancelled

    async with mcp_session(running, "org/ns/tools-mcp") as client:
        tools = await mcp_tools(client)                   # slim Tools calling the server

Built on the MCP SDK's low-level ``Server`` and its ``ClientSession``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import ClientSession
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from node_lite._util import collapse_excgroups
from slim_agents import (
    App,
    ConfigError,
    Name,
    RunningAgent,
    Session,
    SessionClosedError,
    SessionConfig,
    SessionError,
    Tool,
    ToolError,
)
from slim_agents._agent import _jsonable

__all__ = ["PAYLOAD_TYPE", "mcp_server", "mcp_session", "mcp_tools", "serve_mcp"]

log = logging.getLogger("slim_agents.mcp")

#: The payload type of the slim messages that carry MCP (one JSON-RPC message each).
PAYLOAD_TYPE = "mcp/json-rpc"
# MCP messages waiting on either side of a slim session.
MAX_PENDING = 16
# Reliable and ordered: JSON-RPC has no retries of its own.
SESSION_CONFIG = SessionConfig(timeout=1.0, max_retries=10)
# How long closing a slim session may take before we stop waiting for the peer.
CLOSE_TIMEOUT = 5.0

_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")


# -- slim tools as an MCP server ---------------------------------------------------------


def mcp_server(tools: Sequence[Tool], name: str = "slim-agents", *, version: str = "",
               instructions: str | None = None) -> Server[Any]:
    """A low-level MCP ``Server`` offering ``tools``.

    Each tool is listed with its name, description and parameters (the input
    schema). A call runs :meth:`Tool.run`: the result comes back as JSON text
    (and as structured content when it is an object); a failure, an unknown
    tool or bad arguments come back as a result with ``is_error`` set, its
    text the error message and its structured content ``{"error": {...}}``.

    :raises ConfigError: when two tools share a name.
    """
    by_name: dict[str, Tool] = {}
    for t in tools:
        if t.name in by_name:
            raise ConfigError(f"two tools are named {t.name!r}")
        by_name[t.name] = t

    async def list_tools(ctx: ServerRequestContext[Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=t.description, input_schema=dict(t.parameters))
            for t in by_name.values()])

    async def call_tool(ctx: ServerRequestContext[Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        t = by_name.get(params.name)
        if t is None:
            result: Any = ToolError(f"no tool named {params.name!r}", code="not_found",
                                    tool=params.name).to_result()
        else:
            result = await t.run(params.arguments or {})
        return _call_result(result, params.name)

    return Server(name, version=version, instructions=instructions,
                  on_list_tools=list_tools, on_call_tool=call_tool)


def _is_error(result: Any) -> bool:
    """Whether ``result`` is the error shape :meth:`Tool.run` returns."""
    return (isinstance(result, dict) and len(result) == 1 and isinstance(result.get("error"), dict)
            and "message" in result["error"])


def _call_result(result: Any, tool: str) -> types.CallToolResult:
    if _is_error(result):
        if not result["error"].get("tool"):  # remote failures may not name the tool
            result = {"error": {**result["error"], "tool": tool}}
        return types.CallToolResult(
            content=[types.TextContent(text=str(result["error"]["message"]))],
            structured_content=result, is_error=True)
    try:
        text = json.dumps(result, default=_jsonable)
    except (TypeError, ValueError) as exc:
        return _call_result(ToolError(f"the result is not JSON: {exc}", code="bad_result",
                                      tool=tool).to_result(), tool)
    # Structured content is an object up to protocol 2025-11-25: other results are text only.
    structured = json.loads(text) if isinstance(result, Mapping) else None
    return types.CallToolResult(content=[types.TextContent(text=text)],
                                structured_content=structured)


# -- MCP over a slim session -------------------------------------------------------------


def _app_of(target: App | RunningAgent) -> App:
    return target.app if isinstance(target, RunningAgent) else target


@asynccontextmanager
async def _mcp_streams(session: Session) -> AsyncIterator[
        tuple[MemoryObjectReceiveStream[SessionMessage | Exception],
              MemoryObjectSendStream[SessionMessage]]]:
    """The (read, write) streams of an MCP connection carried by ``session``.

    The read side ends when the session closes; whatever the write side gets
    is published, one JSON-RPC message per slim message.
    """
    read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](
        MAX_PENDING)
    write_send, write_recv = anyio.create_memory_object_stream[SessionMessage](MAX_PENDING)

    async def receive() -> None:
        async with read_send:
            while True:
                try:
                    msg = await session.get_message()
                except SessionClosedError:
                    return
                except SessionError as exc:  # a lost or undecryptable message
                    log.warning("MCP over session %s: %s", session.id, exc)
                    continue
                item: SessionMessage | Exception
                try:
                    item = SessionMessage(types.jsonrpc_message_adapter.validate_json(
                        msg.payload, by_name=False))
                except ValueError as exc:  # the SDK reports bad input as an exception item
                    item = exc
                try:
                    await read_send.send(item)
                except anyio.BrokenResourceError:
                    return  # the MCP side is done

    async def send() -> None:
        async with write_recv:
            async for item in write_recv:
                data = item.message.model_dump_json(by_alias=True, exclude_unset=True).encode()
                try:
                    await session.publish(data, payload_type=PAYLOAD_TYPE)
                except SessionClosedError:
                    return

    async with anyio.create_task_group() as tg, read_recv, write_send:
        tg.start_soon(receive)
        tg.start_soon(send)
        try:
            yield read_recv, write_send
        finally:
            tg.cancel_scope.cancel()


async def _close(session: Session) -> None:
    # Shielded: a cancelled caller still tells the peer, but does not wait for ever.
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await session.close()


async def _serve_session(session: Session, server: Server[Any]) -> None:
    try:
        async with _mcp_streams(session) as (read, write):
            await server.run(read, write, server.create_initialization_options())
    except Exception:
        log.exception("MCP server %s: the connection over session %s failed", server.name,
                      session.id)
    finally:
        await _close(session)


async def serve_mcp(app: App, server: Server[Any], *,
                    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve ``server`` to every MCP client that opens a session with ``app``, until cancelled.

    Each point-to-point session is one MCP connection. Give MCP an app of its
    own: an agent's app already takes the sessions opened with it. Use with
    ``await task_group.start(serve_mcp, app, server)`` to know it is listening.
    """
    if isinstance(app, RunningAgent):
        raise ConfigError("an agent's app serves the agent's sessions: serve MCP on an app "
                          "of its own (open_app)")
    with collapse_excgroups():
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                session = await app.listen_for_session()
                tg.start_soon(_serve_session, session, server)


@asynccontextmanager
async def mcp_session(app: App | RunningAgent, target: Name | str, *,
                      config: SessionConfig | None = None,
                      read_timeout_seconds: float | None = None) -> AsyncIterator[ClientSession]:
    """An initialized MCP ``ClientSession`` with the MCP server ``target`` serves over slim.

    :param target: the server's app (``org/ns/app``, or a full name).
    :param config: the slim session (reliable by default).
    :param read_timeout_seconds: how long a request may wait for its response.
    :raises NoRouteError: when nobody serves ``target``.
    :raises MCPError: when the server refuses the handshake.
    """
    session = await _app_of(app).create_session(target, config or SESSION_CONFIG)
    try:
        # The caller's exceptions come out as themselves, not in a group of one.
        with collapse_excgroups():
            async with _mcp_streams(session) as (read, write), \
                    ClientSession(read, write, read_timeout_seconds=read_timeout_seconds) \
                    as client:
                await client.initialize()
                yield client
    finally:
        await _close(session)


# -- MCP tools as slim tools -------------------------------------------------------------


async def mcp_tools(client: ClientSession, *, call_timeout: float | None = None
                    ) -> list[Tool]:
    """The tools of the MCP server ``client`` talks to, as slim :class:`Tool` objects.

    A call returns the structured content when there is some, else the text
    (parsed when it is JSON). An error result or an MCP error raises
    :class:`ToolError`. Names that slim does not allow (dots, slashes, ...)
    are spelled with ``_``; the server still gets the original name.

    :param call_timeout: how long each call may wait for its result (seconds).
    """
    listed: list[types.Tool] = []
    cursor: str | None = None
    while True:
        page = await client.list_tools(
            params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        listed.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    tools: dict[str, Tool] = {}
    for spec in listed:
        name = _TOOL_NAME.sub("_", spec.name)[:64]
        if name in tools:
            log.warning("MCP tool %r is left out: its slim name %r is taken", spec.name, name)
            continue
        schema = dict(spec.input_schema)
        schema.setdefault("type", "object")
        tools[name] = Tool(name=name, description=spec.description or spec.title or spec.name,
                           parameters=schema, func=_remote(client, spec.name, call_timeout),
                           returns=spec.output_schema)
    return list(tools.values())


def _remote(client: ClientSession, name: str, timeout: float | None
            ) -> Callable[..., Awaitable[Any]]:
    async def call(**arguments: Any) -> Any:
        try:
            result = await client.call_tool(name, arguments, read_timeout_seconds=timeout)
        except MCPError as exc:
            raise ToolError(exc.message, code="mcp_error", tool=name) from exc
        except RuntimeError as exc:  # a result the client could not accept
            raise ToolError(str(exc), code="bad_result", tool=name) from exc
        if result.is_error:
            raise _tool_error(result, name)
        if result.structured_content is not None:
            return result.structured_content
        return _content(result.content)

    return call


def _tool_error(result: types.CallToolResult, name: str) -> ToolError:
    # Our own servers send the slim error as structured content: keep its code.
    err = result.structured_content
    if _is_error(err):
        detail = err["error"]
        return ToolError(str(detail["message"]), code=str(detail.get("code") or "failed"),
                         tool=name)
    text = _content(result.content)
    return ToolError(text if isinstance(text, str) else json.dumps(text), tool=name)


def _content(blocks: Sequence[types.ContentBlock]) -> Any:
    """One text block as its JSON value (or the text); several as a list."""
    if len(blocks) == 1 and isinstance(blocks[0], types.TextContent):
        text = blocks[0].text
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the decoder's limit
            return text
    return [b.text if isinstance(b, types.TextContent)
            else b.model_dump(mode="json", by_alias=True, exclude_none=True) for b in blocks]
