"""LangChain and LangGraph adapter: slim tools as LangChain tools and back, and a
LangGraph graph as an agent's mailbox handler.

LangChain runs tools and graphs with asyncio tasks, so everything here that
awaits LangChain (tools made by :func:`to_langchain`, those made by
:func:`from_langchain`, :func:`langgraph_handler`) works on the asyncio
backend only; there is no bridge to trio.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ValidationError

from slim_agents import Message, Session, Tool, ToolError

__all__ = ["from_langchain", "langgraph_handler", "to_langchain", "to_langchain_tools"]

MessageHandler = Callable[[Message, Session], Awaitable[str | bytes | None]]


class Graph(Protocol):
    """What :func:`langgraph_handler` needs of a graph (a compiled LangGraph, or any Runnable)."""

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None) -> Any: ...


def _content(result: Any) -> str:
    # A string is the tool message as is; anything else is JSON, as LangChain would
    # render it, but without failing on bytes or other non-JSON values.
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return str(value)


def to_langchain(tool: Tool) -> StructuredTool:
    """The slim tool as a LangChain tool (async only).

    Its JSON Schema is the tool's parameters; a failure comes back as the
    JSON ``{"error": {...}}`` content the model reads, not as an exception.
    """
    async def run(**kwargs: Any) -> str:
        return _content(await tool.run(kwargs))

    return StructuredTool(name=tool.name, description=tool.description,
                          args_schema=dict(tool.parameters), coroutine=run)


def to_langchain_tools(tools: Iterable[Tool]) -> list[StructuredTool]:
    """Several slim tools as LangChain tools (see :func:`to_langchain`)."""
    return [to_langchain(t) for t in tools]


def from_langchain(base_tool: BaseTool) -> Tool:
    """A LangChain tool as a slim tool, run with ``ainvoke``.

    The parameters are the schema LangChain shows a model (injected
    arguments left out, ``$ref`` resolved). A ``ToolException`` or a
    validation error becomes a :class:`ToolError`.
    """
    spec = convert_to_openai_tool(base_tool)["function"]
    name = base_tool.name

    async def run(**kwargs: Any) -> Any:
        try:
            result = await base_tool.ainvoke(kwargs)
        except ToolException as exc:
            raise ToolError(str(exc), code="failed", tool=name) from exc
        except ValidationError as exc:
            raise ToolError(str(exc), code="bad_arguments", tool=name) from exc
        # Results travel as JSON between agents: a model instance becomes its fields.
        return result.model_dump(mode="json") if isinstance(result, BaseModel) else result

    parameters = spec.get("parameters") or {"type": "object", "properties": {}}
    return Tool(name=name, description=base_tool.description or spec.get("description") or name,
                parameters=parameters, func=run)


def _last_ai_text(output: Any) -> str:
    messages = output.get("messages", []) if isinstance(output, Mapping) else []
    for m in reversed(messages):
        if isinstance(m, AIMessage):
            return str(m.text)
    raise RuntimeError("the graph ended without an AI message")


def langgraph_handler(graph: Graph, *, config: RunnableConfig | None = None,
                      thread_id: Callable[[Message, Session], str] | None = None
                      ) -> MessageHandler:
    """A mailbox handler (for ``@agent.on_message``) that answers with a LangGraph graph.

    Each message is the graph's input as ``{"messages": [HumanMessage(text)]}``;
    the reply is the text of the last AI message in its output. The thread
    id is the slim session's id unless ``thread_id`` says otherwise, so a
    checkpointer keeps one conversation per session.

    :param config: a base run config (recursion limit, callbacks, more
        ``configurable`` keys); the thread id is added to it.
    """
    base = config or RunnableConfig()

    async def handle(msg: Message, session: Session) -> str:
        tid = thread_id(msg, session) if thread_id is not None else str(session.id)
        run_config: RunnableConfig = {**base, "configurable": {
            **base.get("configurable", {}), "thread_id": tid}}
        text = msg.payload.decode(errors="replace")
        output = await graph.ainvoke({"messages": [HumanMessage(text)]}, config=run_config)
        return _last_ai_text(output)

    return handle
