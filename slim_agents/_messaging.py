# The built-in messaging tools: an agent's sessions, groups and mailbox as
# tools a model calls. Each is bound to one running agent (the hidden
# context no schema shows). Failures come back as ToolError with a code a
# model can act on: no_route, timeout, not_member, not_found, ...
from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from node_lite import SlimError

from ._tools import Tool, ToolError, tool_from_function

if TYPE_CHECKING:
    from ._agent import RunningAgent
    from ._reports import Message

# How long a tool waits for an answer unless the model says otherwise.
DEFAULT_WAIT = 30.0
# The longest wait a model may ask for.
MAX_WAIT = 600.0

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _model_errors(f: F) -> F:
    """Turn library errors into ToolErrors a model can read."""
    @functools.wraps(f)
    async def run(**kwargs: Any) -> Any:
        try:
            return await f(**kwargs)
        except ToolError:
            raise
        except SlimError as exc:
            raise ToolError(str(exc), code=getattr(exc, "code", "failed") or "failed",
                            tool=f.__name__) from exc
        except TimeoutError as exc:  # a tool's own wait ran out
            raise ToolError("no answer in time", code="timeout", tool=f.__name__) from exc
        except ValueError as exc:  # a malformed name, for instance
            raise ToolError(str(exc), code="bad_arguments", tool=f.__name__) from exc

    return run  # type: ignore[return-value]


def _wait(seconds: float) -> float:
    if not 0 < seconds <= MAX_WAIT:
        raise ToolError(f"timeout must be in (0, {MAX_WAIT:g}] seconds", code="bad_arguments")
    return seconds


def _text(payload: bytes) -> str:
    return payload.decode(errors="replace")


