"""The pydantic-ai adapter: real pydantic-ai agents with scripted models, through a real node."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pydantic_ai
import pytest
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

import slim_agents_plugins.pydantic_ai as adapter
from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, Message, Session, Tool, framework_adapter
from slim_agents._plugins import make_plugin_manager
from slim_agents_plugins.pydantic_ai import (
    pydantic_ai_handler,
    slim_toolset,
    to_pydantic_ai,
    toolset,
)
from tests.helpers import unique

pytestmark = pytest.mark.anyio
SECRET = "pydantic-ai-test-secret-that-is-long-enough-0123"


@pytest.fixture
def anyio_backend() -> str:
    # pydantic-ai runs agents on asyncio only (Agent.run creates asyncio tasks).
    return "asyncio"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


def slim_agent(prefix: str, description: str = "") -> tuple[str, Agent]:
    name = f"org/ns/{unique(prefix)}"
    return name, Agent(name, description=description, plugins=make_plugin_manager(allow=False))


def calculator() -> tuple[str, Agent]:
    name, agent = slim_agent("calc", "adds numbers")

    @agent.tool
    async def add(a: int, b: int) -> int:
        """Add two integers.

        :param a: the first number
        :param b: the second number
        """
        return a + b

    @agent.tool
    async def fail() -> str:
        """Always fails."""
        raise RuntimeError("kaput")

    return name, agent


def echo() -> tuple[str, Agent]:
    name, agent = slim_agent("echo")

    @agent.on_message
    async def answer(msg: Message, session: Session) -> str:
        return "echo: " + msg.payload.decode()

    return name, agent


@dataclass
class Script:
    """A model that calls one tool, then answers with what the tool returned."""

    tool: str
    args: dict[str, Any]
    seen: list[Any]
    tools: list[list[str]]

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.tools.append([t.name for t in info.function_tools])
        returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
        if returns:
            self.seen.append(returns[0].content)
            return ModelResponse(parts=[TextPart(f"the tool said {returns[0].model_response_str()}")])
        return ModelResponse(parts=[ToolCallPart(self.tool, self.args)])


def scripted(tool: str, **args: Any) -> Script:
    return Script(tool, args, [], [])


def last_prompt(messages: list[ModelMessage]) -> str:
    request = messages[-1]
    assert isinstance(request, ModelRequest)
    return next(str(p.content) for p in request.parts if isinstance(p, UserPromptPart))


async def test_the_adapter_is_found_by_framework_name() -> None:
    pm = make_plugin_manager(allow={"pydantic_ai"})
    assert framework_adapter("pydantic_ai", pm) is adapter
    # The module's own name is the framework's: it must reach the framework, not itself.
    assert adapter.pydantic_ai is pydantic_ai
    assert adapter.pydantic_ai.Agent is pydantic_ai.Agent


async def test_a_tool_keeps_its_name_description_and_schema() -> None:
    async def greet(who: str) -> str:
        return f"hello {who}"

    params = {"type": "object", "additionalProperties": False, "required": ["who"],
              "properties": {"who": {"type": "string", "description": "whom to greet"}}}
    t = Tool("greet", "Greets someone.", params, greet, returns={"type": "string"})
    d = to_pydantic_ai(t).tool_def
    assert (d.name, d.description, d.parameters_json_schema) == ("greet", "Greets someone.", params)
    assert d.return_schema == {"type": "string"}
    assert d.parameters_json_schema is not params  # a copy: the framework may rewrite it


async def test_a_model_calls_another_agents_tool_over_the_node(node: Node) -> None:
    calc_name, calc = calculator()
    _, user = slim_agent("user")
    async with calc.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(20):
            tools = await u.remote_tools(calc_name)
            script = scripted("add", a=2, b=40)
            model_agent = pydantic_ai.Agent(FunctionModel(script), toolsets=[toolset(tools)])
            result = await model_agent.run("what is 2 + 40?")
    assert script.seen == [42]  # computed by the calculator agent
    assert result.output == "the tool said 42"
    assert sorted(script.tools[0]) == ["add", "fail"]


async def test_a_model_requests_an_agent_through_the_messaging_tools(node: Node) -> None:
    echo_name, echo_agent = echo()
    _, user = slim_agent("user")
    async with echo_agent.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        script = scripted("request", to=echo_name, text="ping", timeout=10)
        model_agent = pydantic_ai.Agent(FunctionModel(script),
                                        toolsets=[toolset(u.messaging_tools())])
        with anyio.fail_after(20):
            result = await model_agent.run("ask the echo agent")
    assert script.seen == [{"from": script.seen[0]["from"], "text": "echo: ping"}]
    assert script.seen[0]["from"].startswith(echo_name)
    assert "echo: ping" in result.output


async def test_slim_toolset_offers_messaging_and_remote_tools(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    calc_name, calc = calculator()
    _, user = slim_agent("user")
    nobody = f"org/ns/{unique('nobody')}"
    async with calc.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        script = scripted("add", a=1, b=2)
        tools = slim_toolset(u, [calc_name, nobody], timeout=5)
        model_agent = pydantic_ai.Agent(FunctionModel(script), toolsets=[tools])
        with anyio.fail_after(20):
            result = await model_agent.run("add 1 and 2")
    assert result.output == "the tool said 3"
    offered = set(script.tools[0])
    assert {"request", "send_message", "call_tool", "add", "fail"} <= offered
    assert nobody in caplog.text  # the missing agent is left out, and said so


async def test_a_failing_tool_comes_back_to_the_model_as_a_result(node: Node) -> None:
    calc_name, calc = calculator()
    _, user = slim_agent("user")
    async with calc.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(20):
            tools = toolset(await u.remote_tools(calc_name))
            failing = scripted("fail")
            result = await pydantic_ai.Agent(FunctionModel(failing), toolsets=[tools]).run("go")
            bad = scripted("add", a="two", b=40)
            await pydantic_ai.Agent(FunctionModel(bad), toolsets=[tools]).run("go")
    [error] = failing.seen
    assert error["error"]["code"] == "failed" and "kaput" in error["error"]["message"]
    assert "kaput" in result.output  # the run went on to an answer
    [error] = bad.seen
    assert error["error"]["code"] == "bad_arguments"


async def test_a_slow_tool_ends_with_a_timeout_result() -> None:
    async def stall() -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    t = Tool("stall", "Never answers.", {"type": "object", "properties": {}}, stall)
    script = scripted("stall")
    model_agent = pydantic_ai.Agent(FunctionModel(script),
                                    toolsets=[toolset([t], timeout=0.05)])
    with anyio.fail_after(10):
        await model_agent.run("go")
    assert script.seen[0]["error"]["code"] == "timeout"


def answering(prefix: str, prompts: list[list[str]] | None = None
              ) -> Callable[[list[ModelMessage], AgentInfo], ModelResponse]:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if prompts is not None:
            prompts.append([str(p.content) for m in messages for p in m.parts
                            if isinstance(p, UserPromptPart)])
        return ModelResponse(parts=[TextPart(f"{prefix} {last_prompt(messages)}")])

    return model


async def test_a_pydantic_ai_agent_answers_requests_as_a_slim_agent(node: Node) -> None:
    helper_name, helper = slim_agent("helper")
    helper.on_message(pydantic_ai_handler(pydantic_ai.Agent(FunctionModel(answering("re:")))))
    _, user = slim_agent("user")
    async with helper.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(20):
            answer = await u.request(helper_name, "question")
    assert answer.payload == b"re: question"


@dataclass
class Verdict:
    answer: str
    confidence: int


async def test_structured_output_is_replied_as_json(node: Node) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        [out] = info.output_tools
        return ModelResponse(parts=[ToolCallPart(
            out.name, {"answer": last_prompt(messages).upper(), "confidence": 9})])

    helper_name, helper = slim_agent("helper")
    pa = pydantic_ai.Agent(FunctionModel(model), output_type=Verdict)
    helper.on_message(pydantic_ai_handler(pa))
    _, user = slim_agent("user")
    async with helper.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(20):
            answer = await u.request(helper_name, "yes?")
    assert json.loads(answer.payload) == {"answer": "YES?", "confidence": 9}


async def test_history_is_kept_per_conversation_and_bounded(node: Node) -> None:
    prompts: list[list[str]] = []
    helper_name, helper = slim_agent("helper")
    pa = pydantic_ai.Agent(FunctionModel(answering("ok", prompts)))
    helper.on_message(pydantic_ai_handler(pa, history=2))
    _, alice = slim_agent("alice")
    _, bob = slim_agent("bob")
    async with helper.run(node, secret=SECRET), alice.run(node, secret=SECRET) as a, \
            bob.run(node, secret=SECRET) as b:
        with anyio.fail_after(20):
            for text in ("one", "two", "three", "four"):
                assert (await a.request(helper_name, text)).payload == f"ok {text}".encode()
            assert (await b.request(helper_name, "hi")).payload == b"ok hi"
    # Two past exchanges go with each prompt; bob's conversation is his own.
    assert prompts == [["one"], ["one", "two"], ["one", "two", "three"],
                       ["two", "three", "four"], ["hi"]]


async def test_a_failing_run_is_answered_with_an_error(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise RuntimeError("the model is down")

    helper_name, helper = slim_agent("helper")
    helper.on_message(pydantic_ai_handler(pydantic_ai.Agent(FunctionModel(broken))))
    _, user = slim_agent("user")
    async with helper.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(20):
            answer = await u.request(helper_name, "question")
    error = json.loads(answer.payload)["error"]
    assert error["code"] == "handler_failed" and "the model is down" in error["message"]
    assert "message handler failed" in caplog.text
