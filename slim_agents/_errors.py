# Session-layer errors, under node_lite's SlimError root.
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from node_lite import Name, SlimError

if TYPE_CHECKING:
    from ._reports import DeliveryReport


class SessionError(SlimError):
    """A session operation failed."""

    code = "session"

    def __init__(self, message: str, *, session_id: int | None = None) -> None:
        super().__init__(message)
        self.session_id = session_id


class SessionClosedError(SessionError):
    """The session is closed (by this side, the peer, the moderator, or a removal)."""

    code = "session_closed"

    def __init__(self, session_id: int | None = None, reason: str = "closed") -> None:
        super().__init__(f"session closed ({reason})", session_id=session_id)
        self.reason = reason


class SessionRejectedError(SessionError):
    """The remote side refused to join or to answer (``code`` says why)."""

    code = "rejected"

    def __init__(self, name: Name | None, code: str, message: str = "",
                 *, session_id: int | None = None) -> None:
        who = f" by {name}" if name is not None else ""
        super().__init__(f"refused{who}: {code}" + (f" ({message})" if message else ""),
                         session_id=session_id)
        self.name = name
        self.code = code
        self.detail = message


class JoinFailedError(SessionRejectedError):
    """An invitee could not join: its key package or the welcome failed a check.

    ``name`` is the invitee and ``code`` the check (``key_package``, ``binding``,
    ``bad_welcome``, ...). The group is left as it was before the invite.
    """


class SessionTimeoutError(SessionError, TimeoutError):
    """A session handshake got no answer within its retries."""

    code = "timeout"


class ParticipantError(SessionError, ValueError):
    """An invite or remove names an invalid participant (already in, not in, or self)."""

    code = "participant"


class NotModeratorError(SessionError, PermissionError):
    """Only the session's moderator may invite or remove participants."""

    code = "not_moderator"


class MessageLostError(SessionError):
    """A reliable session gave up on a message: retransmission requests went unanswered."""

    code = "message_lost"

    def __init__(self, source: Name, message_id: int, *, session_id: int | None = None) -> None:
        super().__init__(f"message {message_id} from {source} was lost", session_id=session_id)
        self.source = source
        self.message_id = message_id


class DeliveryError(SlimError):
    """A reliable publish was not acknowledged by every recipient.

    ``report`` tells, per recipient, whether the message was delivered.
    """

    code = "delivery"

    def __init__(self, report: DeliveryReport) -> None:
        failed: Mapping[Name, str] = report.failed
        names = ", ".join(f"{n} ({why})" for n, why in failed.items())
        super().__init__(f"message {report.message_id} not delivered to: {names}")
        self.report = report

    @property
    def failed(self) -> Mapping[Name, str]:
        return self.report.failed


class DeliveryTimeoutError(DeliveryError, TimeoutError):
    """Every failed recipient ran out of retries (no acknowledgement arrived)."""

    code = "delivery_timeout"
