from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields

from ._errors import ConfigError

# 1 MiB like NATS max_payload; upstream's gRPC frame limit is 4 MiB.
DEFAULT_MAX_FRAME_SIZE = 1 << 20
# Outbound backlog per connection before the slow-consumer policy applies (NATS uses 64 MiB).
DEFAULT_MAX_PENDING_BYTES = 8 << 20
DEFAULT_MAX_PENDING_FRAMES = 10_000
# A consumer that makes no write progress for this long is cut, as NATS does.
DEFAULT_WRITE_DEADLINE = 10.0
# Time allowed for the first frame (hello) on a new connection.
DEFAULT_HELLO_TIMEOUT = 5.0
DEFAULT_MAX_SUBSCRIPTIONS = 1_000
DEFAULT_MAX_NAME_COMPONENT = 256
DEFAULT_MAX_METADATA_ENTRIES = 64
DEFAULT_MAX_METADATA_VALUE = 4096
DEFAULT_MAX_TOKEN_SIZE = 8192
# Hop limit for frames crossing links, as upstream.
DEFAULT_TTL = 8
# Links ping this often and are dropped after three silent intervals.
DEFAULT_KEEPALIVE = 5.0
# A connection holding part of a frame that sends nothing for this long is closed.
DEFAULT_READ_TIMEOUT = 30.0
# Connections one node serves at once (inbound, any state); more are refused.
DEFAULT_MAX_CONNECTIONS = 10_000
# Inbound rate of an app connection: unlimited unless configured (the design's
# 5 000 frames/s would cap single-stream throughput, which benchmarks measure).
DEFAULT_RATE_BURST = 2.0


class RatePolicy(enum.Enum):
    """What a node does with an app connection that sends faster than its rate limit.

    PAUSE: the node stops reading the connection until its token bucket
    refills (backpressure; nothing is lost).
    DROP: publishes over the limit are dropped and the sender gets
    ``err rate_limited`` (at most one per second, with the count).
    """

    PAUSE = "pause"
    DROP = "drop"


class SlowConsumerPolicy(enum.Enum):
    """What a node does when a connection's outbound backlog is full.

    WAIT: the connection that produced the frame stops being read until the
    backlog drains or the write deadline cuts the slow consumer (flow control;
    a slow consumer only slows the senders that address it).
    DROP: the frame is dropped for that consumer and counted.
    DISCONNECT: the slow consumer is disconnected at once.
    """

    WAIT = "wait"
    DROP = "drop"
    DISCONNECT = "disconnect"


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Per-connection limits enforced by a node (and by clients on input)."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    max_pending_frames: int = DEFAULT_MAX_PENDING_FRAMES
    write_deadline: float = DEFAULT_WRITE_DEADLINE
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS
    max_name_component: int = DEFAULT_MAX_NAME_COMPONENT
    max_metadata_entries: int = DEFAULT_MAX_METADATA_ENTRIES
    max_metadata_value: int = DEFAULT_MAX_METADATA_VALUE
    max_token_size: int = DEFAULT_MAX_TOKEN_SIZE
    ttl: int = DEFAULT_TTL
    keepalive: float = DEFAULT_KEEPALIVE
    slow_consumer: SlowConsumerPolicy = SlowConsumerPolicy.WAIT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Token bucket per app connection: frames and bytes per second (inf = off),
    #: holding up to ``rate_burst`` seconds' worth.
    rate_frames: float = math.inf
    rate_bytes: float = math.inf
    rate_burst: float = DEFAULT_RATE_BURST
    rate_policy: RatePolicy = RatePolicy.PAUSE

    @property
    def rate_limited(self) -> bool:
        return math.isfinite(self.rate_frames) or math.isfinite(self.rate_bytes)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "slow_consumer":
                if not isinstance(value, SlowConsumerPolicy):
                    raise ConfigError(f"slow_consumer must be a SlowConsumerPolicy, got {value!r}")
                continue
            if f.name == "rate_policy":
                if not isinstance(value, RatePolicy):
                    raise ConfigError(f"rate_policy must be a RatePolicy, got {value!r}")
                continue
            # "not > 0" also refuses NaN
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"limit {f.name} must be a positive number, got {value!r}")
        if self.max_frame_size < 1024:
            raise ConfigError("max_frame_size must be at least 1024 bytes")
        if self.max_frame_size > 64 << 20:
            raise ConfigError("max_frame_size must be at most 64 MiB")
        if self.max_pending_bytes < self.max_frame_size:
            raise ConfigError("max_pending_bytes must be at least max_frame_size")
        if self.ttl > 255:
            raise ConfigError("ttl must be at most 255")
        if self.rate_burst < 1:
            raise ConfigError("rate_burst must be at least 1 (seconds of rate)")
        if self.rate_bytes * self.rate_burst < self.max_frame_size:
            # a bucket that cannot hold one full frame would refuse it forever
            raise ConfigError("rate_bytes * rate_burst must be at least max_frame_size")


#: The defaults, one shared instance (frozen): code left to them uses this one, so that
#: a check made under it holds for every app of a loop (see wire.SharedEnvelope).
DEFAULT_LIMITS = Limits()
