"""OpenTelemetry: spans for publish and delivery joined into one trace across agents."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, Message, Session
from slim_agents._otel import enable_tracing, endpoint_from_config
from slim_agents._plugins import make_plugin_manager
from tests.helpers import SECRET, unique

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with open_node(NodeConfig(shared_secret=SECRET)) as n:
        yield n


async def test_a_request_and_its_reply_form_one_trace_across_two_agents(node: Node) -> None:
    exporter = InMemorySpanExporter()
    provider = otel_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ns = unique("otel")
    pm_a, pm_b = make_plugin_manager(allow=False), make_plugin_manager(allow=False)
    enable_tracing(pm_a, tracer_provider=provider)
    enable_tracing(pm_b, tracer_provider=provider)
    echo = Agent(f"org/{ns}/echo", plugins=pm_b)

    @echo.on_message
    async def shout(msg: Message, session: Session) -> bytes:
        return msg.payload.upper()

    async with echo.run(node, secret=SECRET), \
            Agent(f"org/{ns}/asker", plugins=pm_a).run(node, secret=SECRET) as asker:
        with anyio.fail_after(10):
            answer = await asker.request(f"org/{ns}/echo", "ping")
    assert answer.payload == b"PING"
    spans = exporter.get_finished_spans()
    flow = [s for s in spans if s.name in ("slim publish", "slim deliver")]
    by_id = {s.context.span_id: s for s in flow}
    ask = next(s for s in flow if s.name == "slim publish"
               and s.attributes["slim.agent"].startswith(f"org/{ns}/asker"))
    chain = [ask]
    while True:  # follow children: publish -> deliver -> publish (reply) -> deliver
        children = [s for s in flow if s.parent is not None
                    and s.parent.span_id == chain[-1].context.span_id]
        if not children:
            break
        chain.append(children[0])
    assert [s.name for s in chain] == ["slim publish", "slim deliver", "slim publish",
                                       "slim deliver"]
    assert [s.attributes["slim.agent"] for s in chain] == [
        f"org/{ns}/asker", f"org/{ns}/echo", f"org/{ns}/echo", f"org/{ns}/asker"]
    assert len({s.context.trace_id for s in chain}) == 1
    assert ask.parent is None and all(s.context.span_id in by_id for s in chain)
    assert any(s.name == "slim session established" for s in spans)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_the_tutorial_tracing_config(anyio_backend: str) -> None:
    assert endpoint_from_config(None) is None
    assert endpoint_from_config({"opentelemetry": {"enabled": False}}) is None
    assert endpoint_from_config({"opentelemetry": {"enabled": True, "grpc": {
        "endpoint": "http://collector:4317"}}}) == "http://collector:4317"
    assert endpoint_from_config({"opentelemetry": {"enabled": True}}) == \
        "http://localhost:4318"
