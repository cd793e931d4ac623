from __future__ import annotations
import pytest, anyio
from node_lite import NodeConfig, open_node, open_node_process
from tests.helpers import SECRET, app_connection
from tests.reliability.resources import resource_check, ResourceLeakError, health_probe

pytestmark = pytest.mark.anyio

async def test_inproc() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        async with resource_check(node) as base:
            async with app_connection(node.url, "x"):
                pass
        print(base)

async def test_leak_detected() -> None:
    async with open_node(NodeConfig(shared_secret=SECRET)) as node:
        with pytest.raises(ResourceLeakError):
            async with resource_check(node, settle=0.3):
                cm = app_connection(node.url, "x")
                await cm.__aenter__()
        await cm.__aexit__(None, None, None)

async def test_proc() -> None:
    async with open_node_process(("--endpoint", "127.0.0.1:0", "--shared-secret", SECRET, "--log-level", "warn")) as node:
        async with resource_check(node) as base:
            async with app_connection(node.url, "x"):
                pass
        print(base)
