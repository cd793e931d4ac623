# Value objects that cross the sans-IO boundary: message contexts, delivery
# reports, and tickets (completion records for long-running operations).
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from node_lite import Name


class MessageContext(NamedTuple):
    """Who sent a received message and how (what ``get_message`` returns with the payload)."""

    source_name: Name
    destination_name: Name | None
    payload_type: str
    metadata: Mapping[str, str]
    session_id: int
    message_id: int
    identity: str = ""
    input_connection: int = 0
    direct: bool = False


class Message(NamedTuple):
    """A received message: ``ctx, payload = await session.get_message()``."""

    context: MessageContext
    payload: bytes


_NO_FAILURES: Mapping[Name, str] = MappingProxyType({})


class DeliveryReport(NamedTuple):
    """Outcome of one publish: who acknowledged it and who did not (and why)."""

    message_id: int
    delivered: tuple[Name, ...]
    failed: Mapping[Name, str] = _NO_FAILURES
    reliable: bool = True

    @property
    def ok(self) -> bool:
        return not self.failed


_PENDING: Any = object()


class Ticket:
    """The completion record of a long-running operation inside a sans-IO core.

    The core resolves it; the anyio layer turns it into an awaitable handle.
    """

    __slots__ = ("error", "kind", "resolved", "result", "waiter")

    def __init__(self, kind: str, result: Any = _PENDING) -> None:
        # ``result``: already resolved with it (a best-effort publish: one call, not two)
        self.kind = kind
        if result is _PENDING:
            self.resolved = False
            self.result: Any = None
        else:
            self.resolved = True
            self.result = result
        self.error: BaseException | None = None
        #: Opaque to the core: the driver parks its wake-up object here.
        self.waiter: Any = None

    def resolve(self, result: Any = None) -> bool:
        if self.resolved:
            return False
        self.resolved = True
        self.result = result
        return True

    def fail(self, error: BaseException) -> bool:
        if self.resolved:
            return False
        self.resolved = True
        self.error = error
        return True

    def __repr__(self) -> str:
        state = "pending" if not self.resolved else ("failed" if self.error else "done")
        return f"<Ticket {self.kind} {state}>"