def messaging_tools(agent: RunningAgent) -> list[Tool]:
    """The messaging tool set of a running agent."""

    async def discover_agents(prefix: str = "") -> list[dict[str, Any]]:
        """List the agents reachable through the network, with what they offer.

        :param prefix: only names starting with these components, such as "org/ns"
        """
        return [c.summary() for c in await agent.discover(prefix)]

    async def describe_agent(agent_name: str, timeout: float = DEFAULT_WAIT) -> dict[str, Any]:
        """Ask an agent for its description and the full specs of its tools.

        :param agent_name: the agent's name, org/namespace/app
        :param timeout: seconds to wait for the answer
        """
        with anyio.fail_after(_wait(timeout)):
            return await agent.describe(agent_name)

    async def call_tool(agent_name: str, tool: str, arguments: dict[str, Any] | None = None,
                        timeout: float = DEFAULT_WAIT) -> Any:
        """Call a tool of another agent and return its result.

        :param agent_name: the agent offering the tool, org/namespace/app
        :param tool: the tool's name
        :param arguments: the tool's arguments, as its schema describes them
        :param timeout: seconds to wait for the result
        """
        with anyio.fail_after(_wait(timeout)):
            return await agent.call(agent_name, tool, **(arguments or {}))

    async def send_message(to: str, text: str) -> dict[str, Any]:
        """Send a message to another agent's mailbox without waiting for an answer.

        :param to: the recipient, org/namespace/app
        :param text: the message
        """
        await agent.send(to, text)
        return {"sent": True}

    async def request(to: str, text: str, timeout: float = DEFAULT_WAIT) -> dict[str, Any]:
        """Send a message to another agent and wait for its reply.

        :param to: the recipient, org/namespace/app
        :param text: the message
        :param timeout: seconds to wait for the reply
        """
        with anyio.fail_after(_wait(timeout)):
            answer = await agent.request(to, text)
        return {"from": str(answer.context.source_name), "text": _text(answer.payload)}

    async def reply(message_id: int, text: str) -> dict[str, Any]:
        """Answer a message from the mailbox.

        :param message_id: the id read_mailbox or wait_mailbox gave the message
        :param text: the answer
        """
        await agent.reply(message_id, text)
        return {"sent": True}

    async def read_mailbox(limit: int = 20) -> list[dict[str, Any]]:
        """Take the messages waiting in this agent's mailbox (oldest first).

        :param limit: the most messages to take
        """
        return [m.to_dict() for m in await agent.read_mailbox(max(1, min(limit, 1000)))]

    async def wait_mailbox(timeout: float = DEFAULT_WAIT) -> dict[str, Any] | None:
        """Wait for the next message to arrive in the mailbox (null when none came).

        :param timeout: seconds to wait
        """
        with anyio.move_on_after(_wait(timeout)):
            return (await agent.wait_mailbox()).to_dict()
        return None

    async def create_group(channel: str, members: list[str] | None = None) -> dict[str, Any]:
        """Create a group on a channel, with this agent as moderator, and invite members.

        :param channel: the group's channel name, org/namespace/channel
        :param members: agents to invite, org/namespace/app each
        """
        session = await agent.create_group(channel, members)
        return {"channel": channel, "members": [str(p) for p in session.participants]}

    async def invite(channel: str, member: str) -> dict[str, Any]:
        """Invite an agent into a group this agent moderates.

        :param channel: the group's channel
        :param member: the agent to invite, org/namespace/app
        """
        name = await agent.invite(channel, member)
        return {"invited": str(name),
                "members": [str(p) for p in agent.group(channel).participants]}

    async def remove_member(channel: str, member: str) -> dict[str, Any]:
        """Remove an agent from a group this agent moderates.

        :param channel: the group's channel
        :param member: the agent to remove
        """
        await agent.remove(channel, member)
        return {"removed": member}

    async def leave_group(channel: str) -> dict[str, Any]:
        """Leave a group (when the moderator leaves, the group closes).

        :param channel: the group's channel
        """
        await agent.leave(channel)
        return {"left": channel}

    async def list_groups() -> list[dict[str, Any]]:
        """The groups this agent is in, with their members."""
        out = []
        for channel in agent.groups:
            session = agent.group(channel)
            out.append({"channel": str(channel),
                        "moderator": str(session.moderator) if session.moderator else None,
                        "members": [str(p) for p in session.participants]})
        await anyio.lowlevel.checkpoint()
        return out

    async def broadcast(channel: str, text: str) -> dict[str, Any]:
        """Send a message to every member of a group.

        :param channel: the group's channel
        :param text: the message
        """
        await agent.broadcast(channel, text)
        return {"sent": True, "members": len(agent.group(channel).participants) - 1}

    async def gather(channel: str, text: str, count: int | None = None,
                     timeout: float = DEFAULT_WAIT) -> dict[str, Any]:
        """Ask every member of a group and collect their replies.

        :param channel: the group's channel
        :param text: the question
        :param count: replies to wait for (every other member by default)
        :param timeout: seconds to wait; the replies received by then are returned
        """
        got: list[Message] = []
        with anyio.move_on_after(_wait(timeout)):
            async for m in agent.gather(channel, text, count=count):
                got.append(m)
        return {"replies": [{"from": str(m.context.source_name), "text": _text(m.payload)}
                            for m in got]}

    funcs: list[Callable[..., Awaitable[Any]]] = [
        discover_agents, describe_agent, call_tool, send_message, request, reply,
        read_mailbox, wait_mailbox, create_group, invite, remove_member, leave_group,
        list_groups, broadcast, gather]
    tools = []
    for f in funcs:
        t = tool_from_function(f)
        tools.append(Tool(name=t.name, description=t.description, parameters=t.parameters,
                          func=_model_errors(f), returns=t.returns))
    return tools


def tool_specs(tools: list[Tool]) -> str:
    """The tools' public specs as canonical JSON (what the fixture test compares)."""
    return json.dumps([t.to_dict() for t in tools], indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    # Regenerate the published specs: python -m slim_agents._messaging > messaging_tools.json
    print(tool_specs(messaging_tools(None)), end="")  # type: ignore[arg-type]
