"""The uvloop backend (the `fast` extra): a node process and apps on asyncio over uvloop."""

from __future__ import annotations

import sys

import anyio
import pytest

from node_lite import ConfigError, open_node_process
from node_lite._util import run
from slim_agents import SessionConfig, open_app
from tests.helpers import SECRET, unique

pytest.importorskip("uvloop")
pytestmark = pytest.mark.anyio


@pytest.fixture(params=[pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


async def test_sessions_through_a_uvloop_node_process() -> None:
    import asyncio  # to check which loop runs this test

    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    ns = unique("uv")
    args = ("--endpoint", "127.0.0.1:0", "--backend", "uvloop", "--shared-secret", SECRET)
    async with open_node_process(args) as node:
        async with open_app(f"org/{ns}/a", node=node.url, secret=SECRET) as a, \
                open_app(f"org/{ns}/b", node=node.url, secret=SECRET) as b, \
                open_app(f"org/{ns}/c", node=node.url, secret=SECRET) as c:
            with anyio.fail_after(20):
                p2p = await a.create_session(f"org/{ns}/b",
                                             SessionConfig(timeout=1.0, max_retries=5))
                for i in range(100):
                    await p2p.publish(str(i).encode())
                peer = await b.listen_for_session()
                assert [(await peer.get_message()).payload for _ in range(100)] == [
                    str(i).encode() for i in range(100)]
                group = await a.create_session(f"org/{ns}/chan",
                                               SessionConfig.group(timeout=1.0, max_retries=5))
                await group.invite(f"org/{ns}/c")
                member = await c.listen_for_session()
                report = await (await group.publish(b"all"))
                assert report.failed == {}
                assert (await member.get_message()).payload == b"all"


def test_the_uvloop_backend_without_uvloop_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails

    async def main() -> None:
        raise AssertionError("must not start")

    with pytest.raises(ConfigError, match="slim-agents\\[fast\\]"):
        run(main, backend="uvloop")
