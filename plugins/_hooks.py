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


class BackendPlugin:
    """Offers ``module.backend()`` for node URLs with one of ``schemes``."""

    def __init__(self, name: str, module: str, schemes: tuple[str, ...]) -> None:
        self.name = name
        self.module = module
        self.schemes = schemes

    @hookimpl
    def slim_backend(self, url: str) -> object | None:
        scheme, sep, _ = url.partition("://")
        if not sep or scheme.lower() not in self.schemes:
            return None
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            if exc.name == self.module:
                raise
            return None  # the network's bindings are not installed: its extra is missing
        backend: object = module.backend()
        return backend

    def __repr__(self) -> str:
        return f"<BackendPlugin {self.name} ({self.module})>"


upstream = BackendPlugin("upstream", "slim_agents_plugins.upstream", ("slim",))
