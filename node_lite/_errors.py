# The one exception tree of the project. node_lite owns the root because it
# may not import slim_agents; slim_agents extends the tree and re-exports it.
# Every error carries its data as attributes and a ``code`` that matches the
# wire error code where one exists.
from __future__ import annotations

from typing import Any


class SlimError(Exception):
    """Root of every error raised by node_lite and slim_agents."""

    code: str = "error"


class ProtocolError(SlimError):
    """A peer sent bytes that violate the wire format."""

    code = "malformed"


class FrameTooLargeError(ProtocolError):
    """A length prefix announced a frame above the configured maximum."""

    code = "frame_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class MalformedFrameError(ProtocolError, ValueError):
    """A frame is not a valid message: bad msgpack, wrong shape or wrong types."""

    code = "malformed"

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(f"malformed frame: {reason}" if field is None else
                         f"malformed frame: field {field!r}: {reason}")
        self.reason = reason
        self.field = field


class UnknownMessageTypeError(ProtocolError):
    """A well-formed frame carries a type tag this side does not know."""

    code = "unknown_type"

    def __init__(self, type_tag: object) -> None:
        super().__init__(f"unknown message type {type_tag!r}")
        self.type_tag = type_tag


class UnsupportedVersionError(ProtocolError):
    """A frame carries a protocol version this side does not speak."""

    code = "unsupported_version"

    def __init__(self, version: object) -> None:
        super().__init__(f"unsupported protocol version {version!r}")
        self.version = version


class LimitExceededError(ProtocolError):
    """A field or a resource exceeds a configured limit."""

    code = "limit_exceeded"

    def __init__(self, what: str, limit: int, value: int | None = None) -> None:
        detail = f" (got {value})" if value is not None else ""
        super().__init__(f"{what} exceeds the limit of {limit}{detail}")
        self.what = what
        self.limit = limit
        self.value = value


class ConfigError(SlimError, ValueError):
    """A configuration value or file is invalid."""

    code = "config"


class ConnectError(SlimError, ConnectionError):
    """A connection to a node could not be opened or was refused."""

    code = "connect"


class AuthenticationError(SlimError):
    """An identity token was refused."""

    code = "unauthenticated"

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(f"authentication failed: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


class NodeError(SlimError):
    """The node answered with an error frame."""

    code = "node"

    def __init__(self, code: str, message: str, **data: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class NoRouteError(NodeError, LookupError):
    """No subscriber for a destination name."""

    def __init__(self, destination: object, message: str | None = None) -> None:
        super().__init__("no_route", message or f"no matching found for {destination}")
        self.destination = destination
