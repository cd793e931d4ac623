"""LangChain / LangGraph adapter: LangGraph agents calling slim agents' tools over a
real node, a graph as a slim agent's mailbox handler, errors, and the way back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, ToolException
from langchain_core.tools import tool as lc_tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import Field

import slim_agents_plugins.langchain as adapter
from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, Message, Session, Tool, ToolError, framework_adapter
from slim_agents._plugins import make_plugin_manager
from slim_agents_plugins.langchain import (
    from_langchain,
    langgraph_handler,
    to_langchain,
    to_langchain_tools,
)
from tests.helpers import unique

pytestmark = pytest.mark.anyio
SECRET = "langchain-test-secret-that-is-long-enough-0123"


@pytest.fixture
def anyio_backend() -> str:
    # LangChain runs tools and graphs with asyncio tasks (asyncio.create_task,
    # asyncio.gather): on trio they fail with "no running event loop".
    return "asyncio"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


def agent(prefix: str, description: str = "") -> Agent:
    return Agent(f"org/ns/{unique(prefix)}", description=description,
                 plugins=make_plugin_manager(allow=False))


# -- a scripted chat model: no network, no key ---------------------------------------------

Step = Callable[[list[BaseMessage]], AIMessage]


class ScriptedChatModel(BaseChatModel):
    """Plays ``steps`` in order; each sees the conversation and returns the AI message."""

    steps: list[Step]
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        self.bound = [t.name for t in tools]
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        if len(self.seen) > len(self.steps):
            raise AssertionError(f"the model was called {len(self.seen)} times")
        message = self.steps[len(self.seen) - 1](messages)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        return self._generate(messages, stop)


def call(*calls: tuple[str, dict[str, Any]]) -> Step:
    """A step that asks for tool calls."""
    return lambda _: AIMessage("", tool_calls=[
        {"name": name, "args": args, "id": f"call-{i}", "type": "tool_call"}
        for i, (name, args) in enumerate(calls)])


def answer(f: Callable[[list[BaseMessage]], str]) -> Step:
    """A final answer made from the conversation."""
    return lambda messages: AIMessage(f(messages))


def tool_results(messages: Sequence[BaseMessage]) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage)]


def react_graph(model: ScriptedChatModel, tools: Sequence[BaseTool],
                checkpointer: InMemorySaver | None = None) -> Any:
    # By hand: create_react_agent is deprecated in LangGraph 1.x.
    bound = model.bind_tools(tools)

    async def call_model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [await bound.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("model", call_model)
    g.add_node("tools", ToolNode(tools))
    g.add_edge(START, "model")
    g.add_conditional_edges("model", tools_condition)
    g.add_edge("tools", "model")
    return g.compile(checkpointer=checkpointer)


def calculator(calls: list[tuple[int, int]]) -> Agent:
    calc = agent("calc", "adds numbers")

    @calc.tool
    async def add(a: int, b: int) -> int:
        """Add two integers.

        :param a: the first number
        :param b: the second number
        """
        calls.append((a, b))
        return a + b

    @calc.tool
    async def fail() -> str:
        """Always fails."""
        raise RuntimeError("kaput")

    return calc


# -- tests ---------------------------------------------------------------------------------


def test_the_plugin_offers_this_module() -> None:
    pm = make_plugin_manager(allow={"langchain"})
    assert framework_adapter("langchain", pm) is adapter


async def test_a_langgraph_agent_calls_another_agents_tool_over_the_node(node: Node) -> None:
    calls: list[tuple[int, int]] = []
    calc = calculator(calls)
    user = agent("user")
    model = ScriptedChatModel(steps=[
        call(("add", {"a": 2, "b": 40})),
        answer(lambda ms: f"the sum is {tool_results(ms)[-1].content}")])
    async with calc.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            tools = to_langchain_tools(await u.remote_tools(calc.name))
            graph = react_graph(model, tools)
            out = await graph.ainvoke({"messages": [HumanMessage("what is 2 + 40?")]})
    assert calls == [(2, 40)]  # the other agent ran it
    assert out["messages"][-1].content == "the sum is 42"
    assert sorted(model.bound) == ["add", "fail"]
    [result] = tool_results(model.seen[1])
    assert (result.content, result.tool_call_id, result.status) == ("42", "call-0", "success")
    add = next(t for t in tools if t.name == "add")
    assert add.args_schema["required"] == ["a", "b"]
    assert add.description == "Add two integers."


async def test_a_langgraph_agent_requests_through_the_messaging_tools(node: Node) -> None:
    echo = agent("echo")
    user = agent("user")

    @echo.on_message
    async def on_message(msg: Message, session: Session) -> str:
        return f"echo: {msg.payload.decode()}"

    model = ScriptedChatModel(steps=[
        call(("request", {"to": str(echo.name), "text": "hello", "timeout": 5})),
        answer(lambda ms: json.loads(str(tool_results(ms)[-1].content))["text"])])
    async with echo.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        tools = to_langchain_tools(u.messaging_tools())
        with anyio.fail_after(10):
            out = await react_graph(model, tools).ainvoke(
                {"messages": [HumanMessage("say hello to echo")]})
    assert out["messages"][-1].content == "echo: hello"
    assert {"request", "send_message", "read_mailbox"} <= set(model.bound)
    [result] = tool_results(model.seen[1])
    assert json.loads(str(result.content))["from"].startswith(str(echo.name))


async def test_a_langgraph_graph_answers_an_agents_mailbox(node: Node) -> None:
    model = ScriptedChatModel(steps=[
        answer(lambda ms: f"you asked {ms[-1].content!r}"),
        answer(lambda ms: f"{len(ms)} messages so far")])
    graph = react_graph(model, [], checkpointer=InMemorySaver())
    assistant = agent("assistant")
    assistant.on_message(langgraph_handler(graph))
    user = agent("user")
    async with assistant.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            first = await u.request(assistant.name, "question")
            second = await u.request(assistant.name, "and again?")
            session = await u.session_with(assistant.name)
    assert first.payload == b"you asked 'question'"
    assert first.context.payload_type != "slim-agents/error"
    # The same session is one thread: the second run saw the first exchange.
    assert second.payload == b"3 messages so far"
    state = await graph.aget_state({"configurable": {"thread_id": str(session.id)}})
    assert [m.content for m in state.values["messages"]][::2] == ["question", "and again?"]


async def test_the_handler_config_and_thread_id(node: Node) -> None:
    async def echo_config(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
        c = config["configurable"]
        return {"messages": [AIMessage(f"{c['thread_id']} {c['user']}")]}

    g = StateGraph(MessagesState)
    g.add_node("echo_config", echo_config)
    g.add_edge(START, "echo_config")
    assistant = agent("assistant")
    assistant.on_message(langgraph_handler(
        g.compile(), config={"configurable": {"user": "ann"}},
        thread_id=lambda msg, session: f"peer-{msg.context.source_name.app}"))
    user = agent("user")
    async with assistant.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            reply = await u.request(assistant.name, "question")
    assert reply.payload.decode() == f"peer-{user.name.app} ann"


async def test_a_graph_without_an_answer_sends_back_an_error(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    async def no_ai(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": []}

    g = StateGraph(MessagesState)
    g.add_node("noop", no_ai)
    g.add_edge(START, "noop")
    assistant = agent("assistant")
    assistant.on_message(langgraph_handler(g.compile()))
    user = agent("user")
    async with assistant.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            reply = await u.request(assistant.name, "question")
    assert reply.context.payload_type == "slim-agents/error"
    assert "without an AI message" in json.loads(reply.payload)["error"]["message"]
    assert "message handler failed" in caplog.text


async def test_failing_slim_tools_reach_the_model_as_error_results(node: Node) -> None:
    calc = calculator([])
    user = agent("user")
    model = ScriptedChatModel(steps=[
        call(("fail", {}), ("add", {"a": "two", "b": 1})),
        answer(lambda ms: " | ".join(str(m.content) for m in tool_results(ms)))])
    async with calc.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            graph = react_graph(model, to_langchain_tools(await u.remote_tools(calc.name)))
            out = await graph.ainvoke({"messages": [HumanMessage("go")]})
    errors = {m.tool_call_id: json.loads(str(m.content))["error"]
              for m in tool_results(model.seen[1])}
    assert errors["call-0"]["code"] == "failed"
    assert "kaput" in errors["call-0"]["message"]
    assert errors["call-1"]["code"] == "bad_arguments"
    assert "kaput" in out["messages"][-1].content


async def test_to_langchain_reports_errors_as_content() -> None:
    async def divide(a: int, b: int) -> float:
        if b == 0:
            raise ToolError("division by zero", code="bad_arguments", tool="divide")
        return a / b

    t = Tool("divide", "Divide a by b.", {
        "type": "object", "required": ["a", "b"], "additionalProperties": False,
        "properties": {"a": {"type": "integer", "description": "a"},
                       "b": {"type": "integer", "description": "b"}}}, divide)
    lc = to_langchain(t)
    assert await lc.ainvoke({"a": 6, "b": 3}) == "2.0"
    err = json.loads(await lc.ainvoke({"a": 1, "b": 0}))["error"]
    assert err == {"code": "bad_arguments", "message": "division by zero", "tool": "divide"}
    assert json.loads(await lc.ainvoke({"a": 1}))["error"]["code"] == "bad_arguments"
    message = await lc.ainvoke({"type": "tool_call", "id": "c1", "name": "divide",
                                "args": {"a": 1, "b": 0}})
    assert isinstance(message, ToolMessage) and "division by zero" in str(message.content)


async def test_from_langchain_round_trip(node: Node) -> None:
    @lc_tool
    async def greet(name: str, times: int = 1) -> str:
        """Greet someone.

        Args:
            name: who to greet
            times: how many times
        """
        return " ".join([f"hello {name}"] * times)

    @lc_tool
    async def broken() -> str:
        """Always fails."""
        raise ToolException("no luck")

    t = from_langchain(greet)
    assert (t.name, t.description) == ("greet", greet.description)
    assert t.parameters["required"] == ["name"]
    assert "$ref" not in json.dumps(t.parameters)
    assert await t({"name": "ann", "times": 2}) == "hello ann hello ann"
    assert (await from_langchain(broken).run())["error"] == {
        "code": "failed", "message": "no luck", "tool": "broken"}

    # Served by one slim agent and called by another through the node.
    host = agent("host")
    host.add_tool(t)
    user = agent("user")
    async with host.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
        with anyio.fail_after(10):
            assert await u.call(host.name, "greet", name="bob") == "hello bob"
            [remote] = await u.remote_tools(host.name)
            # slim -> LangChain -> slim keeps the schema and the behaviour.
            back = from_langchain(to_langchain(remote))
            assert back.parameters == remote.parameters
            assert back.description == remote.description
            assert await back({"name": "cy", "times": 2}) == "hello cy hello cy"
