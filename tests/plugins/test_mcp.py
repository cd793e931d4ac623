"""The MCP adapter, exercised by the MCP SDK's own client, through a real node on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
import pytest
from mcp import Client, ClientSession
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from node_lite import Node, NodeConfig, open_node
from slim_agents import (
    Agent,
    App,
    ConfigError,
    RunningAgent,
    Tool,
    ToolError,
    framework_adapter,
    open_app,
    tool,
)
from slim_agents._plugins import make_plugin_manager
from slim_agents_plugins import mcp as adapter
from slim_agents_plugins.mcp import PAYLOAD_TYPE, mcp_server, mcp_session, mcp_tools, serve_mcp
from tests.helpers import unique
from tests.slim_agents.test_agents import calculator

pytestmark = pytest.mark.anyio
SECRET = "mcp-test-secret-that-is-long-enough-0123456789"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


@asynccontextmanager
async def agents(node: Node) -> AsyncIterator[tuple[str, RunningAgent]]:
    """A calculator agent and a front agent (on the node's loopback URL)."""
    calc_name = f"org/ns/{unique('calc')}"
    front = Agent(f"org/ns/{unique('front')}", plugins=make_plugin_manager(allow=False))
    async with calculator(calc_name).run(node.url, secret=SECRET), \
            front.run(node.url, secret=SECRET) as running:
        yield calc_name, running


@asynccontextmanager
async def served(node: Node, server: Server[Any]) -> AsyncIterator[App]:
    """An app of its own serving ``server`` over slim sessions."""
    async with open_app(f"org/ns/{unique('mcp')}", node=node.url, secret=SECRET) as app, \
            anyio.create_task_group() as tg:
        await tg.start(serve_mcp, app, server)
        yield app
        tg.cancel_scope.cancel()


def base(app: App) -> str:
    return str(app.name.without_id())


def text(result: types.CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, types.TextContent)
    return block.text


async def check_front_server(client: ClientSession, calc_name: str) -> None:
    """What an MCP client sees of the front agent's server."""
    listing = {t.name: t for t in (await client.list_tools()).tools}
    assert {"add", "fail", "call_tool", "send_message", "discover_agents"} <= set(listing)
    assert listing["add"].description == "Add two integers."
    assert listing["add"].input_schema["required"] == ["a", "b"]
    assert listing["add"].input_schema["properties"]["a"]["type"] == "integer"

    # The call crosses the node to the calculator.
    result = await client.call_tool("add", {"a": 2, "b": 40})
    assert not result.is_error and text(result) == "42"
    result = await client.call_tool(
        "call_tool", {"agent_name": calc_name, "tool": "add", "arguments": {"a": 1, "b": 1}})
    assert not result.is_error and json.loads(text(result)) == 2

    result = await client.call_tool("fail", {})
    assert result.is_error and "kaput" in text(result)
    assert result.structured_content["error"]["tool"] == "fail"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_sdk_client_in_process(node: Node, mode: str) -> None:
    async with agents(node) as (calc_name, running):
        with anyio.fail_after(15):
            server = mcp_server(await running.remote_tools(calc_name) + running.messaging_tools(),
                                "front")
            # The SDK's in-process connection: a handshake over memory streams
            # (legacy) or direct dispatch (the 2026 protocol).
            async with Client(server, mode=mode) as sdk:
                await check_front_server(sdk.session, calc_name)


async def test_the_sdk_client_over_a_slim_session(node: Node) -> None:
    async with agents(node) as (calc_name, running):
        with anyio.fail_after(15):
            server = mcp_server(await running.remote_tools(calc_name) + running.messaging_tools(),
                                "front")
            async with served(node, server) as app:
                # Two MCP connections, from an agent and from a bare app.
                async with mcp_session(running, base(app)) as client:
                    assert client.initialize_result is not None
                    assert client.initialize_result.server_info.name == "front"
                    await check_front_server(client, calc_name)
                async with open_app(f"org/ns/{unique('user')}", node=node.url,
                                    secret=SECRET) as user, \
                        mcp_session(user, base(app)) as client:
                    await check_front_server(client, calc_name)


async def test_each_mcp_message_is_one_json_slim_message(node: Node) -> None:
    echo = tool(lambda_echo)
    async with served(node, mcp_server([echo])) as app, \
            open_app(f"org/ns/{unique('raw')}", node=node.url, secret=SECRET) as raw:
        with anyio.fail_after(10):
            session = await raw.create_session(base(app), adapter.SESSION_CONFIG)
            # Bad input first: the server reports it and goes on serving.
            await session.publish(b"not json", payload_type=PAYLOAD_TYPE)
            await session.publish(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
                                  .encode(), payload_type=PAYLOAD_TYPE)
            msg = await session.get_message()
            assert msg.context.payload_type == PAYLOAD_TYPE
            assert json.loads(msg.payload) == {"jsonrpc": "2.0", "id": 1, "result": {}}
            await session.close()


async def lambda_echo(text: str) -> str:
    """Echo the text.

    :param text: what to echo
    """
    return text


async def test_mcp_tools_call_an_mcp_server_over_slim(node: Node) -> None:
    async with agents(node) as (calc_name, running):
        with anyio.fail_after(15):
            server = mcp_server(await running.remote_tools(calc_name), "calc-mcp")
            async with served(node, server) as app, mcp_session(running, base(app)) as client:
                tools = {t.name: t for t in await mcp_tools(client)}
                assert set(tools) == {"add", "fail"}
                assert tools["add"].parameters["required"] == ["a", "b"]
                assert await tools["add"]({"a": 20, "b": 22}) == 42
                with pytest.raises(ToolError) as info:
                    await tools["fail"]()
                assert "kaput" in str(info.value) and info.value.tool == "fail"
                # Checked before leaving: the server gets only well-formed calls.
                assert (await tools["add"].run({"a": "x", "b": 1}))["error"]["code"] == \
                    "bad_arguments"

                # An agent offers the MCP tools to other agents.
                relay = Agent(f"org/ns/{unique('relay')}", plugins=make_plugin_manager(allow=False))
                relay.add_tool(tools["add"])
                async with relay.run(node.url, secret=SECRET):
                    assert await running.call(relay.name, "add", a=1, b=2) == 3


def foreign_server() -> Server[Any]:
    """A plain MCP server: a dotted tool name, an error result and a protocol error."""
    async def list_tools(ctx: ServerRequestContext[Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        schema = {"type": "object", "properties": {"q": {"type": "string"}}}
        return types.ListToolsResult(tools=[
            types.Tool(name="db.query", description="Query.", input_schema=schema),
            types.Tool(name="db.refuse", input_schema=schema),
            types.Tool(name="db.broken", description="Breaks.", input_schema=schema),
            types.Tool(name="db.list", description="Lists.", input_schema=schema),
        ])

    async def call_tool(ctx: ServerRequestContext[Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        q = (params.arguments or {}).get("q", "")
        if params.name == "db.query":
            return types.CallToolResult(content=[types.TextContent(text=f"rows for {q}")])
        if params.name == "db.list":
            return types.CallToolResult(content=[types.TextContent(text="a"),
                                                 types.TextContent(text="b")])
        if params.name == "db.refuse":
            return types.CallToolResult(content=[types.TextContent(text="not allowed")],
                                        is_error=True)
        raise MCPError(types.INVALID_PARAMS, "the database is down")

    return Server("db", on_list_tools=list_tools, on_call_tool=call_tool)


async def test_mcp_errors_become_tool_errors(node: Node) -> None:
    async with served(node, foreign_server()) as app, \
            open_app(f"org/ns/{unique('user')}", node=node.url, secret=SECRET) as user, \
            mcp_session(user, base(app)) as client:
        with anyio.fail_after(10):
            tools = {t.name: t for t in await mcp_tools(client)}
            assert set(tools) == {"db_query", "db_refuse", "db_broken", "db_list"}
            assert tools["db_refuse"].description == "db.refuse"
            assert await tools["db_query"]({"q": "x"}) == "rows for x"
            assert await tools["db_list"]({}) == ["a", "b"]
            with pytest.raises(ToolError) as info:
                await tools["db_refuse"]({})
            assert str(info.value) == "not allowed" and info.value.tool == "db.refuse"
            with pytest.raises(ToolError) as info:
                await tools["db_broken"]({})
            assert "the database is down" in str(info.value)
            assert info.value.code == "mcp_error"
            # What a model reads.
            assert (await tools["db_broken"].run({}))["error"]["message"] == \
                "the database is down"


async def test_bad_calls_get_error_results_and_nothing_hangs(node: Node) -> None:
    async with agents(node) as (calc_name, running):
        with anyio.fail_after(15):
            server = mcp_server(await running.remote_tools(calc_name))
            async with served(node, server) as app, mcp_session(running, base(app)) as client:
                cases: list[tuple[str, dict[str, Any] | None, str]] = [
                    ("nope", {}, "not_found"),
                    ("add", {"a": 1}, "bad_arguments"),
                    ("add", {"a": 1, "b": "2"}, "bad_arguments"),
                    ("add", {"a": 1, "b": 2, "c": 3}, "bad_arguments"),
                    ("add", None, "bad_arguments"),
                ]
                for name, args, code in cases:
                    result = await client.call_tool(name, args)
                    assert result.is_error, (name, args)
                    assert result.structured_content["error"]["code"] == code, (name, args)
                    assert text(result) == result.structured_content["error"]["message"]
                # An unknown method is a protocol error.
                with pytest.raises(MCPError):
                    await client.list_prompts()
                # The connection is still good.
                assert text(await client.call_tool("add", {"a": 1, "b": 2})) == "3"


async def test_a_client_whose_server_goes_away_gets_an_error(node: Node) -> None:
    slow_started = anyio.Event()

    async def slow() -> str:
        """Never answers."""
        slow_started.set()
        await anyio.sleep_forever()
        return ""

    server = mcp_server([tool(slow)])
    serving = anyio.CancelScope()

    async def serve(app: App, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with serving:
            await serve_mcp(app, server, task_status=task_status)

    async def stop_serving() -> None:
        await slow_started.wait()
        serving.cancel()

    async with open_app(f"org/ns/{unique('user')}", node=node.url, secret=SECRET) as user, \
            open_app(f"org/ns/{unique('mcp')}", node=node.url, secret=SECRET) as app:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                await tg.start(serve, app)
                async with mcp_session(user, base(app)) as client:
                    tg.start_soon(stop_serving)
                    with pytest.raises(MCPError) as info:
                        await client.call_tool("slow", {})
                    assert info.value.code == types.CONNECTION_CLOSED


async def test_mcp_configuration_errors(node: Node) -> None:
    add = Tool(name="add", description="adds", parameters={"type": "object"},
               func=lambda_echo)
    with pytest.raises(ConfigError, match="two tools"):
        mcp_server([add, add])
    async with agents(node) as (_, running):
        with pytest.raises(ConfigError, match="app of its own"):
            await serve_mcp(running, mcp_server([]))  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_the_mcp_plugin_provides_this_adapter(anyio_backend: str) -> None:
    assert framework_adapter("mcp", make_plugin_manager(allow={"mcp"})) is adapter


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_a_text_result_is_its_json_value_or_the_text(anyio_backend: str) -> None:
    # What a remote MCP server's tool returned, as the calling agent's tool result.
    deep = "[" * 5000 + "]" * 5000  # past the JSON decoder's nesting limit
    for text, value in (('{"a": 1}', {"a": 1}), ("plain words", "plain words"), (deep, deep)):
        assert adapter._content([types.TextContent(type="text", text=text)]) == value
