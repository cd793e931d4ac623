# Value objects that cross the sans-IO boundary: message contexts, delivery
# reports, and tickets (completion records for long-running operations).
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from node_lite import Name


@dataclass(frozen=True, slots=True)
class MessageContext:
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


@dataclass(frozen=True, slots=True)
class Message:
    """A received message: its context and payload."""

    context: MessageContext
    payload: bytes

    def __iter__(self) -> Any:
        # ``ctx, payload = await session.get_message()`` works, as in the seeds.
        yield self.context
        yield self.payload


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """Outcome of one publish: who acknowledged it and who did not (and why)."""

    message_id: int
    delivered: tuple[Name, ...]
    failed: Mapping[Name, str] = field(default_factory=dict)
    reliable: bool = True

    @property
    def ok(self) -> bool:
        return not self.failed


class Ticket:
    """The completion record of a long-running operation inside a sans-IO core.

    The core resolves it; the anyio layer turns it into an awaitable handle.
    """

    __slots__ = ("error", "kind", "result", "resolved", "waiter")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.resolved = False
        self.result: Any = None
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
