# Canonical tools: name, description, JSON Schema parameters, async callable.
#
# Derived from typed Python functions and their docstrings, so that one
# definition serves every model and framework. The schema always has an
# object root, never uses $ref, and describes every property (models read
# the descriptions; some providers reject undescribed fields).
from __future__ import annotations

import base64
import dataclasses
import enum
import inspect
import logging
import re
import types
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from node_lite import ConfigError, SlimError

log = logging.getLogger("slim_agents.tools")

__all__ = ["Tool", "ToolError", "tool", "to_anthropic", "to_openai"]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(SlimError):
    """A tool call failed; ``code`` says how (bad_arguments, not_found, failed, ...)."""

    code = "tool"

    def __init__(self, message: str, *, code: str = "failed", tool: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.tool = tool

    def to_result(self) -> dict[str, Any]:
        """The error as a result a model can read."""
        return {"error": {"code": self.code, "message": str(self), "tool": self.tool}}


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool: what a model sees (name, description, parameters) and how to run it."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    func: Callable[..., Awaitable[Any]] = field(repr=False)
    returns: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"tool name {self.name!r}: letters, digits, _ and -, at most 64")
        if not self.description.strip():
            raise ConfigError(f"tool {self.name!r} needs a description")
        if self.parameters.get("type") != "object":
            raise ConfigError(f"tool {self.name!r}: the parameters schema must be an object")

    async def __call__(self, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run the tool with JSON arguments (checked against the schema first).

        :raises ToolError: with code ``bad_arguments`` when they do not fit.
        """
        args = dict(arguments or {})
        check_arguments(self.parameters, args, self.name)
        result = self.func(**args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def run(self, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run the tool; a failure comes back as ``{"error": {...}}`` (what a model reads).

        Unexpected exceptions are logged with their traceback. Cancellation
        is not caught.
        """
        try:
            return await self(arguments)
        except ToolError as exc:
            return exc.to_result()
        except Exception as exc:
            log.exception("tool %s failed", self.name)
            return ToolError(f"{type(exc).__name__}: {exc}", code="failed",
                             tool=self.name).to_result()

    def to_dict(self) -> dict[str, Any]:
        """The tool's public description (what travels to other agents)."""
        d: dict[str, Any] = {"name": self.name, "description": self.description,
                             "parameters": dict(self.parameters)}
        if self.returns is not None:
            d["returns"] = dict(self.returns)
        return d


def to_openai(t: Tool) -> dict[str, Any]:
    """The tool as OpenAI's function-calling JSON."""
    return {"type": "function",
            "function": {"name": t.name, "description": t.description,
                         "parameters": dict(t.parameters)}}


def to_anthropic(t: Tool) -> dict[str, Any]:
    """The tool as Anthropic's tool-use JSON."""
    return {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}


# -- derivation from Python functions ---------------------------------------------------


def _doc_parts(doc: str | None) -> tuple[str, dict[str, str], str | None]:
    """Summary, per-parameter descriptions and the returns line of a docstring.

    Understands ``:param x: ...`` (Sphinx), ``Args:`` sections (Google) and
    ``Parameters`` sections (NumPy).
    """
    text = inspect.cleandoc(doc or "")
    params: dict[str, str] = {}
    returns = None
    for m in re.finditer(r":param\s+(?:[\w\[\], ]+\s+)?(\w+):\s*(.+?)(?=\n\s*:|\Z)", text, re.S):
        params[m.group(1)] = " ".join(m.group(2).split())
    ret = re.search(r":returns?:\s*(.+?)(?=\n\s*:|\Z)", text, re.S)
    if ret:
        returns = " ".join(ret.group(1).split())
    section = re.search(r"^(Args|Arguments|Parameters):\s*\n(.*?)(?=\n\S|\Z)", text, re.S | re.M)
    if section:
        for m in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?\s*:\s*(.+?)(?=\n\s+\w+\s*(?:\(|:)|\Z)",
                             section.group(2), re.S | re.M):
            params.setdefault(m.group(1), " ".join(m.group(2).split()))
    numpy = re.search(r"^Parameters\n-+\n(.*?)(?=\n\S+\n-+\n|\Z)", text, re.S | re.M)
    if numpy:
        for m in re.finditer(r"^(\w+)(?:\s*:[^\n]*)?\n((?:[ \t]+\S[^\n]*\n?)+)",
                             numpy.group(1), re.M):
            params.setdefault(m.group(1), " ".join(m.group(2).split()))
    summary = re.split(r"\n\s*\n|\n\s*:|\n(?:Args|Arguments|Parameters|Returns):", text)[0]
    return " ".join(summary.split()), params, returns


_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"}, int: {"type": "integer"}, float: {"type": "number"},
    bool: {"type": "boolean"}, bytes: {"type": "string", "contentEncoding": "base64"},
    type(None): {"type": "null"}, Any: {},
}


