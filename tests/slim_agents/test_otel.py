"""OpenTelemetry: spans for publish and delivery joined into one trace across agents."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from node_lite import Node, NodeConfig, open_node
from slim_agents import Agent, Message, NoRouteError, Session, SessionConfig, open_app
from slim_agents._instrument import default_instrument, set_default_instrument
from slim_agents._otel import AppTracer, enable_tracing, endpoint_from_config
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


def _provider() -> tuple[object, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = otel_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_plain_app_sessions_trace_setup_publish_delivery_and_reply(node: Node) -> None:
    provider, exporter = _provider()
    tracer = AppTracer(provider.get_tracer("test"))  # type: ignore[attr-defined]
    ns = unique("otel-app")
    async with open_app(f"org/{ns}/a", node=node, secret=SECRET, instrument=tracer) as a, \
            open_app(f"org/{ns}/b", node=node, secret=SECRET, instrument=tracer) as b:
        with anyio.fail_after(10):
            session = await a.create_session(f"org/{ns}/b", SessionConfig(timeout=1.0,
                                                                         max_retries=5))
            await (await session.publish(b"ping", metadata={"k": "v"}))
            peer = await b.listen_for_session()
            msg = await peer.get_message()
            assert msg.context.metadata["k"] == "v"
            await peer.publish_to(msg.context, b"pong")
            assert (await session.get_message()).payload == b"pong"
    spans = exporter.get_finished_spans()
    setup = [s for s in spans if s.name == "slim session setup"]
    assert len(setup) == 1 and setup[0].attributes["messaging.destination.name"] == \
        f"org/{ns}/b"
    flow = [s for s in spans if s.name in ("slim publish", "slim deliver")]
    ask = next(s for s in flow if s.name == "slim publish"
               and s.attributes["slim.agent"].startswith(f"org/{ns}/a/"))
    chain = [ask]
    while children := [s for s in flow if s.parent is not None
                       and s.parent.span_id == chain[-1].context.span_id]:
        chain.append(children[0])
    assert [(s.name, s.attributes["slim.agent"].split("/")[2]) for s in chain] == [
        ("slim publish", "a"), ("slim deliver", "b"), ("slim publish", "b"),
        ("slim deliver", "a")]
    assert len({s.context.trace_id for s in chain}) == 1


async def test_group_operations_are_spans_and_failures_are_marked(node: Node) -> None:
    provider, exporter = _provider()
    tracer = AppTracer(provider.get_tracer("test"))  # type: ignore[attr-defined]
    ns = unique("otel-grp")
    async with open_app(f"org/{ns}/mod", node=node, secret=SECRET, instrument=tracer) as mod, \
            open_app(f"org/{ns}/m", node=node, secret=SECRET) as member:
        with anyio.fail_after(10):
            session = await mod.create_session(f"org/{ns}/chan",
                                               SessionConfig.group(timeout=0.5, max_retries=2))
            await session.invite(f"org/{ns}/m")
            await member.listen_for_session()
            with pytest.raises(NoRouteError):
                await session.invite(f"org/{ns}/nobody")
            await session.remove(f"org/{ns}/m")
            await session.close()
    spans = {s.name: s for s in exporter.get_finished_spans()
             if s.name.startswith(("slim invite", "slim remove", "slim close"))}
    invites = [s for s in exporter.get_finished_spans() if s.name == "slim invite"]
    ok, failed = sorted(invites, key=lambda s: s.attributes["slim.participant"].endswith("nobody"))
    assert ok.attributes["slim.participant"] == f"org/{ns}/m" and ok.status.is_ok
    assert not failed.status.is_ok and failed.events[0].name == "exception"
    assert spans["slim remove"].attributes["slim.participant"] == f"org/{ns}/m"
    assert spans["slim close"].attributes["slim.session.id"] == session.id


async def test_tracing_apps_process_wide_leaves_agents_to_their_hooks(node: Node) -> None:
    provider, exporter = _provider()
    before = default_instrument()
    enable_tracing(make_plugin_manager(allow=False), tracer_provider=provider, apps=True)
    try:
        ns = unique("otel-wide")
        async with open_app(f"org/{ns}/plain", node=node, secret=SECRET) as plain, \
                Agent(f"org/{ns}/agent").run(node, secret=SECRET) as agent, \
                open_app(f"org/{ns}/off", node=node, secret=SECRET, instrument=None) as off:
            assert isinstance(plain.instrument, AppTracer)
            assert agent.app.instrument is None and off.instrument is None
            with anyio.fail_after(10):
                await plain.create_session(f"org/{ns}/agent", SessionConfig())
        assert [s.name for s in exporter.get_finished_spans()] == ["slim session setup"]
    finally:
        set_default_instrument(before)
    assert default_instrument() is before
