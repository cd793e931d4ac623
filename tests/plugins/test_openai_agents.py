"""OpenAI Agents SDK adapter: SDK agents (with a scripted model) calling slim agents'
tools and messaging over a real node, an SDK agent as a mailbox handler, and errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypedDict

import anyio
import pytest
from agents import Agent as OpenAIAgent
from agents import FunctionTool, ModelResponse, RunConfig, Runner, Usage
from agents.models.interface import Model
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from pydantic import BaseModel

import slim_agents_plugins.openai_agents as adapter
from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, Message, Session, Tool, framework_adapter
from slim_agents._agent import ERROR
from slim_agents._plugins import make_plugin_manager
from slim_agents_plugins.openai_agents import (
    openai_agents_handler,
    to_openai_agents,
    to_openai_agents_tools,
)
from tests.helpers import unique

pytestmark = pytest.mark.anyio
SECRET = "openai-agents-test-secret-that-is-long-enough-01"
# Nothing may try to export traces (there is no API key).
NO_TRACING = RunConfig(tracing_disabled=True)


@pytest.fixture
def anyio_backend() -> str:
    # The SDK runs on asyncio itself (asyncio tasks and loops), so no trio here.
    return "asyncio"


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


# -- a scripted model ----------------------------------------------------------------------


class ScriptedModel(Model):
    """Calls the scripted tools one turn each, then says ``reply(tool outputs, user text)``."""

    def __init__(self, calls: list[tuple[str, dict[str, Any]]] | None = None,
                 reply: Callable[[list[str], str], str] | None = None) -> None:
        self.calls = list(calls or [])
        self.reply = reply or (lambda outputs, text: "answer: " + " | ".join(outputs))
        self.turns = 0
        self.outputs: list[str] = []
        self.schemas: dict[str, dict[str, Any]] = {}

    async def get_response(self, system_instructions: str | None, input: Any,
                           model_settings: Any, tools: Any, output_schema: Any, handoffs: Any,
                           tracing: Any, *, previous_response_id: str | None,
                           conversation_id: str | None, prompt: Any) -> ModelResponse:
        self.schemas = {t.name: t.params_json_schema for t in tools
                        if isinstance(t, FunctionTool)}
        items = [{"role": "user", "content": input}] if isinstance(input, str) else input
        text = next(i["content"] for i in items if isinstance(i, dict) and i.get("role") == "user")
        self.outputs = [str(i["output"]) for i in items
                        if isinstance(i, dict) and i.get("type") == "function_call_output"]
        self.turns += 1
        if self.turns <= len(self.calls):
            name, args = self.calls[self.turns - 1]
            call = ResponseFunctionToolCall(
                type="function_call", id=f"fc-{self.turns}", call_id=f"call-{self.turns}",
                name=name, arguments=json.dumps(args), status="completed")
            return ModelResponse(output=[call], usage=Usage(), response_id=None)
        message = ResponseOutputMessage(
            type="message", id=f"msg-{self.turns}", role="assistant", status="completed",
            content=[ResponseOutputText(type="output_text", text=self.reply(self.outputs, text),
                                        annotations=[], logprobs=[])])
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the scripted model does not stream")


def sdk_agent(model: ScriptedModel, tools: list[FunctionTool] | None = None,
              **kwargs: Any) -> OpenAIAgent[Any]:
    return OpenAIAgent(name="assistant", instructions="Use the tools.", model=model,
                       tools=list(tools or []), **kwargs)


# -- slim agents ---------------------------------------------------------------------------


class Named(TypedDict):
    """Something with a name.

    :param name: what it is called
    """

    name: str


class Item(Named, total=False):
    """Something to label.

    :param count: how many
    """

    count: int


def calc_agent(name: str) -> Agent:
    calc = Agent(name, description="arithmetic", plugins=make_plugin_manager(allow=False))

    @calc.tool
    async def add(a: int, b: int = 1) -> int:
        """Add two numbers.

        :param a: the first
        :param b: the second
        """
        return a + b

    @calc.tool
    async def label(item: Item, prefix: str = ">") -> str:
        """Label an item.

        :param item: the item
        :param prefix: what goes first
        """
        return f"{prefix} {item['name']} x{item.get('count', 1)}"

    @calc.tool
    async def divide(a: int, b: int) -> float:
        """Divide.

        :param a: the dividend
        :param b: the divisor
        """
        return a / b

    return calc


def echo_agent(name: str) -> Agent:
    echo = Agent(name, description="shouts back", plugins=make_plugin_manager(allow=False))

    @echo.on_message
    async def shout(msg: Message, session: Session) -> str:
        return msg.payload.decode().upper()

    return echo


def boss_agent(name: str) -> Agent:
    return Agent(name, plugins=make_plugin_manager(allow=False))


# -- tests ---------------------------------------------------------------------------------


def test_the_plugin_offers_this_module() -> None:
    pm = make_plugin_manager(allow={"openai_agents"})
    assert framework_adapter("openai_agents", pm) is adapter


async def test_an_sdk_agent_calls_another_agents_tool_over_the_node(node: Node) -> None:
    ns = unique("oa")
    calc_name = f"org/{ns}/calc"
    async with calc_agent(calc_name).run(node, secret=SECRET) as calc, \
            boss_agent(f"org/{ns}/boss").run(node, secret=SECRET) as boss:
        with anyio.fail_after(15):
            tools = to_openai_agents_tools(await boss.remote_tools(calc_name))
            model = ScriptedModel([("add", {"a": 40, "b": 2})])
            result = await Runner.run(sdk_agent(model, tools), "what is 40 + 2?",
                                      run_config=NO_TRACING)
        assert result.final_output == "answer: 42"
        assert calc.handled == 2  # describe, then the call: it went to the other agent
        assert {"add", "label", "divide"} <= set(model.schemas)


async def test_an_sdk_agent_uses_the_messaging_tools(node: Node) -> None:
    ns = unique("oa")
    echo_name = f"org/{ns}/echo"
    async with echo_agent(echo_name).run(node, secret=SECRET), \
            boss_agent(f"org/{ns}/boss").run(node, secret=SECRET) as boss:
        tools = to_openai_agents_tools(boss.messaging_tools())
        # The timeout is null, as a strict model leaves out an optional argument.
        model = ScriptedModel([("request", {"to": echo_name, "text": "hello", "timeout": None})])
        with anyio.fail_after(15):
            result = await Runner.run(sdk_agent(model, tools), "greet echo",
                                      run_config=NO_TRACING)
        [output] = model.outputs
        answer = json.loads(output)
        assert answer["text"] == "HELLO" and answer["from"].startswith(echo_name)
        assert "HELLO" in result.final_output


async def test_an_sdk_agent_as_a_mailbox_handler(node: Node) -> None:
    ns = unique("oa")
    helper_name = f"org/{ns}/helper"
    helper = Agent(helper_name, plugins=make_plugin_manager(allow=False))
    model = ScriptedModel(reply=lambda outputs, text: f"you asked {text!r}")
    helper.on_message(openai_agents_handler(sdk_agent(model), run_config=NO_TRACING))

    class Answer(BaseModel):
        value: int

    structured = Agent(f"org/{ns}/structured", plugins=make_plugin_manager(allow=False))
    structured.on_message(openai_agents_handler(
        sdk_agent(ScriptedModel(reply=lambda outputs, text: '{"value": 42}'),
                  output_type=Answer), run_config=NO_TRACING))

    async with helper.run(node, secret=SECRET), structured.run(node, secret=SECRET), \
            boss_agent(f"org/{ns}/boss").run(node, secret=SECRET) as boss:
        with anyio.fail_after(15):
            reply = await boss.request(helper_name, "question")
            assert reply.payload == b"you asked 'question'"
            assert reply.context.source_name.without_id() == helper.name
            # Structured output comes back as JSON.
            reply = await boss.request(f"org/{ns}/structured", "the answer?")
            assert json.loads(reply.payload) == {"value": 42}


async def test_a_failed_run_answers_the_sender_with_an_error(node: Node) -> None:
    ns = unique("oa")
    stuck_name = f"org/{ns}/stuck"
    stuck = Agent(stuck_name, plugins=make_plugin_manager(allow=False))
    # The model calls a tool forever: the run ends with MaxTurnsExceeded.
    calls: list[tuple[str, dict[str, Any]]] = [("noop", {})] * 5

    async def noop() -> str:
        return "ok"

    tool = Tool("noop", "does nothing", {"type": "object", "properties": {}}, noop)
    stuck.on_message(openai_agents_handler(
        sdk_agent(ScriptedModel(calls), [to_openai_agents(tool)]), run_config=NO_TRACING,
        max_turns=2))
    async with stuck.run(node, secret=SECRET) as s, \
            boss_agent(f"org/{ns}/boss").run(node, secret=SECRET) as boss:
        with anyio.fail_after(15):
            reply = await boss.request(stuck_name, "loop")
        assert reply.context.payload_type == ERROR
        error = json.loads(reply.payload)["error"]
        assert error["code"] == "handler_failed" and "MaxTurnsExceeded" in error["message"]
        assert s.failures == 1


async def test_errors_reach_the_model_as_results(node: Node) -> None:
    ns = unique("oa")
    calc_name = f"org/{ns}/calc"
    async with calc_agent(calc_name).run(node, secret=SECRET), \
            boss_agent(f"org/{ns}/boss").run(node, secret=SECRET) as boss:
        with anyio.fail_after(15):
            tools = to_openai_agents_tools(await boss.remote_tools(calc_name))
            model = ScriptedModel([
                ("divide", {"a": 1, "b": 0}),          # fails on the other agent
                ("add", {"a": "one", "b": None}),      # a bad argument
                ("add", {"a": 41, "b": None}),         # null: the default applies
            ])
            result = await Runner.run(sdk_agent(model, tools), "try", run_config=NO_TRACING)
        failed, bad, fine = model.outputs
        assert json.loads(failed)["error"]["code"] == "failed"
        assert "ZeroDivisionError" in json.loads(failed)["error"]["message"]
        assert json.loads(bad)["error"]["code"] == "bad_arguments"
        assert "arguments.a" in json.loads(bad)["error"]["message"]
        assert fine == "42"
        assert result.final_output.endswith("| 42")


async def test_the_strict_schema_makes_optional_arguments_nullable(node: Node) -> None:
    ns = unique("oa")
    calc_name = f"org/{ns}/calc"
    async with calc_agent(calc_name).run(node, secret=SECRET), \
            boss_agent(f"org/{ns}/boss").run(node, secret=SECRET) as boss:
        with anyio.fail_after(15):
            remote = {t.name: t for t in await boss.remote_tools(calc_name)}
            add, label = to_openai_agents(remote["add"]), to_openai_agents(remote["label"])
            assert add.strict_json_schema
            schema = add.params_json_schema
            assert schema["required"] == ["a", "b"] and schema["additionalProperties"] is False
            assert schema["properties"]["b"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
            assert '"default":' not in json.dumps(schema)
            assert "null for the default, 1" in schema["properties"]["b"]["description"]
            # Nested objects too: every field required, optional ones nullable.
            item = label.params_json_schema["properties"]["item"]
            assert item["required"] == ["name", "count"]
            assert {"type": "null"} in item["properties"]["count"]["anyOf"]

            model = ScriptedModel([("label", {"item": {"name": "apple", "count": None},
                                              "prefix": None}),
                                   ("label", {"item": {"name": "pear", "count": 3},
                                              "prefix": "#"})])
            await Runner.run(sdk_agent(model, [label]), "label", run_config=NO_TRACING)
        assert model.outputs == ["> apple x1", "# pear x3"]


async def test_schemas_strict_mode_cannot_express_stay_as_they_are() -> None:
    async def anything(value: Any = None, options: dict[str, int] | None = None) -> str:
        return json.dumps([value, options])

    tool = Tool("anything", "takes anything", {
        "type": "object", "additionalProperties": False, "required": [],
        "properties": {"value": {"description": "any value"},
                       "options": {"anyOf": [{"type": "object",
                                              "additionalProperties": {"type": "integer"}},
                                             {"type": "null"}],
                                   "description": "named numbers"}}}, anything)
    for converted in (to_openai_agents(tool), to_openai_agents(tool, strict=False)):
        assert not converted.strict_json_schema
        assert converted.params_json_schema == tool.parameters
    ctx: Any = None  # the invoker does not use the SDK's context
    invoke = to_openai_agents(tool).on_invoke_tool
    assert await invoke(ctx, '{"value": null, "options": {"a": 1}}') == '[null, {"a": 1}]'
    assert json.loads(await invoke(ctx, "not json"))["error"]["code"] == "bad_arguments"
    assert json.loads(await invoke(ctx, "[1]"))["error"]["code"] == "bad_arguments"
    deep = "[" * 5000 + "]" * 5000  # past the JSON decoder's nesting limit
    assert json.loads(await invoke(ctx, deep))["error"]["code"] == "bad_arguments"
    assert await invoke(ctx, "") == "[null, null]"
