"""Plugins: entry points of installed distributions, the allow-list, hook tracing."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from node_lite import NodeConfig, open_node
from slim_agents import Agent
from slim_agents._plugins import (
    ALLOW_ENV,
    TRACE_ENV,
    PluginError,
    framework_adapter,
    make_plugin_manager,
)
from tests.helpers import unique

pytestmark = pytest.mark.anyio
SECRET = "plugins-test-secret-that-is-long-enough-0123"


def install(root: Path, plugins: dict[str, str]) -> dict[str, str]:
    """A distribution on ``root`` with one entry point per plugin; returns name -> module."""
    tag = unique("p").replace("-", "_")
    dist = root / f"slim_test_plugins_{tag}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: slim-test-plugins-{tag}\n"
                                   "Version: 1.0\n")
    modules = {name: f"slim_test_{name}_{tag}" for name in plugins}
    (dist / "entry_points.txt").write_text(
        "[slim_agents]\n" + "".join(f"{name} = {mod}\n" for name, mod in modules.items()))
    for name, body in plugins.items():
        (root / f"{modules[name]}.py").write_text(textwrap.dedent(body))
    return modules


TOOL_PLUGIN = """
    from slim_agents import tool
    from slim_agents.hookspecs import hookimpl

    @tool
    async def {name}_tool() -> str:
        '''Say which plugin this is.'''
        return "{name}"

    @hookimpl
    def slim_tools(agent):
        return [{name}_tool]
"""


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.syspath_prepend(str(tmp_path))
    return install(tmp_path, {n: TOOL_PLUGIN.format(name=n) for n in ("alpha", "beta")})


def loaded(pm: object) -> set[str]:
    return {name for name, _ in pm.list_name_plugin()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # no I/O: one backend is enough
@pytest.mark.parametrize(("env", "expected"), [
    (None, {"alpha", "beta"}),  # unset: every installed plugin
    ("alpha", {"alpha"}),
    (" beta , alpha ", {"alpha", "beta"}),
    ("", set()),  # empty: none
    ("gamma", set()),  # a name nobody installed loads nothing
])
def test_the_allow_list_loads_exactly_the_named_plugins(
        anyio_backend: str, fake_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        env: str | None, expected: set[str]) -> None:
    if env is None:
        monkeypatch.delenv(ALLOW_ENV, raising=False)
    else:
        monkeypatch.setenv(ALLOW_ENV, env)
    names = loaded(make_plugin_manager()) & {"alpha", "beta"}
    assert names == expected
    for name, module in fake_plugins.items():
        assert (module in sys.modules) == (name in expected), "only allowed plugins import"
    if env is None:  # the adapters shipped with slim-agents are plugins like any other
        assert {"mcp", "langchain", "pydantic_ai", "openai_agents"} <= loaded(
            make_plugin_manager())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_an_allowed_plugin_that_fails_to_import_is_a_plugin_error(
        anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = install(tmp_path, {"good": TOOL_PLUGIN.format(name="good"),
                                 "broken": "raise RuntimeError('no config')\n"})
    monkeypatch.setenv(ALLOW_ENV, "good,broken")
    with pytest.raises(PluginError, match=r"'broken'.*no config"):
        make_plugin_manager()
    monkeypatch.setenv(ALLOW_ENV, "good")  # not allowed: never imported, no error
    assert "good" in loaded(make_plugin_manager())
    assert modules["broken"] not in sys.modules


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_a_missing_framework_adapter_names_its_extra(anyio_backend: str) -> None:
    with pytest.raises(PluginError, match=r"slim-agents\[nope\]"):
        framework_adapter("nope", make_plugin_manager(allow=False))


async def test_plugin_tools_reach_other_agents_and_hook_calls_can_be_traced(
        fake_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ALLOW_ENV, "beta")
    monkeypatch.setenv(TRACE_ENV, "1")
    caplog.set_level(logging.DEBUG, logger="slim_agents.plugins")
    ns = unique("plug")
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        host = Agent(f"org/{ns}/host", plugins=make_plugin_manager())
        user = Agent(f"org/{ns}/user", plugins=make_plugin_manager(allow=False))
        async with host.run(node, secret=SECRET), user.run(node, secret=SECRET) as u:
            with anyio.fail_after(10):
                assert await u.call(f"org/{ns}/host", "beta_tool") == "beta"
                assert [t.name for t in await u.remote_tools(f"org/{ns}/host")] == ["beta_tool"]
    assert "slim_tools" in caplog.text
