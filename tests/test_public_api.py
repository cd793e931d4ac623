"""The public surface: everything exported exists, and nothing private leaks."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = ["node_lite", "node_lite.wire", "slim_agents"]


@pytest.mark.parametrize("module_name", PACKAGES)
def test_all_names_exist_and_are_public(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "duplicate names in __all__"
    for name in exported:
        assert not name.startswith("_"), name
        assert hasattr(module, name), f"{module_name}.{name} is in __all__ but missing"


def test_error_tree_has_one_root() -> None:
    import node_lite

    for name in node_lite.__all__:
        obj = getattr(node_lite, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, node_lite.SlimError), name


def test_node_lite_never_imports_slim_agents() -> None:
    import pathlib

    root = pathlib.Path(importlib.import_module("node_lite").__file__).parent
    import re

    for path in root.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+slim_agents\b", text, re.M), path.name


def test_library_code_imports_anyio_not_asyncio_or_trio() -> None:
    import pathlib
    import re

    for package in ("node_lite", "slim_agents"):
        root = pathlib.Path(importlib.import_module(package).__file__).parent
        for path in root.rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+(asyncio|trio)\b", text, re.M), path
