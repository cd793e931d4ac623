# OpenTelemetry (the `otel` extra): spans for session setup, invite, publish
# and delivery, with the trace context carried in message metadata so that a
# request, its handling and its reply form one trace. Plain apps are traced by
# an AppTracer (their instrument); agents by OtelPlugin through their hooks.
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pluggy

from node_lite import ConfigError

from ._agent import current_message
from ._instrument import set_default_instrument
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from ._reports import Message, MessageContext

__all__ = ["AppTracer", "OtelPlugin", "enable_tracing"]


def _otel() -> Any:
    try:
        from opentelemetry import propagate, trace
    except ImportError as exc:
        raise ConfigError("OpenTelemetry needs its extra: pip install 'slim-agents[otel]'") \
            from exc
    return propagate, trace


class AppTracer:
    """Spans for an app's sessions (an app's ``instrument``; see :func:`enable_tracing`)."""

    def __init__(self, tracer: Any) -> None:
        self._propagate, trace = _otel()
        self._kind = trace.SpanKind
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self.tracer = tracer

    def publish(self, session: Any, size: int, metadata: Mapping[str, str] | None,
                reply_to: MessageContext | None, who: Any = None) -> dict[str, str]:
        # A reply continues the trace of what it answers; else the current span's.
        carrier = metadata if metadata and "traceparent" in metadata else \
            reply_to.metadata if reply_to is not None else None
        parent = self._propagate.extract(carrier) if carrier is not None else None
        out = dict(metadata or {})
        with self.tracer.start_as_current_span(
                "slim publish", context=parent, kind=self._kind.PRODUCER,
                attributes=_attributes(who or session.src, session, size)):
            self._propagate.inject(out)
        return out

    def deliver(self, session: Any, message: Message, who: Any = None) -> Message:
        attributes = _attributes(who or session.src, session, len(message.payload))
        attributes["messaging.source.name"] = str(message.context.source_name)
        with self.tracer.start_as_current_span(
                "slim deliver", context=self._propagate.extract(message.context.metadata),
                kind=self._kind.CONSUMER, attributes=attributes):
            # What answers this message is a child of its delivery.
            meta: dict[str, str] = dict(message.context.metadata)
            self._propagate.inject(meta)
        return message._replace(context=message.context._replace(metadata=meta))

    @contextmanager
    def operation(self, name: str, attributes: dict[str, Any]) -> Iterator[Any]:
        with self.tracer.start_as_current_span(name, kind=self._kind.INTERNAL,
                                               attributes=attributes,
                                               record_exception=True,
                                               set_status_on_exception=True) as span:
            yield span


def _attributes(who: Any, session: Any, size: int) -> dict[str, Any]:
    return {"messaging.system": "slim", "messaging.destination.name": str(session.dst),
            "slim.agent": str(who), "slim.session.id": session.id,
            "messaging.message.body.size": size}


class OtelPlugin:
    """Spans for what agents send and receive (register it, or use :func:`enable_tracing`)."""

    def __init__(self, tracer: Any) -> None:
        self._spans = AppTracer(tracer)
        self._kind = self._spans._kind
        self.tracer = tracer

    @hookimpl
    def slim_before_send(self, agent: Any, session: Any, payload: bytes,
                         metadata: dict[str, str]) -> None:
        answering = current_message()
        out = self._spans.publish(session, len(payload), None,
                                  answering.context if answering is not None else None,
                                  who=agent.name)
        metadata.update(out)

    @hookimpl
    def slim_after_receive(self, agent: Any, session: Any, message: Message) -> Message:
        return self._spans.deliver(session, message, who=agent.name)

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
                   endpoint: str | None = None, service_name: str = "slim-agents",
                   apps: bool | None = None) -> OtelPlugin:
    """Trace agents and apps with OpenTelemetry.

    :param pm: the plugin manager to add the tracing plugin to (default: the one
        agents use unless given their own).
    :param apps: also trace the sessions of plain apps opened from now on (by
        default only when ``pm`` is None, the process-wide setup).
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
    process_wide = pm is None
    if pm is None:
        from ._plugins import plugin_manager

        pm = plugin_manager()
    pm.register(plugin, name=f"otel-{id(plugin)}")
    if apps or (apps is None and process_wide):
        set_default_instrument(AppTracer(plugin.tracer))
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
