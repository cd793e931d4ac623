# What an app tells a tracing system about its sessions, when one is set
# (OpenTelemetry's is `_otel.AppTracer`). Apps without one pay one check.
from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._reports import Message, MessageContext

__all__ = ["Instrument", "default_instrument", "set_default_instrument"]


class Instrument(Protocol):
    def publish(self, session: Any, size: int, metadata: Mapping[str, str] | None,
                reply_to: MessageContext | None) -> dict[str, str]:
        """Record a publish; return its metadata with the trace context added."""

    def deliver(self, session: Any, message: Message) -> Message:
        """Record a delivery; return the message, its metadata naming the delivery."""

    def operation(self, name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
        """Record an operation that takes time (session setup, invite, remove, close)."""


_default: list[Instrument | None] = [None]


def default_instrument() -> Instrument | None:
    """The instrument of apps opened without one (see :func:`slim_agents.enable_tracing`)."""
    return _default[0]


def set_default_instrument(instrument: Instrument | None) -> Instrument | None:
    """Set the instrument apps opened from now on use by default; return the previous one."""
    previous, _default[0] = _default[0], instrument
    return previous
