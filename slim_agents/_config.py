from __future__ import annotations

import datetime
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from node_lite import ConfigError

# Control messages are always reliable, as upstream: 1 s between tries, 10 tries.
DEFAULT_CONTROL_INTERVAL = 1.0
DEFAULT_CONTROL_RETRIES = 10
# Messages waiting in a session's inbox for get_message().
DEFAULT_MAX_INBOX = 10_000
# Group liveness, as upstream: the moderator pings every 10 s and a member silent
# for 3 intervals is offline; members that stop hearing the moderator for as long
# keep going for a minute (sending in the current epoch), then close.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_HEARTBEAT_MISSES = 3
DEFAULT_MODERATOR_GRACE = 60.0


class SessionKind(enum.Enum):
    """Point-to-point with one instance of a service, or a group on a channel."""

    POINT_TO_POINT = "point_to_point"
    GROUP = "group"


def _seconds(value: float | datetime.timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionConfig:
    """How a session behaves.

    Reliable delivery (acknowledgements, retransmission, ordering, exactly
    once) is on when both ``timeout`` (seconds per attempt) and
    ``max_retries`` are set, as upstream; otherwise delivery is best effort.
    ``metadata`` reaches the other side's ``session.metadata``.
    """

    kind: SessionKind = SessionKind.POINT_TO_POINT
    timeout: float | None = None
    max_retries: int | None = None
    mls_enabled: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    window: int = 2048
    max_inbox: int = DEFAULT_MAX_INBOX
    #: With ``mls_enabled``: ``"signature"`` signs every message (sender proof inside
    #: the group), ``"group"`` relies on the group key alone (trusted groups). The
    #: default signs in groups; a point-to-point session has one possible sender
    #: besides us, so the group key already proves it.
    sender_auth: str | None = None
    #: Groups only (set by the moderator, members follow it): the moderator pings
    #: the members this often (None: no heartbeats). A member that has not answered
    #: for ``heartbeat_misses`` intervals is offline: publishes report it
    #: ``unreachable`` at once instead of waiting for it.
    heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_misses: int = DEFAULT_HEARTBEAT_MISSES
    #: A member that has not heard the moderator for ``heartbeat_misses`` intervals
    #: sees ``moderator_lost``, goes on for this long, then closes ("moderator_lost").
    moderator_grace: float = DEFAULT_MODERATOR_GRACE
    #: Moderator policy: remove (and rekey without) a member as soon as it is offline.
    remove_offline: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, SessionKind):
            raise ConfigError(f"kind must be a SessionKind, got {self.kind!r}")
        object.__setattr__(self, "timeout", _seconds(self.timeout, "timeout"))
        if self.max_retries is not None and (
                isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int)
                or not 0 <= self.max_retries <= 1000):
            raise ConfigError(f"max_retries must be an integer in [0, 1000], got "
                              f"{self.max_retries!r}")
        if not isinstance(self.mls_enabled, bool):
            raise ConfigError("mls_enabled must be a boolean")
        if not isinstance(self.metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ConfigError("metadata must map strings to strings")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        if self.sender_auth not in (None, "signature", "group"):
            raise ConfigError(f"sender_auth must be 'signature' or 'group', got "
                              f"{self.sender_auth!r}")
        for attr in ("window", "max_inbox"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{attr} must be a positive integer")
        interval = _seconds(self.heartbeat_interval, "heartbeat_interval")
        if interval is not None and interval < 0.01:
            raise ConfigError("heartbeat_interval must be at least 0.01 s")
        object.__setattr__(self, "heartbeat_interval", interval)
        grace = _seconds(self.moderator_grace, "moderator_grace")
        if grace is None:
            raise ConfigError("moderator_grace must be a positive number of seconds")
        object.__setattr__(self, "moderator_grace", grace)
        misses = self.heartbeat_misses
        if isinstance(misses, bool) or not isinstance(misses, int) or not 1 <= misses <= 100:
            raise ConfigError(f"heartbeat_misses must be an integer in [1, 100], got "
                              f"{misses!r}")
        if not isinstance(self.remove_offline, bool):
            raise ConfigError("remove_offline must be a boolean")

    @property
    def reliable(self) -> bool:
        return self.timeout is not None and self.max_retries is not None

    @property
    def heartbeats(self) -> bool:
        """Whether this session tracks liveness (groups with an interval)."""
        return self.kind is SessionKind.GROUP and self.heartbeat_interval is not None

    @property
    def control_interval(self) -> float:
        return self.timeout if self.timeout is not None else DEFAULT_CONTROL_INTERVAL

    @property
    def control_retries(self) -> int:
        return self.max_retries if self.max_retries is not None else DEFAULT_CONTROL_RETRIES

    @classmethod
    def group(cls, **kwargs: object) -> SessionConfig:
        return cls(kind=SessionKind.GROUP, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def point_to_point(cls, **kwargs: object) -> SessionConfig:
        return cls(kind=SessionKind.POINT_TO_POINT, **kwargs)  # type: ignore[arg-type]