def schema_for(annotation: Any, description: str, where: str) -> dict[str, Any]:
    """JSON Schema (no $ref) for a type annotation, with a description."""
    schema = _schema(annotation, where, depth=0)
    schema["description"] = description
    return schema


def _schema(tp: Any, where: str, depth: int) -> dict[str, Any]:
    if depth > 8:
        raise ConfigError(f"{where}: type nests too deeply for a tool schema")
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        inner = _schema(args[0], where, depth + 1)
        for extra in args[1:]:
            if isinstance(extra, str):
                inner["description"] = extra
        return inner
    if origin in (Union, types.UnionType):
        options = [_schema(a, where, depth + 1) for a in args]
        return {"anyOf": options}
    if origin is Literal:
        return {"enum": list(args)}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if origin in (list, Sequence, tuple, set, frozenset) or tp in (list, tuple, set):
        item = args[0] if (args and args[-1] is not Ellipsis) or len(args) == 2 else Any
        return {"type": "array", "items": _schema(item if args else Any, where, depth + 1)}
    if origin in (dict, Mapping) or tp is dict:
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": _schema(value, where, depth + 1)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _object_schema(tp, where, depth)
    if isinstance(tp, type) and typing.is_typeddict(tp):
        return _object_schema(tp, where, depth)
    if isinstance(tp, type) and hasattr(tp, "model_json_schema"):
        raise ConfigError(f"{where}: pydantic models are not expanded; use a dataclass or "
                          "TypedDict, or give the schema explicitly")
    raise ConfigError(f"{where}: cannot describe type {tp!r} in a tool schema")


