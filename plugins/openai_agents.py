# The OpenAI Agents SDK adapter: slim tools as the SDK's FunctionTools, and an
# SDK agent as a slim agent's message handler.
#
# The SDK runs on asyncio only, so both halves need a slim agent on asyncio.
# Tool failures reach the model as JSON error results; they never end its run.
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from agents import Agent as OpenAIAgent
from agents import FunctionTool, RunConfig, Runner
from agents.exceptions import UserError
from agents.run import DEFAULT_MAX_TURNS
from agents.strict_schema import ensure_strict_json_schema
from agents.tool_context import ToolContext

from slim_agents import Message, Session, Tool, ToolError

log = logging.getLogger("slim_agents_plugins.openai_agents")

__all__ = ["openai_agents_handler", "to_openai_agents", "to_openai_agents_tools"]

Handler = Callable[[Message, Session], Awaitable[str]]


def to_openai_agents(tool: Tool, *, strict: bool = True) -> FunctionTool:
    """The slim tool as an OpenAI Agents ``FunctionTool``.

    In strict mode every property becomes required and optional ones accept
    null (meaning: leave it out). A schema strict mode cannot express (an
    open object, an untyped value) makes the tool non-strict instead.
    """
    schema = _strict_schema(tool.parameters) if strict else None
    if strict and schema is None:
        log.info("tool %s: its schema has no strict form; the tool is not strict", tool.name)

    async def invoke(ctx: ToolContext[Any], args_json: str) -> str:
        try:
            args = json.loads(args_json) if args_json.strip() else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            return _encode(_bad_arguments(tool, f"the arguments are not JSON: {exc}"))
        if not isinstance(args, dict):
            return _encode(_bad_arguments(tool, "the arguments must be a JSON object"))
        return _encode(await tool.run(_drop_nulls(tool.parameters, args)))

    return FunctionTool(
        name=tool.name,
        description=tool.description,
        params_json_schema=schema if schema is not None else copy.deepcopy(dict(tool.parameters)),
        on_invoke_tool=invoke,
        strict_json_schema=schema is not None,
    )


def to_openai_agents_tools(tools: Iterable[Tool], *, strict: bool = True) -> list[FunctionTool]:
    """Each slim tool as an OpenAI Agents ``FunctionTool`` (see :func:`to_openai_agents`)."""
    return [to_openai_agents(t, strict=strict) for t in tools]


def openai_agents_handler(agent: OpenAIAgent[Any], *, run_config: RunConfig | None = None,
                          max_turns: int = DEFAULT_MAX_TURNS, context: Any = None) -> Handler:
    """A slim ``on_message`` handler that runs ``agent`` on each message's text.

    The reply is the run's final output: as is when it is a string, else as
    JSON. A failed run goes back to the sender as the agent's handler error.
    """
    async def handle(msg: Message, session: Session) -> str:
        result = await Runner.run(agent, msg.payload.decode(errors="replace"), context=context,
                                  max_turns=max_turns, run_config=run_config)
        output = result.final_output
        return output if isinstance(output, str) else _encode(output)

    return handle


# -- results ----------------------------------------------------------------------------


def _bad_arguments(tool: Tool, message: str) -> dict[str, Any]:
    return ToolError(f"bad arguments for {tool.name}: {message}", code="bad_arguments",
                     tool=tool.name).to_result()


def _encode(value: Any) -> str:
    """A result as the model reads it: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=_jsonable)
    except (TypeError, ValueError):
        return str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # a pydantic model (structured agent output)
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- strict schemas ---------------------------------------------------------------------


def _strict_schema(parameters: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parameters in the SDK's strict form, or None when they have none."""
    candidate = _nullable_optionals(parameters)
    if not _typed(candidate):
        return None
    try:
        return ensure_strict_json_schema(candidate)
    except (UserError, TypeError, ValueError):
        return None


def _nullable_optionals(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy in which every optional property, at any depth, also accepts null.

    Strict mode makes all properties required, so null is how a model leaves
    one out. Defaults move into the description: some endpoints reject the
    keyword in strict schemas.
    """
    out = copy.deepcopy(dict(schema))
    props = out.get("properties")
    if isinstance(props, dict):
        required = set(out.get("required") or ())
        for key, prop in props.items():
            if isinstance(prop, Mapping):
                prop = _nullable_optionals(prop)
                props[key] = prop if key in required else _optional(prop)
    if isinstance(out.get("items"), Mapping):
        out["items"] = _nullable_optionals(out["items"])
    if isinstance(out.get("anyOf"), list):
        out["anyOf"] = [_nullable_optionals(v) if isinstance(v, Mapping) else v
                        for v in out["anyOf"]]
    return out


def _optional(prop: dict[str, Any]) -> dict[str, Any]:
    has_default = "default" in prop
    default = prop.pop("default", None)
    description = prop.pop("description", None)
    if _accepts_null(prop):
        if has_default and default is not None:
            description = _described(description, f"default {json.dumps(default)}")
        nullable = prop
    else:
        if has_default and default is not None:
            description = _described(description, f"null for the default, {json.dumps(default)}")
        else:
            description = _described(description, "null to leave it out")
        variants = prop["anyOf"] if set(prop) == {"anyOf"} else [prop]
        nullable = {"anyOf": [*variants, {"type": "null"}]}
    if description is not None:
        nullable["description"] = description
    return nullable


def _described(description: str | None, note: str) -> str:
    return f"{description} ({note})" if description else note


def _typed(schema: Mapping[str, Any]) -> bool:
    """Whether every subschema says what it is (strict mode rejects untyped ones)."""
    if not any(k in schema for k in ("type", "anyOf", "enum", "const")):
        return False
    subschemas = list((schema.get("properties") or {}).values())
    if isinstance(schema.get("items"), Mapping):
        subschemas.append(schema["items"])
    subschemas.extend(schema.get("anyOf") or ())
    return all(isinstance(s, Mapping) and _typed(s) for s in subschemas)


# -- arguments --------------------------------------------------------------------------


def _accepts_null(schema: Mapping[str, Any]) -> bool:
    """Whether null fits the schema (the subset slim tool schemas use)."""
    t = schema.get("type")
    if t is not None:
        return t == "null" or (isinstance(t, list) and "null" in t)
    if "enum" in schema:
        return None in schema["enum"]
    if "const" in schema:
        return schema["const"] is None
    if isinstance(schema.get("anyOf"), list):
        return any(isinstance(v, Mapping) and _accepts_null(v) for v in schema["anyOf"])
    return True


def _drop_nulls(schema: Mapping[str, Any], value: Any) -> Any:
    """``value`` without the nulls a strict model sends for optional properties
    that do not accept null, so that the tool's defaults apply."""
    props = schema.get("properties")
    if isinstance(value, dict) and isinstance(props, Mapping):
        required = set(schema.get("required") or ())
        out = {}
        for key, v in value.items():
            prop = props.get(key)
            if not isinstance(prop, Mapping):
                out[key] = v
            elif v is None and key not in required and not _accepts_null(prop):
                continue
            else:
                out[key] = _drop_nulls(prop, v)
        return out
    items = schema.get("items")
    if isinstance(value, list) and isinstance(items, Mapping):
        return [_drop_nulls(items, v) for v in value]
    shape = "object" if isinstance(value, dict) else "array" if isinstance(value, list) else None
    for variant in schema.get("anyOf") or ():
        if shape is not None and isinstance(variant, Mapping) and variant.get("type") == shape:
            return _drop_nulls(variant, value)
    return value
