# The anyio face of a session: awaitable operations over a SessionCore.
from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from node_lite import Name
from node_lite._util import Wakeup

from ._config import SessionConfig, SessionKind
from ._errors import SessionClosedError
from ._reports import DeliveryReport, Message, MessageContext, Ticket
from ._session_core import SessionCore, State, WindowFull
from ._session_e2e import Encryption

if TYPE_CHECKING:
    from ._app import App

R = TypeVar("R")
# get_message() yields to the event loop at least this often when messages are waiting.
_YIELD_EVERY = 1024
# What a publish awaits after App._published (0: nothing).
FLUSH = 1
FLUSH_ALONE = 2


class Handle(Generic[R]):
    """Completion of an operation: ``await handle`` returns its result or raises its error.

    It may be awaited any number of times; :attr:`done` tells without waiting.
    """

    __slots__ = ("_app", "_ticket")

    def __init__(self, app: App, ticket: Ticket) -> None:
        self._app = app
        self._ticket = ticket

    @property
    def done(self) -> bool:
        return self._ticket.resolved

    def result(self) -> R:
        """The result of a finished operation (raises its error; ``RuntimeError`` if pending)."""
        t = self._ticket
        if not t.resolved:
            raise RuntimeError("the operation has not finished")
        if t.error is not None:
            raise t.error
        result: R = t.result
        return result

    async def wait(self) -> R:
        """Wait for the operation to finish (cancellable; the operation goes on)."""
        t = self._ticket
        if not t.resolved:
            if t.waiter is None:
                t.waiter = anyio.Event()
            await t.waiter.wait()
        else:
            await anyio.lowlevel.checkpoint()
        return self.result()

    def __await__(self) -> Any:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<Handle {self._ticket!r}>"