def _converter(tp: Any) -> Callable[[Any], Any] | None:
    """What turns a JSON value into the annotated type (None: it already is one)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is typing.Annotated:
        return _converter(args[0])
    if tp is bytes:
        return lambda v: base64.b64decode(v) if isinstance(v, str) else v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda v: v if isinstance(v, tp) else tp(v)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        fields: dict[str, Callable[[Any], Any]] = {}
        for f in dataclasses.fields(tp):
            convert = _converter(hints.get(f.name, Any))
            if f.init and convert is not None:
                fields[f.name] = convert

        def build(v: Any) -> Any:
            if not isinstance(v, dict):
                return v
            return tp(**{k: fields[k](x) if k in fields and x is not None else x
                         for k, x in v.items()})
        return build
    if origin in (Union, types.UnionType):
        options = [(a, _converter(a)) for a in args if a is not type(None)]
        if len(options) == 1 and options[0][1] is not None:
            inner = options[0][1]
            return lambda v: None if v is None else inner(v)
        return None
    if origin in (list, Sequence, set, frozenset, tuple) and args:
        item = _converter(args[0])
        if item is None and origin is list:
            return None
        kind: Any = list if origin is Sequence else origin
        return lambda v: kind(item(x) if item else x for x in v) if isinstance(v, list) else v
    return None


def _object_schema(tp: type, where: str, depth: int) -> dict[str, Any]:
    hints = typing.get_type_hints(tp, include_extras=True)
    _, docs, _ = _doc_parts(tp.__doc__)
    props = {}
    required = []
    fields_ = ({f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp)
               else {})
    for name, hint in hints.items():
        props[name] = _schema(hint, f"{where}.{name}", depth + 1)
        props[name]["description"] = props[name].get("description") or docs.get(name) or name
        f = fields_.get(name)
        if f is None and typing.is_typeddict(tp):
            if name in getattr(tp, "__required_keys__", ()):
                required.append(name)
        elif f is not None and f.default is dataclasses.MISSING and \
                f.default_factory is dataclasses.MISSING:
            required.append(name)
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


def tool(func: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None) -> Any:
    """Make a :class:`Tool` of a typed function (used bare or with arguments).

    Parameter descriptions come from the docstring (``:param x:``, ``Args:``
    or NumPy style) or from ``Annotated[int, "description"]``.

    :raises ConfigError: when a parameter is untyped, undescribed, or its
        type has no JSON Schema.
    """
    def make(f: Callable[..., Any]) -> Tool:
        return tool_from_function(f, name=name, description=description)

    return make(func) if func is not None else make


def tool_from_function(f: Callable[..., Any], *, name: str | None = None,
                       description: str | None = None) -> Tool:
    sig = inspect.signature(f)
    try:
        hints = typing.get_type_hints(f, include_extras=True)
    except NameError as exc:
        raise ConfigError(f"tool {name or f.__name__!r}: an annotation cannot be resolved "
                          f"({exc}); define the types at module level") from exc
    summary, docs, returns_doc = _doc_parts(f.__doc__)
    tname = name or f.__name__
    props: dict[str, Any] = {}
    required = []
    converters: dict[str, Callable[[Any], Any]] = {}
    for pname, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {tname!r}: *args and **kwargs cannot be described")
        if pname not in hints:
            raise ConfigError(f"tool {tname!r}: parameter {pname!r} needs a type annotation")
        hint = hints[pname]
        desc = docs.get(pname)
        if get_origin(hint) is typing.Annotated:
            desc = next((x for x in get_args(hint)[1:] if isinstance(x, str)), desc)
        if not desc:
            raise ConfigError(f"tool {tname!r}: describe parameter {pname!r} in the docstring "
                              f"(:param {pname}: ...) or with Annotated[..., 'description']")
        props[pname] = schema_for(hint, desc, f"tool {tname!r} parameter {pname!r}")
        convert = _converter(hint)
        if convert is not None:
            converters[pname] = convert
        if param.default is inspect.Parameter.empty:
            required.append(pname)
        else:
            props[pname]["default"] = _jsonable_default(param.default)
    returns = None
    if "return" in hints and hints["return"] is not type(None):
        try:
            returns = schema_for(hints["return"], returns_doc or "the result", f"tool {tname!r}")
        except ConfigError:
            returns = {"description": returns_doc or "the result"}
    func = f
    if not inspect.iscoroutinefunction(f) or converters:
        async def func(**kwargs: Any) -> Any:
            for k, convert in converters.items():
                if k in kwargs:
                    kwargs[k] = convert(kwargs[k])
            result = f(**kwargs)  # a plain function runs as is: it is expected to be quick
            return await result if inspect.isawaitable(result) else result

    return Tool(name=tname, description=description or summary or tname,
                parameters={"type": "object", "properties": props, "required": required,
                            "additionalProperties": False},
                func=func, returns=returns)


def _jsonable_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


# -- argument checking (the subset of JSON Schema the derivation produces) --------------


def check_arguments(schema: Mapping[str, Any], args: Mapping[str, Any], tool_name: str) -> None:
    """Check JSON arguments against a tool's parameter schema.

    :raises ToolError: ``bad_arguments`` naming the first problem.
    """
    problem = _check(schema, args, "arguments")
    if problem:
        raise ToolError(f"bad arguments for {tool_name}: {problem}", code="bad_arguments",
                        tool=tool_name)


def _ANY(value: Any) -> bool:
    return True


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _check(schema: Mapping[str, Any], value: Any, where: str) -> str | None:
    if "anyOf" in schema:
        if all(_check(s, value, where) for s in schema["anyOf"]):
            return f"{where} matches none of the allowed types"
        return None
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}"
    t = schema.get("type")
    if isinstance(t, list):  # ["string", "null"]: any of them (unknown names pass)
        if t and not any(_TYPES.get(x, _ANY)(value) for x in t):
            return f"{where} must be one of the types {t}"
        t = next((x for x in t if _TYPES.get(x, _ANY)(value)), None)
    elif t is not None and not _TYPES.get(t, _ANY)(value):
        return f"{where} must be of type {t}"
    if t == "object":
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            if req not in value:
                return f"{where} is missing {req!r}"
        for k, v in value.items():
            if k in props:
                problem = _check(props[k], v, f"{where}.{k}")
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{where} has an unknown field {k!r}"
            elif isinstance(schema.get("additionalProperties"), dict):
                problem = _check(schema["additionalProperties"], v, f"{where}.{k}")
                if problem:
                    return problem
    if t == "array":
        items = schema.get("items", {})
        for i, v in enumerate(value):
            problem = _check(items, v, f"{where}[{i}]")
            if problem:
                return problem
    return None
