"""Upstream SLIM's Python bindings, v0.7 dialect (the sessions document).

Code written for ``slim_bindings`` 0.7 runs with its import changed to::

    import slim_agents.compat.v0_7 as slim_bindings

As v0.6 (see :mod:`slim_agents.compat.v0_6`) without the ``Py`` prefixes, and:

* ``Slim(name, provider, verifier)`` is a plain constructor;
* ``create_session(destination, config)`` returns ``(session, handle)``;
  ``await handle`` returns once the session is established;
* ``publish``, ``publish_to``, ``invite``, ``remove`` and ``delete_session``
  return a :class:`CompletionHandle` at once: ``await handle`` waits for the
  acknowledgements, the join, the removal or the close. A handle may be
  awaited once, as upstream's;
* ``get_message(timeout=None)`` and ``MessageContext.identity``.

Not implemented: the low-level ``App``, ``IdentityProvider.Spire``, JWKS
auto-resolution, OpenTelemetry export.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any

import anyio

from .._config import SessionConfig, SessionKind
from ._common import (
    Algorithm,
    IdentityProvider,
    IdentityVerifier,
    Key,
    KeyData,
    KeyFormat,
    MessageContext,
    Name,
    SessionType,
    SLIMTimeoutError,
    _ConfigBase,
    _Operation,
    _seconds,
    _SessionBase,
    _SlimBase,
    get_version,
    init_tracing,
    split_id,
)

__all__ = [
    "Algorithm",
    "CompletionHandle",
    "IdentityProvider",
    "IdentityVerifier",
    "Key",
    "KeyData",
    "KeyFormat",
    "MessageContext",
    "Name",
    "SLIMTimeoutError",
    "Session",
    "SessionConfiguration",
    "SessionType",
    "Slim",
    "get_version",
    "init_tracing",
    "split_id",
]

_CONSUMED = "CompletionHandle already consumed (wait can only be called once)"


class CompletionHandle:
    """The completion of an operation that has started: ``await handle`` once.

    It returns ``None`` when the operation succeeded and raises its error
    otherwise; awaiting it a second time raises ``RuntimeError``.
    """

    __slots__ = ("_consumed", "_wait")

    def __init__(self, wait: Callable[[], Awaitable[Any]]) -> None:
        self._wait = wait
        self._consumed = False

    async def wait(self) -> None:
        if self._consumed:
            raise RuntimeError(_CONSUMED)
        self._consumed = True
        await self._wait()

    async def wait_for(self, timeout: datetime.timedelta | float) -> None:  # noqa: ASYNC109
        """:meth:`wait` for at most ``timeout``; raises ``TimeoutError`` ("timed out")."""
        seconds = _seconds(timeout, "timeout")
        assert seconds is not None
        with anyio.move_on_after(seconds):
            await self.wait()
            return
        raise TimeoutError("operation timed out")

    def __await__(self) -> Generator[Any, None, None]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<CompletionHandle{' consumed' if self._consumed else ''}>"


class SessionConfiguration(_ConfigBase):
    """How to create a session; the destination is an argument of ``create_session``.

    Reliability (acks and retransmission) is on when both ``timeout`` and
    ``max_retries`` are set.
    """

    __slots__ = ()

    @classmethod
    def PointToPoint(cls, timeout: datetime.timedelta | None = None,
                     max_retries: int | None = None, mls_enabled: bool = False,
                     metadata: Mapping[str, str] | None = None) -> SessionConfiguration:
        return cls(SessionType.PointToPoint, None, timeout, max_retries, mls_enabled, metadata)

    @classmethod
    def Group(cls, timeout: datetime.timedelta | None = None, max_retries: int | None = None,
              mls_enabled: bool = False,
              metadata: Mapping[str, str] | None = None) -> SessionConfiguration:
        return cls(SessionType.Group, None, timeout, max_retries, mls_enabled, metadata)

    def _key(self) -> tuple[Any, ...]:
        return (self.session_type, self.timeout, self.max_retries, self.mls_enabled,
                self.metadata)

    def __hash__(self) -> int:
        return hash((self.session_type, self.timeout, self.max_retries, self.mls_enabled,
                     tuple(sorted(self.metadata.items()))))

    def __repr__(self) -> str:
        return (f"{self.session_type.value}(timeout={self.timeout}, max_retries="
                f"{self.max_retries}, mls_enabled={self.mls_enabled}, "
                f"metadata={self.metadata})")

    __str__ = __repr__


class Session(_SessionBase):
    """A session: from :meth:`Slim.create_session` or :meth:`Slim.listen_for_session`."""

    @property
    def session_config(self) -> SessionConfiguration:
        config = super().session_config
        assert isinstance(config, SessionConfiguration)
        return config

    def _config_from_native(self, config: SessionConfig, dst: Name | None
                            ) -> SessionConfiguration:
        timeout = None if config.timeout is None else \
            datetime.timedelta(seconds=config.timeout)
        kind = SessionType.Group if config.kind is SessionKind.GROUP else \
            SessionType.PointToPoint
        return SessionConfiguration(kind, None, timeout, config.max_retries,
                                    config.mls_enabled, config.metadata)

    async def publish(self, msg: bytes, payload_type: str | None = None,
                      metadata: Mapping[str, str] | None = None) -> CompletionHandle:
        """Send to the peer, or to every member of a group; the handle completes when
        every recipient acknowledged (at once for a best-effort session).

        :raises SessionClosedError: ("session closed ...") once the session is closed.
        """
        handle = await self._publish(msg, payload_type, metadata)
        return CompletionHandle(handle.wait)

    async def publish_to(self, message_ctx: MessageContext, msg: bytes,
                         payload_type: str | None = None,
                         metadata: Mapping[str, str] | None = None) -> CompletionHandle:
        """Reply to the sender of a received message."""
        handle = await self._publish(msg, payload_type, metadata, to=message_ctx)
        return CompletionHandle(handle.wait)

    async def invite(self, name: Name) -> CompletionHandle:
        """Start adding a participant (moderator of a group); the handle completes once
        every member knows it. An unset id means any instance."""
        native = await self._ready()
        target = name.to_native()
        op = await _Operation[Any].start(lambda: native.invite(target))
        return CompletionHandle(op.wait)

    async def remove(self, name: Name) -> CompletionHandle:
        """Start removing a participant; the handle completes once it has left."""
        native = await self._ready()
        target = name.to_native()
        op = await _Operation[Any].start(lambda: native.remove(target))
        return CompletionHandle(op.wait)

    async def get_message(self, timeout: datetime.timedelta | None = None  # noqa: ASYNC109
                          ) -> tuple[MessageContext, bytes]:
        """The next message and its context.

        :raises SessionClosedError: ("session closed ...") once the session is closed.
        :raises TimeoutError: ("receive timed out ...") after ``timeout``.
        """
        return await self._get_message(timeout)


class Slim(_SlimBase[Session]):
    """An app (upstream v0.7 ``Slim``): ``Slim(name, provider, verifier)``, then
    ``await slim.connect({...})``."""

    _session_type = Session

    async def create_session(self, destination: Name, session_config: SessionConfiguration
                             ) -> tuple[Session, CompletionHandle]:
        """Create a session with a peer (point-to-point) or on a channel (group).

        Returns at once; ``await handle`` returns once the session is
        established (the peer found and joined).
        """
        if not isinstance(session_config, SessionConfiguration):
            raise TypeError("session_config must be a SessionConfiguration")
        native, created = await self._start_session(destination, session_config)
        session = Session(native, created, session_config, destination)
        return session, CompletionHandle(created.wait)

    async def delete_session(self, session: Session) -> CompletionHandle:
        """Start closing a session; using it afterwards raises "session closed".
        The handle completes once the others were told.

        :raises SessionClosedError: if it was deleted or closed already.
        """
        session._mark_deleted()
        op = await _Operation[None].start(session.native.close)
        return CompletionHandle(op.wait)
