"""Tool specs derived from typed functions, argument checks, conversion and exporters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypedDict

import pytest

from node_lite import ConfigError
from slim_agents import Tool, ToolError, to_anthropic, to_openai, tool
from slim_agents._tools import check_arguments

pytestmark = pytest.mark.anyio


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Point:
    """A point.

    :param x: horizontal
    :param y: vertical
    """

    x: int
    y: int = 0


@dataclass
class Shape:
    """A shape.

    :param points: its corners
    :param color: its color
    """

    points: list[Point]
    color: Color = Color.RED
    tags: list[str] = field(default_factory=list)


class Options(TypedDict):
    """Options.

    :param fast: go fast
    """

    fast: bool


class Model:
    """Looks like a pydantic model."""

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        return {}


@tool
async def draw(shape: Shape, scale: float = 1.0, label: str | None = None,
               mode: Literal["fill", "line"] = "line", options: Options | None = None,
               blob: bytes = b"", extra: Annotated[dict[str, int] | None, "counters"] = None
               ) -> dict[str, Any]:
    """Draw a shape.

    More words that are not the summary.

    :param shape: what to draw
    :param scale: how big
    :param label: a caption
    :param mode: how to paint
    :param options: tuning
    :param blob: raw bytes
    :returns: what was drawn
    """
    assert isinstance(shape, Shape) and all(isinstance(p, Point) for p in shape.points)
    assert isinstance(shape.color, Color) and isinstance(blob, bytes)
    return {"corners": len(shape.points), "color": shape.color.value, "area": scale,
            "blob": len(blob), "label": label, "mode": mode}


def test_the_schema_of_a_typed_function(anyio_backend: str) -> None:
    assert draw.name == "draw" and draw.description == "Draw a shape."
    p = draw.parameters
    assert p["type"] == "object" and p["additionalProperties"] is False
    assert p["required"] == ["shape"]
    props = p["properties"]
    assert props["scale"] == {"type": "number", "default": 1.0, "description": "how big"}
    assert props["label"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert props["mode"]["enum"] == ["fill", "line"]
    assert props["extra"]["description"] == "counters"
    shape = props["shape"]
    assert shape["required"] == ["points"] and shape["additionalProperties"] is False
    assert shape["properties"]["color"]["enum"] == ["red", "blue"]
    point = shape["properties"]["points"]["items"]
    assert point["properties"]["x"] == {"type": "integer", "description": "horizontal"}
    assert "$ref" not in repr(p)
    assert draw.returns is not None and draw.returns["description"] == "what was drawn"


async def test_arguments_are_checked_then_converted(anyio_backend: str) -> None:
    result = await draw({"shape": {"points": [{"x": 1}, {"x": 2, "y": 3}], "color": "blue"},
                         "blob": "aGk=", "label": None})
    assert result == {"corners": 2, "color": "blue", "area": 1.0, "blob": 2, "label": None,
                      "mode": "line"}
    bad = [
        ({}, "missing 'shape'"),
        ({"shape": {"points": [{"x": "1"}]}}, "must be of type integer"),
        ({"shape": {"points": []}, "mode": "dots"}, "must be one of"),
        ({"shape": {"points": []}, "nope": 1}, "unknown field 'nope'"),
        ({"shape": {"points": []}, "scale": True}, "must be of type number"),
        ({"shape": {"points": []}, "label": 5}, "matches none"),
    ]
    for args, problem in bad:
        with pytest.raises(ToolError) as info:
            await draw(args)
        assert info.value.code == "bad_arguments" and problem in str(info.value), args
        result = await draw.run(args)
        assert result["error"]["code"] == "bad_arguments"


def test_schemas_from_elsewhere_may_list_types(anyio_backend: str) -> None:
    schema = {"type": "object", "properties": {"q": {"type": ["string", "null"]},
                                               "n": {"type": "integer", "format": "int64",
                                                     "minimum": 0}}}
    check_arguments(schema, {"q": None, "n": 3}, "t")
    check_arguments(schema, {"q": "x"}, "t")
    with pytest.raises(ToolError, match="one of the types"):
        check_arguments(schema, {"q": 1}, "t")
    check_arguments({"type": "object", "properties": {"v": {"type": "decimal"}}}, {"v": 1}, "t")


async def test_a_plain_function_and_errors_as_results(anyio_backend: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    @tool(name="div", description="Divide.")
    def divide(a: float, b: Annotated[float, "the divisor"]) -> float:
        """:param a: the dividend"""
        return a / b

    assert await divide({"a": 1, "b": 4}) == 0.25
    result = await divide.run({"a": 1, "b": 0})
    assert result["error"]["code"] == "failed" and "ZeroDivisionError" in \
        result["error"]["message"]
    assert "tool div failed" in caplog.text


@pytest.mark.parametrize("doc", [
    "Say it.\n\nArgs:\n    word (str): the word\n    times: how often\n",
    "Say it.\n\n:param word: the word\n:param times: how often\n",
    "Say it.\n\nParameters\n----------\nword : str\n    the word\ntimes : int\n    how often\n",
])
def test_docstring_styles(anyio_backend: str, doc: str) -> None:
    def say(word: str, times: int = 1) -> str:
        return word * times

    say.__doc__ = doc
    t = tool(say)
    assert t.description == "Say it."
    assert t.parameters["properties"]["word"]["description"] == "the word"
    assert t.parameters["properties"]["times"]["description"] == "how often"


def test_functions_that_cannot_be_described_are_refused(anyio_backend: str) -> None:
    def untyped(x):  # type: ignore[no-untyped-def]
        """:param x: a thing"""

    def undescribed(x: int) -> None:
        """Nothing about x."""

    def star(*args: int) -> None:
        """Stars."""

    def pydantic(m: Model) -> None:
        """:param m: a model"""

    def opaque(x: object) -> None:
        """:param x: a thing"""

    def unresolved(x: Missing) -> None:  # type: ignore[name-defined]  # noqa: F821
        """:param x: a thing"""

    for f, problem in [(untyped, "type annotation"), (undescribed, "describe parameter"),
                       (star, "cannot be described"), (pydantic, "pydantic"),
                       (opaque, "cannot describe type"), (unresolved, "cannot be resolved")]:
        with pytest.raises(ConfigError, match=problem):
            tool(f)
    with pytest.raises(ConfigError, match="letters, digits"):
        Tool(name="bad name", description="d", parameters={"type": "object"}, func=draw.func)
    with pytest.raises(ConfigError, match="needs a description"):
        Tool(name="ok", description=" ", parameters={"type": "object"}, func=draw.func)
    with pytest.raises(ConfigError, match="must be an object"):
        Tool(name="ok", description="d", parameters={"type": "string"}, func=draw.func)


def test_exporters(anyio_backend: str) -> None:
    assert to_openai(draw) == {"type": "function", "function": {
        "name": "draw", "description": "Draw a shape.", "parameters": dict(draw.parameters)}}
    assert to_anthropic(draw) == {"name": "draw", "description": "Draw a shape.",
                                  "input_schema": dict(draw.parameters)}
    assert draw.to_dict()["returns"]["description"] == "what was drawn"
