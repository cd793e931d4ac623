# The entry-point objects: one small plugin per framework. Loading one never
# imports its framework; the adapter module is imported when asked for.
from __future__ import annotations

import importlib
from types import ModuleType

from slim_agents.hookspecs import hookimpl


class FrameworkPlugin:
    """Offers the adapter module ``module`` under the framework name ``name``."""

    def __init__(self, name: str, module: str) -> None:
        self.name = name
        self.module = module

    @hookimpl
    def slim_framework_adapters(self) -> dict[str, ModuleType] | None:
        try:
            return {self.name: importlib.import_module(self.module)}
        except ImportError as exc:
            if exc.name == self.module:
                raise
            return None  # the framework is not installed: its extra is missing

    def __repr__(self) -> str:
        return f"<FrameworkPlugin {self.name} ({self.module})>"


mcp = FrameworkPlugin("mcp", "slim_agents_plugins.mcp")
langchain = FrameworkPlugin("langchain", "slim_agents_plugins.langchain")
pydantic_ai = FrameworkPlugin("pydantic_ai", "slim_agents_plugins.pydantic_ai")
openai_agents = FrameworkPlugin("openai_agents", "slim_agents_plugins.openai_agents")
