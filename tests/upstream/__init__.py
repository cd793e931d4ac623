"""The same sessions and agents on node_lite and on upstream SLIM (slim-bindings).

Fixtures shared by the test modules here (they import them): ``network`` gives a
fresh network of either kind for one test, as a :class:`Network` with its node URL.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from node_lite import NodeConfig, open_node
from tests.helpers import SECRET

__all__ = ["SECRET", "Network", "network", "upstream_plugin", "upstream_server_url"]

HAVE_BINDINGS = importlib.util.find_spec("slim_bindings") is not None
NO_BINDINGS = "slim-bindings is not installed (pip install 'slim-agents[upstream]')"


@dataclass(frozen=True)
class Network:
    """A node to connect apps and agents to: ``open_app(name, node=net.url, secret=net.secret)``."""

    kind: str  # "node_lite" or "upstream"
    url: str
    secret: str = SECRET

    @property
    def upstream(self) -> bool:
        return self.kind == "upstream"


@pytest.fixture
def upstream_plugin() -> None:
    """Make sure ``slim://`` URLs reach the upstream backend (its entry point may not be
    installed yet in a development checkout)."""
    from slim_agents._plugins import plugin_manager
    from slim_agents_plugins import _hooks

    pm = plugin_manager()
    if pm.get_plugin("upstream") is None and _hooks.upstream not in pm.get_plugins():
        pm.register(_hooks.upstream, name="upstream")


@pytest.fixture
def upstream_server_url(upstream_plugin: None) -> Iterator[str]:
    """An upstream SLIM node in this process (a fresh one per test): its ``slim://`` URL."""
    if not HAVE_BINDINGS:
        pytest.skip(NO_BINDINGS)
    from slim_agents_plugins.upstream import UpstreamServer

    with UpstreamServer() as server:
        yield server.url


@pytest.fixture(params=["node_lite", "upstream"])
async def network(request: pytest.FixtureRequest) -> AsyncIterator[Network]:
    """A fresh node_lite node or upstream SLIM node for one test."""
    if request.param == "upstream":
        yield Network("upstream", request.getfixturevalue("upstream_server_url"))
        return
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        yield Network("node_lite", node.url)
