# OpenTelemetry for agents (the `otel` extra): spans for publish and delivery,
# session and membership events, with the trace context carried in message
# metadata so that a request, its handling and its reply form one trace.
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from node_lite import ConfigError

from ._agent import current_message
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ._reports import Message

__all__ = ["OtelPlugin", "enable_tracing"]


def _otel() -> Any:
    try:
        from opentelemetry import propagate, trace
    except ImportError as exc:
        raise ConfigError("OpenTelemetry needs its extra: pip install 'slim-agents[otel]'") \
            from exc
    return propagate, trace


class OtelPlugin:
    """Spans for what agents send and receive (register it, or use :func:`enable_tracing`)."""

    def __init__(self, tracer: Any) -> None:
        self._propagate, trace = _otel()
        self._kind = trace.SpanKind
        self.tracer = tracer

    def _attributes(self, agent: Any, session: Any, size: int) -> dict[str, Any]:
        return {"messaging.system": "slim", "messaging.destination.name": str(session.dst),
                "slim.agent": str(agent.name), "slim.session.id": session.id,
                "messaging.message.body.size": size}

    @hookimpl
    def slim_before_send(self, agent: Any, session: Any, payload: bytes,
                         metadata: dict[str, str]) -> None:
        answering = current_message()
        parent = self._propagate.extract(answering.context.metadata) \
            if answering is not None else None
        with self.tracer.start_as_current_span(
                "slim publish", context=parent, kind=self._kind.PRODUCER,
                attributes=self._attributes(agent, session, len(payload))):
            self._propagate.inject(metadata)

    @hookimpl
    def slim_after_receive(self, agent: Any, session: Any, message: Message) -> Message:
        parent = self._propagate.extract(message.context.metadata)
        attributes = self._attributes(agent, session, len(message.payload))
        attributes["messaging.source.name"] = str(message.context.source_name)
        with self.tracer.start_as_current_span("slim deliver", context=parent,
                                               kind=self._kind.CONSUMER,
                                               attributes=attributes):
            # What the handler sends next is a child of this delivery.
            meta: dict[str, str] = dict(message.context.metadata)
            self._propagate.inject(meta)
        return message._replace(context=message.context._replace(metadata=meta))

    @hookimpl
    def slim_session_event(self, agent: Any, session: Any, event: str) -> None:
        with self.tracer.start_as_current_span(
                f"slim session {event}", kind=self._kind.INTERNAL,
                attributes={"slim.agent": str(agent.name), "slim.session.id": session.id,
                            "slim.session.kind": session.kind.name,
                            "messaging.destination.name": str(session.dst)}):
            pass

    @hookimpl
    def slim_membership_event(self, agent: Any, session: Any, added: list[Any],
                              removed: list[Any]) -> None:
        with self.tracer.start_as_current_span(
                "slim membership", kind=self._kind.INTERNAL,
                attributes={"slim.agent": str(agent.name), "slim.session.id": session.id,
                            "slim.added": [str(n) for n in added],
                            "slim.removed": [str(n) for n in removed]}):
            pass


def enable_tracing(pm: pluggy.PluginManager | None = None, *, tracer_provider: Any = None,
                   endpoint: str | None = None, service_name: str = "slim-agents"
                   ) -> OtelPlugin:
    """Trace agents with OpenTelemetry.

    :param pm: the plugin manager to add the tracing plugin to (default: the one
        agents use unless given their own).
    :param tracer_provider: an SDK tracer provider (default: the global one, or a
        new one exporting over OTLP/HTTP to ``endpoint``).
    :param endpoint: an OTLP/HTTP collector, e.g. ``http://localhost:4318``.
    """
    _, trace = _otel()
    if tracer_provider is None and endpoint is not None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ConfigError("OTLP export needs: pip install 'slim-agents[otel]'") from exc
        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        tracer_provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        trace.set_tracer_provider(tracer_provider)
    provider = tracer_provider or trace.get_tracer_provider()
    plugin = OtelPlugin(provider.get_tracer("slim_agents"))
    if pm is None:
        from ._plugins import plugin_manager

        pm = plugin_manager()
    pm.register(plugin, name=f"otel-{id(plugin)}")
    return plugin


def endpoint_from_config(config: Mapping[str, Any] | None) -> str | None:
    """The collector endpoint of an ``init_tracing`` config, if tracing is enabled in it."""
    otel = (config or {}).get("opentelemetry") or {}
    if not isinstance(otel, Mapping) or not otel.get("enabled"):
        return None
    for key in ("http", "grpc"):
        section = otel.get(key)
        if isinstance(section, Mapping) and section.get("endpoint"):
            return str(section["endpoint"])
    return str(otel.get("endpoint") or "http://localhost:4318")