class Session:
    """A session seen from one app: point-to-point with a peer, or a group on a channel.

    Obtained from :meth:`App.create_session` or :meth:`App.listen_for_session`.
    """

    def __init__(self, app: App, core: SessionCore) -> None:
        self._app = app
        self._core = core
        self._inbox_wakeup = Wakeup()
        # Called when messages arrive (the agent layer takes what it can at once).
        self._on_inbox: Callable[[], None] | None = None
        self._window_wakeup = Wakeup()
        self._roster_wakeup = Wakeup()
        self._unreachable: set[Callable[[], None]] = set()
        self._room_wakeup = Wakeup()
        self._lost_wakeup = Wakeup()
        self._gets = 0
        self._managed = False  # created by a controller command

    # -- properties (names follow the seeds) ---------------------------------------------

    @property
    def id(self) -> int:
        return self._core.sid

    @property
    def kind(self) -> SessionKind:
        return self._core.kind

    @property
    def config(self) -> SessionConfig:
        return self._core.config

    @property
    def src(self) -> Name:
        """This app's full name."""
        return self._core.local

    @property
    def dst(self) -> Name | None:
        """The peer's full name (point-to-point) or the channel (group)."""
        return self._core.channel if self._core.group else self._core.peer

    @property
    def metadata(self) -> Mapping[str, str]:
        return self._core.metadata

    @property
    def participants(self) -> list[Name]:
        """Every member, this app included (the moderator first)."""
        return self._core.roster

    @property
    def moderator(self) -> Name | None:
        m = self._core.moderator
        return m.name if m is not None else None

    @property
    def is_moderator(self) -> bool:
        return self._core.is_moderator

    @property
    def offline(self) -> list[Name]:
        """Members this side no longer waits for: they stopped answering heartbeats (or,
        at a member, the moderator stopped sending them). Publishes report them
        ``unreachable`` until they are heard again."""
        return sorted(self._core.offline, key=str)

    @property
    def moderator_lost(self) -> bool:
        """A member has not heard the moderator for ``heartbeat_misses`` intervals.

        Sending goes on; the session closes (``"moderator_lost"``) after
        ``moderator_grace`` unless the moderator is heard again.
        """
        return self._core.moderator_lost

    @property
    def is_closed(self) -> bool:
        return self._core.state is State.CLOSED

    @property
    def close_reason(self) -> str | None:
        return self._core.close_reason

    @property
    def encryption(self) -> Encryption | None:
        """End-to-end encryption as this member sees it (None when off or not yet joined):
        epoch, epoch authenticator, sender authentication and credential bindings."""
        return self._core.encryption

    # -- sending -------------------------------------------------------------------------

    async def publish(self, payload: bytes, *, payload_type: str | None = None,
                      metadata: Mapping[str, str] | None = None) -> Handle[DeliveryReport]:
        """Send to the peer, or to every other member of a group.

        Returns once the message is queued (waiting while the reliable window
        is full). ``await`` the returned handle for the delivery report; it
        raises :class:`DeliveryError` naming who did not get the message.

        :raises SessionClosedError: if the session is closed.
        """
        return await self._publish(payload, payload_type, metadata, None, None)

    async def publish_to(self, target: MessageContext | Name, payload: bytes, *,
                         payload_type: str | None = None,
                         metadata: Mapping[str, str] | None = None) -> Handle[DeliveryReport]:
        """Send to one member (a reply to a received message's source, or a name).

        In a point-to-point session this is :meth:`publish`.
        """
        if isinstance(target, MessageContext):
            return await self._publish(payload, payload_type, metadata, target.source_name,
                                       target)
        return await self._publish(payload, payload_type, metadata, target, None)

    async def _publish(self, payload: bytes, payload_type: str | None,
                       metadata: Mapping[str, str] | None, to: Name | None,
                       reply_to: MessageContext | None) -> Handle[DeliveryReport]:
        if type(payload) is not bytes:
            if not isinstance(payload, bytes | bytearray | memoryview):
                raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
            payload = bytes(payload)
        app = self._app
        if app.instrument is not None:
            metadata = app.instrument.publish(self, len(payload), metadata, reply_to)
        core = self._core
        while True:
            conn = app._conn
            if conn is not None and conn.outbox.pending_bytes >= app.limits.max_pending_bytes:
                await conn.outbox.wait_drained()
            try:
                sent_at = time.time()  # App._now, without the call
                ticket = core.publish(payload, sent_at, payload_type=payload_type,
                                      metadata=metadata, to=to)
                break
            except WindowFull:
                await self._window_wakeup.wait()
        # The only deadline a publish adds is its retransmission's (a key refresh it
        # starts registers its own, see AppCore.timers_changed).
        timeout = core.config.timeout
        soonest = math.inf if timeout is None else sent_at + timeout
        step = app._published(core, soonest)
        if step:
            await app._flush()
            if step == FLUSH_ALONE:
                return Handle(app, ticket)
        self._gets += 1
        if self._gets % _YIELD_EVERY == 0:
            # A real checkpoint now and then lets the writer and others run;
            # in between, a publish that did not wait costs no scheduling.
            await anyio.lowlevel.checkpoint()
        return Handle(app, ticket)

    # -- receiving -----------------------------------------------------------------------

    async def get_message(self) -> Message:
        """The next message, in order per sender in a reliable session.

        Bound the wait with a cancel scope (``anyio.fail_after``).

        :raises MessageLostError: in place of a message a reliable session gave up on
            (call again for the next one).
        :raises SessionClosedError: once the session is closed and no message is left.
        """
        core = self._core
        while True:
            if core.inbox:
                self._gets += 1
                if self._gets % _YIELD_EVERY == 0:
                    # Before taking the message: a cancellation here loses nothing.
                    await anyio.lowlevel.checkpoint()
                    if not core.inbox:
                        continue
                item = core.inbox.popleft()
                room = self._room_wakeup  # _taken, inline: once per message
                if room.waiting and len(core.inbox) <= core.config.max_inbox // 2:
                    room.fire()
                if isinstance(item, BaseException):
                    raise item
                if self._app.instrument is not None:
                    return self._app.instrument.deliver(self, item)
                return item
            if core.state is State.CLOSED:
                raise SessionClosedError(core.sid, core.close_reason or "closed")
            await self._inbox_wakeup.wait()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.get_message()
            except SessionClosedError:
                return

    # -- membership ----------------------------------------------------------------------

    def start_invite(self, name: Name | str) -> Handle[Name]:
        """Begin adding a participant; the handle completes as :meth:`invite` returns."""
        target = Name.parse(name) if isinstance(name, str) else name
        ticket = self._core.invite(target, self._app._now())
        self._app._after(self._core)
        return Handle(self._app, ticket)

    def start_remove(self, name: Name | str) -> Handle[Any]:
        """Begin removing a participant; the handle completes once it has left."""
        target = Name.parse(name) if isinstance(name, str) else name
        ticket = self._core.remove(target, self._app._now())
        self._app._after(self._core)
        return Handle(self._app, ticket)

    def start_close(self) -> Handle[Any]:
        """Begin closing; the handle completes once the others were told."""
        ticket = self._core.close(self._app._now())
        self._app._after(self._core)
        return Handle(self._app, ticket)

    async def invite(self, name: Name | str) -> Name:
        """Add a participant (moderator only); returns its full name once every member has it.

        :raises NotModeratorError, ParticipantError, SessionRejectedError,
            SessionTimeoutError, NoRouteError: when the invite cannot complete.
        """
        target = Name.parse(name) if isinstance(name, str) else name
        with self._operation("slim invite", target):
            ticket = self._core.invite(target, self._app._now())
            self._app._after(self._core)
            added: Name = await Handle[Name](self._app, ticket)
        return added

    async def remove(self, name: Name | str) -> None:
        """Remove a participant (moderator only); returns once it has left."""
        target = Name.parse(name) if isinstance(name, str) else name
        with self._operation("slim remove", target):
            ticket = self._core.remove(target, self._app._now())
            self._app._after(self._core)
            await Handle[Any](self._app, ticket)

    def _operation(self, name: str, target: Name | None = None) -> AbstractContextManager[Any]:
        inst = self._app.instrument
        if inst is None:
            return nullcontext()
        attributes: dict[str, Any] = {"slim.app": str(self.src), "slim.session.id": self.id,
                                      "messaging.destination.name": str(self.dst)}
        if target is not None:
            attributes["slim.participant"] = str(target)
        return inst.operation(name, attributes)

    async def close(self) -> None:
        """Close the session; members (or the peer) are told. Closing twice is harmless.

        Without a connection to the node nobody can be told: the session then
        closes here at once (also when the connection drops while waiting).
        """
        core = self._core
        if core.state is State.CLOSED and core._close_ticket is None:
            return
        app = self._app
        ticket = core.close(app._now())
        app._after(core)
        if not ticket.resolved and not app.connected:
            core._finish_close("closed", app._now())  # (a lost connection does the same)
            app._pump()
        with self._operation("slim close"):
            try:
                await Handle[Any](app, ticket)
            except SessionClosedError:
                pass

    async def rotate_keys(self, *, suspect: bool = False) -> None:
        """Renew the end-to-end keys.

        The moderator starts a new epoch from fresh secrets sealed to every member
        (it also does so every hour, every 10 000 messages and after each removal).
        A member sends the moderator a new envelope key for the next epoch;
        ``suspect=True`` asks for that epoch at once (the member's keys may have leaked).

        :raises SessionError: when the session is not end-to-end encrypted.
        """
        ticket = self._core.rotate_keys(self._app._now(), suspect=suspect)
        self._app._after(self._core)
        await Handle[Any](self._app, ticket)

    async def wait_moderator_lost(self) -> None:
        """Wait until this member stops hearing the moderator (see :attr:`moderator_lost`).

        :raises SessionClosedError: if the session closes first.
        """
        while not self._core.moderator_lost:
            if self._core.state is State.CLOSED:
                raise SessionClosedError(self.id, self._core.close_reason or "closed")
            await self._lost_wakeup.wait()

    async def wait_closed(self) -> str:
        """Wait until the session is closed (by anyone); returns the reason."""
        while self._core.state is not State.CLOSED:
            await self._inbox_wakeup.wait()
        return self._core.close_reason or "closed"

    async def wait_participants(self, count: int) -> list[Name]:
        """Wait until the roster has at least ``count`` members."""
        while len(self._core.roster) < count:
            if self._core.state is State.CLOSED:
                raise SessionClosedError(self.id, self._core.close_reason or "closed")
            await self._roster_wakeup.wait()
        return self.participants

    async def watch_roster(self) -> AsyncIterator[tuple[list[Name], list[Name]]]:
        """Yield ``(added, removed)`` each time the roster changes, until the session closes."""
        seen = list(self._core.roster)
        while self._core.state is not State.CLOSED:
            await self._roster_wakeup.wait()
            now = list(self._core.roster)
            added = [n for n in now if n not in seen]
            removed = [n for n in seen if n not in now]
            seen = now
            if added or removed:
                yield added, removed

    # -- driver hooks --------------------------------------------------------------------

    async def _wait_inbox_room(self) -> None:
        core = self._core
        while len(core.inbox) > core.config.max_inbox // 2 and core.state is not State.CLOSED:
            await self._room_wakeup.wait()

    def _wake_inbox(self) -> None:
        self._inbox_wakeup.fire()
        if self._on_inbox is not None:
            self._on_inbox()

    def _drain(self, consume: Callable[[Message], bool]) -> None:
        """Hand the leading queued messages to ``consume`` at once (no task switch),
        while it takes them (returns True); errors and the rest stay for get_message."""
        core = self._core
        inbox = core.inbox
        took = False
        while inbox:
            item = inbox[0]
            if isinstance(item, BaseException) or not consume(item):
                break
            inbox.popleft()
            took = True
        if took:
            self._taken()

    def _taken(self) -> None:
        # The inbox shrank: a read loop paused on it may go on once it is half empty.
        core = self._core
        if self._room_wakeup.waiting and len(core.inbox) <= core.config.max_inbox // 2:
            self._room_wakeup.fire()

    def on_unreachable(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the node reports no route to this point-to-point
        session's peer (it may have restarted under a new instance id).

        Returns a function that removes the callback. Retries go on regardless.
        """
        self._unreachable.add(callback)
        return lambda: self._unreachable.discard(callback)

    def _peer_unreachable(self) -> None:
        for callback in list(self._unreachable):
            callback()

    def statistics(self) -> dict[str, Any]:
        core = self._core
        return {"id": core.sid, "state": core.state.value, "members": len(core.members),
                "published": core.published, "received": core.received,
                "inbox": len(core.inbox), "dropped": core.dropped,
                "offline": len(core.offline), "moderator_lost": core.moderator_lost,
                "retransmissions": core._send.retransmissions if core._send else 0,
                "acks_pending": len(core._send.pending) if core._send else 0,
                # copies received of what was already here: a high count means
                # senders resend before their acks arrive
                "duplicates": sum(r.duplicates for streams in (core._recv, core._recv_direct)
                                  for r in streams.values())}

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.kind.value} {self._core.state.value} dst={self.dst}>"
