# Reliable delivery for one stream of one sender (sans-IO: `now` in, decisions out).
#
# Invariants:
# * A sender numbers its messages 1, 2, 3, ... per stream and keeps each one
#   until every recipient acknowledged it, a recipient is dropped, or its
#   retries run out. The window bounds how many are kept.
# * A receiver delivers each message id exactly once, in order. A message
#   ahead of the next expected id is held (bounded); the missing ids are
#   requested again after `timeout`, at most `max_retries` times, then
#   declared lost so that later messages are not held forever.
# * Acknowledgements are ranges of ids the receiver holds or delivered, so one
#   ack frame covers a whole batch.
# * A message is sent again only to recipients that went quiet: one that
#   acknowledged an earlier message within the last `timeout` is still working
#   through the queue ahead of it (TCP keeps order), and a copy would only add to
#   that queue. Resending to it anyway is how a slow group collapses into copies.
from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from node_lite import Name

T = TypeVar("T")
# Messages in flight per stream (upstream keeps 512; more keeps a fast link busy
# while acks travel), plus a byte bound.
DEFAULT_WINDOW = 2048
DEFAULT_WINDOW_BYTES = 8 << 20
# Messages held ahead of a gap per sender.
DEFAULT_MAX_HELD = 1024
# Ids beyond this distance ahead of the next expected one are refused outright.
MAX_AHEAD = 1 << 16
MAX_MID = 0xFFFF_FFFF


def to_ranges(mids: Iterable[int]) -> list[list[int]]:
    """Compress ids into sorted inclusive ``[lo, hi]`` ranges."""
    out: list[list[int]] = []
    for mid in sorted(set(mids)):
        if out and mid == out[-1][1] + 1:
            out[-1][1] = mid
        else:
            out.append([mid, mid])
    return out


@dataclass(slots=True)
class Pending(Generic[T]):
    """A sent message waiting for acknowledgements."""

    mid: int
    record: T
    size: int
    recipients: tuple[Name, ...]
    #: The stream's numbers of ``recipients``, in the same order.
    ids: tuple[int, ...]
    #: The numbers of the recipients yet to acknowledge it.
    waiting: set[int]
    deadline: float
    attempts: int = 0
    failed: dict[Name, str] = field(default_factory=dict)

    @property
    def delivered(self) -> tuple[Name, ...]:
        return tuple(r for r, i in zip(self.recipients, self.ids, strict=True)
                     if i not in self.waiting and r not in self.failed)


