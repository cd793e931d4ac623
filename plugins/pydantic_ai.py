# The pydantic-ai adapter: slim tools as pydantic-ai tools and toolsets, and a
# pydantic-ai agent as a slim agent's message handler.
#
# pydantic-ai runs agents on asyncio only (it creates asyncio tasks), so
# everything here needs a node and agents running on the asyncio backend.
# This module is slim_agents_plugins.pydantic_ai; the absolute imports below
# reach the framework's top-level package, never this module.
from __future__ import annotations

import copy
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import pydantic_ai
import pydantic_core
from pydantic_ai import RunContext
from pydantic_ai.messages import ModelMessage
from pydantic_ai.toolsets import AbstractToolset, DynamicToolset, FunctionToolset

from slim_agents import Message, Name, RunningAgent, Session, SlimError, Tool, ToolError

log = logging.getLogger("slim_agents_plugins.pydantic_ai")

__all__ = ["pydantic_ai_handler", "slim_toolset", "to_pydantic_ai", "toolset"]

# How long slim_toolset waits for a remote agent's description or a call's result.
DEFAULT_TIMEOUT = 60.0

Handler = Callable[[Message, Session], Awaitable[str | bytes]]


def to_pydantic_ai(tool: Tool, *, timeout: float | None = None) -> pydantic_ai.Tool[Any]:
    """The slim tool as a pydantic-ai tool with the same name, description and schema.

    A failure comes back to the model as the ``{"error": {...}}`` result, so
    the run goes on. With ``timeout``, a call that takes longer ends with a
    ``timeout`` error result.
    """
    async def call(**arguments: Any) -> Any:
        if timeout is None:
            return await tool.run(arguments)
        with anyio.move_on_after(timeout):
            return await tool.run(arguments)
        return ToolError(f"no answer in {timeout:g} s", code="timeout",
                         tool=tool.name).to_result()

    # pydantic-ai skips schema validation for such a tool: Tool.run checks the arguments.
    result: pydantic_ai.Tool[Any] = pydantic_ai.Tool.from_schema(
        call, name=tool.name, description=tool.description,
        json_schema=copy.deepcopy(dict(tool.parameters)))
    if tool.returns is not None:
        # Sent to the model only when return schemas are asked for.
        result.function_schema.return_schema = copy.deepcopy(dict(tool.returns))
    return result


def toolset(tools: Iterable[Tool], *, timeout: float | None = None,
            id: str | None = None) -> FunctionToolset[Any]:
    """The slim tools as a pydantic-ai function toolset (see :func:`to_pydantic_ai`).

    :raises pydantic_ai.UserError: when two tools share a name.
    """
    return FunctionToolset([to_pydantic_ai(t, timeout=timeout) for t in tools], id=id)


def slim_toolset(running: RunningAgent, targets: Iterable[Name | str] = (), *,
                 messaging: bool = True, timeout: float = DEFAULT_TIMEOUT,
                 id: str | None = None) -> DynamicToolset[Any]:
    """A toolset of a running agent: its messaging tools and the tools of ``targets``.

    The remote tools are fetched at the start of each run, so a run sees
    what the targets offer then. A target that does not answer within
    ``timeout`` is left out (logged), and so is a remote tool whose name is
    already taken; the model still reaches both through ``call_tool``.
    Calls to remote tools end with a ``timeout`` error result after ``timeout``.
    """
    wanted = list(targets)

    async def build(ctx: RunContext[Any]) -> FunctionToolset[Any]:
        tools: dict[str, pydantic_ai.Tool[Any]] = {}
        if messaging:
            tools.update((t.name, to_pydantic_ai(t)) for t in running.messaging_tools())
        for target in wanted:
            try:
                with anyio.fail_after(timeout):
                    remote = await running.remote_tools(target)
            except (SlimError, TimeoutError) as exc:
                log.warning("%s: the tools of %s are left out: %s", running.name, target, exc)
                continue
            for t in remote:
                if t.name in tools:
                    log.warning("%s: tool %s of %s is left out: the name is taken",
                                running.name, t.name, target)
                    continue
                tools[t.name] = to_pydantic_ai(t, timeout=timeout)
        return FunctionToolset(list(tools.values()))

    return DynamicToolset(build, per_run_step=False, id=id)


def pydantic_ai_handler(agent: pydantic_ai.Agent[Any, Any], *, history: int = 0,
                        conversations: int = 100, deps: Any = None,
                        toolsets: Sequence[AbstractToolset[Any]] | None = None
                        ) -> Handler:
    """A slim message handler that answers each message with a run of ``agent``.

    The message text is the prompt; the reply is the output (a string as
    is, anything else as JSON). With ``history`` > 0 the last ``history``
    exchanges with each sender in each session go with the prompt, for at
    most ``conversations`` conversations (the least recent is forgotten),
    and runs in one conversation take turns.
    """
    if history < 0 or conversations < 1:
        raise ValueError("history must be >= 0 and conversations >= 1")
    # Whole runs are kept, so a tool call is never separated from its result.
    kept: OrderedDict[tuple[int, str], tuple[anyio.Lock, deque[list[ModelMessage]]]] = \
        OrderedDict()

    async def handle(msg: Message, session: Session) -> str | bytes:
        prompt = msg.payload.decode(errors="replace")
        if history == 0:
            result = await agent.run(prompt, deps=deps, toolsets=toolsets)
            return _reply(result.output)
        key = (session.id, str(msg.context.source_name))
        entry = kept.get(key)
        if entry is None:
            entry = kept[key] = (anyio.Lock(), deque(maxlen=history))
            while len(kept) > conversations:
                kept.popitem(last=False)
        kept.move_to_end(key)
        lock, runs = entry
        async with lock:
            past = [m for run in runs for m in run]
            result = await agent.run(prompt, message_history=past, deps=deps,
                                     toolsets=toolsets)
            runs.append(result.new_messages())
        return _reply(result.output)

    return handle


def _reply(output: Any) -> str | bytes:
    if isinstance(output, str):
        return output
    return pydantic_core.to_json(output)
