"""Upstream SLIM's Python bindings, v0.6 dialect (the group communication tutorial).

Code written for ``slim_bindings`` 0.6 runs with its import changed to::

    import slim_agents.compat.v0_6 as slim_bindings

What differs from upstream:

* Names print as upstream's (hashes from the ``xxhash`` package when
  installed, else only the ``(org/ns/app/id)`` part); an app's instance id
  comes from its identity rather than at random.
* ``create_session`` returns at once; a point-to-point session finds its peer
  in the background and its first ``publish`` waits for that. ``invite`` and
  ``remove`` return once the member has joined or left.
* ``set_route`` is accepted (node_lite routes by subscriptions).
* ``run_server`` starts an in-process node_lite node and returns its bound
  ``host:port``.
* Not implemented: the low-level module functions (``create_pyservice``,
  ``publish(svc, ...)``, ...), ``PySession.set_session_config``, JWKS
  auto-resolution, OpenTelemetry export; ``set_default_session_config`` is
  accepted and has no effect (joiners take the moderator's settings).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

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
    _SessionBase,
    _SlimBase,
    get_version,
    init_tracing,
    split_id,
)

__all__ = [
    "PyAlgorithm",
    "PyIdentityProvider",
    "PyIdentityVerifier",
    "PyKey",
    "PyKeyData",
    "PyKeyFormat",
    "PyMessageContext",
    "PyName",
    "PySession",
    "PySessionConfiguration",
    "PySessionType",
    "SLIMTimeoutError",
    "Slim",
    "get_version",
    "init_tracing",
    "split_id",
]

PyName = Name
PyIdentityProvider = IdentityProvider
PyIdentityVerifier = IdentityVerifier
PyKey = Key
PyKeyData = KeyData
PyKeyFormat = KeyFormat
PyAlgorithm = Algorithm
PySessionType = SessionType
PyMessageContext = MessageContext


class PySessionConfiguration(_ConfigBase):
    """How to create a session: ``PySessionConfiguration.PointToPoint(peer_name=...)``
    or ``PySessionConfiguration.Group(channel_name=...)``.

    Reliability (acks and retransmission) is on when both ``timeout`` and
    ``max_retries`` are set.
    """

    __slots__ = ()

    @classmethod
    def PointToPoint(cls, peer_name: Name, timeout: datetime.timedelta | None = None,
                     max_retries: int | None = None, mls_enabled: bool = False,
                     metadata: Mapping[str, str] | None = None) -> PySessionConfiguration:
        return cls(SessionType.PointToPoint, peer_name, timeout, max_retries, mls_enabled,
                   metadata)

    @classmethod
    def Group(cls, channel_name: Name, max_retries: int | None = 0,
              timeout: datetime.timedelta | None = datetime.timedelta(milliseconds=1000),
              mls_enabled: bool = False,
              metadata: Mapping[str, str] | None = None) -> PySessionConfiguration:
        return cls(SessionType.Group, channel_name, timeout, max_retries, mls_enabled,
                   metadata)

    @property
    def peer_name(self) -> Name | None:
        return self.destination_name if self.session_type is SessionType.PointToPoint \
            else None

    @property
    def channel_name(self) -> Name | None:
        return self.destination_name if self.session_type is SessionType.Group else None


def _config_from_native(config: SessionConfig, dst: Name | None) -> PySessionConfiguration:
    timeout = None if config.timeout is None else datetime.timedelta(seconds=config.timeout)
    kind = SessionType.Group if config.kind is SessionKind.GROUP else SessionType.PointToPoint
    return PySessionConfiguration(kind, dst, timeout, config.max_retries, config.mls_enabled,
                                  config.metadata)


class PySession(_SessionBase):
    """A session (upstream ``PySession``): from :meth:`Slim.create_session` or
    :meth:`Slim.listen_for_session`."""

    @property
    def session_config(self) -> PySessionConfiguration:
        config = super().session_config
        assert isinstance(config, PySessionConfiguration)
        return config

    def _config_from_native(self, config: SessionConfig, dst: Name | None
                            ) -> PySessionConfiguration:
        return _config_from_native(config, dst)

    async def publish(self, msg: bytes, payload_type: str | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
        """Send to the peer, or to every member of a group.

        :raises SessionClosedError: ("session closed ...") once the session is closed.
        """
        await self._publish(msg, payload_type, metadata)

    async def publish_to(self, message_ctx: MessageContext, msg: bytes,
                         payload_type: str | None = None,
                         metadata: Mapping[str, str] | None = None) -> None:
        """Reply to the sender of a received message."""
        await self._publish(msg, payload_type, metadata, to=message_ctx)

    async def invite(self, name: Name) -> None:
        """Add a participant (moderator of a group); an unset id means any instance."""
        await (await self._ready()).invite(name.to_native())

    async def remove(self, name: Name) -> None:
        """Remove a participant (moderator of a group)."""
        await (await self._ready()).remove(name.to_native())

    async def get_message(self, timeout: datetime.timedelta | None = None  # noqa: ASYNC109
                          ) -> tuple[MessageContext, bytes]:
        """The next message and its context.

        :raises SessionClosedError: ("session closed ...") once the session is closed.
        :raises TimeoutError: ("receive timed out ...") after ``timeout`` (an extension).
        """
        return await self._get_message(timeout)

    async def recv(self) -> tuple[MessageContext, bytes]:
        """Alias of :meth:`get_message`."""
        return await self._get_message(None)

    async def delete(self) -> None:
        """Close this session (as ``Slim.delete_session``)."""
        self._mark_deleted()
        await self._native.close()


class Slim(_SlimBase[PySession]):
    """An app (upstream v0.6 ``Slim``): ``await Slim.new(name, provider, verifier)``,
    then ``await slim.connect({...})``."""

    _session_type = PySession

    @classmethod
    async def new(cls, name: Name, provider: IdentityProvider, verifier: IdentityVerifier,
                  local_service: bool = False) -> Slim:
        """Create the app (no network I/O: :meth:`connect` or :meth:`run_server` next)."""
        return cls(name, provider, verifier, local_service)

    async def create_session(self, session_config: PySessionConfiguration) -> PySession:
        """Create a session with ``session_config.peer_name`` or ``.channel_name``.

        Returns at once; a point-to-point session's first publish waits until
        the peer is found.
        """
        if not isinstance(session_config, PySessionConfiguration):
            raise TypeError("session_config must be a PySessionConfiguration")
        if session_config.destination_name is None:
            raise ValueError("the configuration names no peer or channel")
        native, created = await self._start_session(session_config.destination_name,
                                                    session_config)
        return PySession(native, created, session_config)

    async def delete_session(self, session: PySession) -> None:
        """Close a session; using it afterwards raises "session closed".

        :raises SessionClosedError: if it was deleted or closed already.
        """
        await session.delete()

    async def set_default_session_config(self, session_config: PySessionConfiguration
                                         ) -> None:
        """Accepted for compatibility: joiners take the creator's settings."""
        if not isinstance(session_config, PySessionConfiguration):
            raise TypeError("session_config must be a PySessionConfiguration")