class SendStream(Generic[T]):
    """The sender side of a reliable stream."""

    def __init__(self, *, timeout: float, max_retries: int, window: int = DEFAULT_WINDOW,
                 window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self.timeout = timeout
        self.max_retries = max_retries
        self.window = window
        self.window_bytes = window_bytes
        self.next_mid = 1
        self.pending: dict[int, Pending[T]] = {}
        self.pending_bytes = 0
        self._timers: deque[tuple[float, int, int]] = deque()  # deadline, mid, attempt
        self.retransmissions = 0
        self._through: dict[Name, int] = {}  # recipient -> all up to this acknowledged
        # Recipients are numbered: a set of ints hashes in C, where a Name's hash is a
        # Python call, and a group's acks touch every message once per member.
        self._ids: dict[Name, int] = {}
        self._names: dict[int, Name] = {}
        self._next_id = 0
        self._last: tuple[tuple[Name, ...], tuple[int, ...]] = ((), ())
        # recipient number -> (when, highest id) of its last acknowledgement that counted
        self._heard: dict[int, tuple[float, int]] = {}

    def has_room(self) -> bool:
        return len(self.pending) < self.window and self.pending_bytes < self.window_bytes

    def allocate(self) -> int:
        """The id of the next message."""
        mid = self.next_mid
        if mid > MAX_MID:
            raise OverflowError("a stream carries at most 2**32 - 1 messages")
        self.next_mid += 1
        return mid

    def track(self, mid: int, record: T, size: int, recipients: Iterable[Name],
              now: float, unreachable: Collection[Name] = ()) -> Pending[T] | None:
        """Remember a sent message until its recipients acknowledge it.

        Recipients in ``unreachable`` fail at once (known to be offline). Returns
        ``None`` when there is nobody to wait for, and a message not kept (its
        ``waiting`` empty) when every recipient failed.
        """
        names = tuple(recipients)
        if not names:
            return None
        if names is self._last[0]:  # the session's recipients, unchanged
            ids = self._last[1]
        else:
            ids = tuple(self._id(name) for name in names)
            self._last = (names, ids)
        p = Pending(mid, record, size, names, ids, set(ids), now + self.timeout)
        if unreachable:
            for name, i in zip(names, ids, strict=True):
                if name in unreachable:
                    p.waiting.discard(i)
                    p.failed[name] = "unreachable"
            if not p.waiting:
                return p
        self.pending[mid] = p
        self.pending_bytes += size
        self._timers.append((p.deadline, mid, 0))
        return p

    def _id(self, name: Name) -> int:
        i = self._ids.get(name)
        if i is None:
            i = self._ids[name] = self._next_id
            self._next_id += 1
            self._names[i] = name
        return i

    def ack(self, recipient: Name, mids: Iterable[int], now: float) -> list[Pending[T]]:
        """Record acknowledgements; returns the messages now complete."""
        done: list[Pending[T]] = []
        r = self._ids.get(recipient)
        if r is None:
            return done  # no message waits for it
        pending = self.pending
        top = 0
        for mid in mids:
            p = pending.get(mid)
            if p is None:
                continue
            waiting = p.waiting
            n = len(waiting)
            waiting.discard(r)
            if len(waiting) < n:
                if mid > top:
                    top = mid
                if not waiting:  # finished (inline: once per message)
                    del pending[mid]
                    self.pending_bytes -= p.size
                    done.append(p)
        if top:
            heard = self._heard.get(r)
            self._heard[r] = (now, top if heard is None or top > heard[1] else heard[1])
        return done

    def ack_ranges(self, recipient: Name, ranges: Iterable[Iterable[int]], now: float,
                   limit: int = 1 << 20) -> list[Pending[T]]:
        """:meth:`ack` of inclusive ``[lo, hi]`` ranges; ranges past the first ``limit``
        ids looked at are ignored (a peer's frame must not buy unbounded work)."""
        pending = self.pending
        mids: list[int] = []
        looked = 0
        for lo, hi in ranges:
            if looked >= limit:
                break
            if hi - lo < len(pending):
                mids.extend(range(lo, hi + 1))
                looked += hi - lo + 1
            else:  # a range wider than what is pending: walk the pending ids instead
                mids.extend([m for m in pending if lo <= m <= hi])
                looked += len(pending)
        return self.ack(recipient, mids, now)

    def ack_through(self, recipient: Name, last: int, now: float) -> list[Pending[T]]:
        """Record that ``recipient`` has every message up to ``last``; returns those
        now complete. A later acknowledgement so stands in for a lost one.

        Only ids above the recipient's previous ``last`` are looked at: in a group,
        messages it acknowledged stay pending for the others.
        """
        first = self._through.get(recipient, 0) + 1
        if last < first:
            return []
        self._through[recipient] = last
        pending = self.pending
        if last - first < len(pending):
            mids: Iterable[int] = [m for m in range(first, last + 1) if m in pending]
        else:
            mids = [m for m in pending if first <= m <= last]
        return self.ack(recipient, mids, now)

    def drop_recipient(self, recipient: Name, reason: str) -> list[Pending[T]]:
        """Stop waiting for a recipient (it left); returns the messages now complete."""
        self._through.pop(recipient, None)
        r = self._ids.pop(recipient, None)
        done: list[Pending[T]] = []
        if r is None:
            return done
        del self._names[r]
        self._heard.pop(r, None)
        self._last = ((), ())
        for mid, p in list(self.pending.items()):
            if r in p.waiting:
                p.waiting.discard(r)
                p.failed[recipient] = reason
                if not p.waiting:
                    done.append(self._finish(mid))
        return done

    def abandon(self, reason: str) -> list[Pending[T]]:
        """Stop waiting for anything (the session closed): every pending message, with
        the recipients that had not acknowledged it failed for ``reason``."""
        names = self._names
        done = list(self.pending.values())
        for p in done:
            for r in p.waiting:
                p.failed[names[r]] = reason
            p.waiting.clear()
        self.pending.clear()
        self.pending_bytes = 0
        return done

    def _finish(self, mid: int) -> Pending[T]:
        p = self.pending.pop(mid)
        self.pending_bytes -= p.size
        return p

    def get_timer(self) -> float | None:
        while self._timers:
            deadline, mid, attempt = self._timers[0]
            p = self.pending.get(mid)
            if p is not None and p.attempts == attempt:
                return deadline
            self._timers.popleft()  # stale: acked or rescheduled
        return None

    def due(self, now: float) -> tuple[list[tuple[Pending[T], list[Name]]], list[Pending[T]]]:
        """Messages to send again, each with the recipients to send it to, and
        messages that ran out of retries (complete, with their failures)."""
        resend: list[tuple[Pending[T], list[Name]]] = []
        expired: list[Pending[T]] = []
        timers = self._timers
        heard = self._heard
        names = self._names
        recent = now - self.timeout
        while timers and timers[0][0] <= now:
            _, mid, attempt = timers.popleft()
            p = self.pending.get(mid)
            if p is None or p.attempts != attempt:
                continue
            quiet = []
            for r in p.waiting:
                h = heard.get(r)
                # Busy on earlier messages: this one is queued behind them.
                if h is None or h[0] <= recent or h[1] > mid:
                    quiet.append(r)
            if quiet and p.attempts >= self.max_retries:
                for r in quiet:
                    p.waiting.discard(r)
                    p.failed[names[r]] = "timeout"
                if not p.waiting:
                    expired.append(self._finish(mid))
                    continue
                quiet = []
            p.deadline = now + self.timeout
            if quiet:
                p.attempts += 1
                self.retransmissions += 1
                resend.append((p, [names[r] for r in quiet]))
            timers.append((p.deadline, mid, p.attempts))
        return resend, expired

    def lookup(self, mid: int) -> Pending[T] | None:
        return self.pending.get(mid)


class ReceiveStream(Generic[T]):
    """The receiver side of one sender's reliable stream."""

    def __init__(self, *, timeout: float, max_retries: int, first: int = 1,
                 max_held: int = DEFAULT_MAX_HELD) -> None:
        self.timeout = timeout
        self.max_retries = max_retries
        self.next = first
        self.max_held = max_held
        self.held: dict[int, T] = {}
        self.missing: dict[int, list[float]] = {}  # mid -> [attempts, deadline]
        self.to_ack: list[int] = []
        self.new_gaps: list[int] = []
        self.lost_ids: set[int] = set()
        self.first_lost: int | None = None  # lowest id given up on
        self.duplicates = 0
        self.lost_count = 0

    def receive(self, mid: int, item: T, now: float) -> list[T] | None:
        """Accept a message; returns the items now deliverable in order.

        ``None`` means the message was refused (too far ahead or the hold
        buffer is full): it is not acknowledged, so the sender will retry.
        """
        nxt = self.next
        if mid < nxt or mid in self.held or mid in self.lost_ids:
            self.duplicates += 1
            self.to_ack.append(mid)
            return []
        if mid == nxt:
            self.to_ack.append(mid)
            out = [item]
            self.next = nxt + 1
            if self.held or self.lost_ids:
                self._advance(out)
            self.missing.pop(mid, None)
            return out
        if not self.has_room(mid):
            return None
        self.held[mid] = item
        self.to_ack.append(mid)
        self.missing.pop(mid, None)
        for gap in range(nxt, mid):
            if gap not in self.held and gap not in self.missing:
                self.missing[gap] = [0, now + self.timeout]
                self.new_gaps.append(gap)
        return []

    def take_next(self, mid: int) -> bool:
        """:meth:`receive` of the next id with nothing held, missing or lost (the
        common case, once per message and member in a group): True when taken, the
        message then being deliverable at once; False, with nothing done, otherwise."""
        if mid != self.next or self.held or self.missing or self.lost_ids:
            return False
        self.next = mid + 1
        self.to_ack.append(mid)
        return True

    def seen(self, mid: int) -> bool:
        """Whether ``mid`` was received (or given up) already."""
        return mid < self.next or mid in self.held or mid in self.lost_ids

    def has_room(self, mid: int) -> bool:
        """Whether :meth:`receive` would take ``mid`` now (or deliver it at once)."""
        return mid == self.next or (mid - self.next <= MAX_AHEAD
                                    and len(self.held) < self.max_held)

    def take_acks(self) -> list[int]:
        acks, self.to_ack = self.to_ack, []
        return acks

    @property
    def received_through(self) -> int:
        """The highest id up to which every message arrived (0: none). Ids given up
        on stop it: the sender must not count them as delivered."""
        last = self.next - 1
        if self.first_lost is not None and self.first_lost <= last:
            last = self.first_lost - 1
        return last

    def take_new_gaps(self) -> list[int]:
        gaps, self.new_gaps = self.new_gaps, []
        return [g for g in gaps if g in self.missing]

    def get_timer(self) -> float | None:
        return min((d for _, d in self.missing.values()), default=None)

    def due(self, now: float) -> tuple[list[int], list[int], list[T]]:
        """Ids to request again, ids given up as lost, and items released by giving up."""
        again: list[int] = []
        lost: list[int] = []
        for mid, state in list(self.missing.items()):
            if state[1] > now:
                continue
            if state[0] >= self.max_retries:
                lost.append(mid)
            else:
                state[0] += 1
                state[1] = now + self.timeout
                again.append(mid)
        released = self.give_up(lost) if lost else []
        return again, lost, released

    def give_up(self, mids: Iterable[int]) -> list[T]:
        """Declare ids lost (the sender no longer has them); returns items released."""
        gone = {m for m in mids if m >= self.next and m not in self.held}
        out: list[T] = []
        for mid in gone:
            self.missing.pop(mid, None)
        self.lost_count += len(gone)
        self.lost_ids |= gone
        if gone:
            low = min(gone)
            if self.first_lost is None or low < self.first_lost:
                self.first_lost = low
        self._advance(out)
        return out

    def _advance(self, out: list[T]) -> None:
        nxt = self.next
        held, lost = self.held, self.lost_ids
        while True:
            if nxt in held:
                out.append(held.pop(nxt))
            elif nxt in lost:
                lost.discard(nxt)
            else:
                break
            nxt += 1
        self.next = nxt

    def statistics(self) -> dict[str, Any]:
        return {"next": self.next, "held": len(self.held), "missing": len(self.missing),
                "duplicates": self.duplicates, "lost": self.lost_count}
