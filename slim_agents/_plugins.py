# The plugin manager: hook specifications, entry points, the allow-list.
from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any

import pluggy

from node_lite import SlimError

from . import hookspecs

log = logging.getLogger("slim_agents.plugins")
ENTRY_POINT_GROUP = "slim_agents"
ALLOW_ENV = "SLIM_AGENTS_PLUGINS"
TRACE_ENV = "SLIM_AGENTS_TRACE_HOOKS"


class PluginError(SlimError):
    """A plugin could not be loaded or misbehaved."""

    code = "plugin"


def allowed_plugins(environ: dict[str, str] | None = None) -> set[str] | None:
    """The allow-list from the environment: None means every plugin."""
    env = os.environ if environ is None else environ
    raw = env.get(ALLOW_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def make_plugin_manager(*, load_entry_points: bool = True,
                        allow: set[str] | bool | None = True) -> pluggy.PluginManager:
    """A plugin manager with slim_agents' hooks and the allowed installed plugins.

    :param allow: ``True`` reads ``SLIM_AGENTS_PLUGINS``; a set restricts to
        those entry-point names; ``None`` loads all; ``False`` loads none.
    :raises PluginError: when an allowed plugin fails to import.
    """
    pm = pluggy.PluginManager("slim_agents")
    pm.add_hookspecs(hookspecs)
    wanted = allowed_plugins() if allow is True else (set() if allow is False else allow)
    if load_entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            if pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") \
                    from exc
            pm.register(plugin, name=ep.name)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: log.debug("hook %s", msg.rstrip()))
        pm.enable_tracing()
    return pm


_default: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager agents use unless given one (created on first use)."""
    global _default
    if _default is None:
        _default = make_plugin_manager()
    return _default


def framework_adapter(name: str, pm: pluggy.PluginManager | None = None) -> Any:
    """The adapter a plugin provides for framework ``name``.

    :raises PluginError: when no loaded plugin provides it.
    """
    for adapters in (pm or plugin_manager()).hook.slim_framework_adapters():
        if adapters and name in adapters:
            return adapters[name]
    raise PluginError(f"no plugin provides an adapter for {name!r}; install its extra "
                      f"(pip install 'slim-agents[{name}]') and check {ALLOW_ENV}")
