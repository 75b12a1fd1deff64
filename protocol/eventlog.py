"""The session's event log: the numbered server messages a reconnecting client resumes from.

`EventLog` is the small interface a session writes to (append, read after a seq, trim, oldest and
last seq); `MemoryEventLog` is the bounded in-process implementation. A log holds a contiguous run
of seqs ``oldest_seq..last_seq`` (empty when ``oldest_seq == last_seq + 1``); events leave it from
the front only, by eviction (its window, or the server-wide `LogBudget`) or by `trim` (client
ack). It never renumbers anything and never does I/O: a Redis Streams implementation lives with
the server, behind the same interface.

The window (PROTOCOL.md §2): a `MemoryEventLog` keeps at least the last ``capacity`` events
(``replay_events``) and at least the last ``max_bytes`` of them by encoded size (``replay_bytes``),
whichever holds more. Sizes come from `encoded_size`: exact for everything but a delta, whose size
is counted from its fields without encoding it (its seq as one digit, its text as one byte per
character: never more than the real size, so the window always holds at least ``max_bytes`` of
real frames, and a little more where seqs are long or text is escaped or not ASCII).

A `LogBudget` bounds what many logs hold together (an estimate of their memory, `memory_cost`).
Past its bound it sheds events from the front of the logs its ``order`` names, oldest first, until
it is back under a low-water mark. Shedding never makes a replay partial: a read that would need a
shed event returns ``None``, as for any evicted event, and the client gets a new session.

`append` runs once per streamed token, so `MemoryEventLog` keeps it to a few attribute operations,
and holds a delta as a plain ``(id, text)`` tuple (its seq is its place in the run), rebuilt as a
`Delta` only when read (`after`; `append_delta` takes those fields without a model at all): a tuple of strings is a few dozen bytes, and one the garbage
collector stops tracking, where a logged model kept a few tracked objects per token that every
full collection walked, for as long as the session lived.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Protocol, runtime_checkable

from protocol.codec import encode
from protocol.messages import Delta, LoggedMessage

__all__ = ["EventLog", "LogBudget", "MemoryEventLog", "Sheddable", "encoded_size", "memory_cost"]

# len('{"type":"delta","id":"","seq":1,"text":""}'): a delta's frame with a one-digit seq.
_DELTA_FRAME = 42
# What a logged event costs in memory beyond its encoded size, roughly (CPython 3.11, pydantic 2):
# a delta's tuple, its text's header and its two deque slots ~80 B, a model (a done with its usage
# and timings) ~2 KB.
_DELTA_OVERHEAD = 80
_OTHER_OVERHEAD = 2048

# How a delta is held: its request id and text (its seq is its place in the log).
_HeldDelta = tuple[str, str]


@runtime_checkable
class EventLog(Protocol):
    """Where a session's numbered events are kept for replay."""

    def append(self, event: LoggedMessage) -> None:
        """Add the next event; its ``seq`` must be ``last_seq + 1``."""
        ...

    def after(self, seq: int) -> list[LoggedMessage] | None:
        """Every event with ``seq > seq``, in order: ``[]`` when there is none newer, ``None`` when
        some of them are no longer held (evicted or trimmed), so the list could not be complete."""
        ...

    def trim(self, upto: int) -> None:
        """Drop the events with ``seq <= upto`` (the client has them). Beyond `last_seq` is clamped."""
        ...

    @property
    def oldest_seq(self) -> int:
        """Seq of the oldest event held; ``last_seq + 1`` when none is held."""
        ...

    @property
    def last_seq(self) -> int:
        """Seq of the newest event ever appended; 0 before the first."""
        ...


@runtime_checkable
class DeltaLog(EventLog, Protocol):
    """An `EventLog` that also takes a delta as its fields (`Session.numbered_delta`'s hot path:
    no model built per token)."""

    def append_delta(self, request_id: str, seq: int, text: str) -> None:
        """`append` of ``Delta(id=request_id, seq=seq, text=text)``."""
        ...


def encoded_size(event: LoggedMessage) -> int:
    """The size of ``event``'s JSON frame in bytes (for a delta, a close lower bound: see the
    module doc)."""
    if type(event) is Delta:
        return _DELTA_FRAME + len(event.id) + len(event.text)
    return len(encode(event).encode())


def memory_cost(event: LoggedMessage, size: int) -> int:
    """An estimate of the memory ``event`` (of encoded ``size``) holds while it is logged."""
    if type(event) is Delta:
        return size + _DELTA_OVERHEAD
    return _model_cost(size)


def _held_cost(held: LoggedMessage | _HeldDelta, size: int) -> int:
    return size + _DELTA_OVERHEAD if type(held) is tuple else _model_cost(size)


def _model_cost(size: int) -> int:
    # Numbers and lists (an embedding's floats) take about twice their text as Python objects.
    return 2 * size + _OTHER_OVERHEAD


class Sheddable(Protocol):
    """What a `LogBudget` sheds from: a log that says what it holds of the budget and gives the
    oldest of it up (`MemoryEventLog`; in cluster mode also a session's log in Redis)."""

    @property
    def held_cost(self) -> int: ...

    def shed(self, cost: int) -> int: ...


class LogBudget:
    """A bound on what many `MemoryEventLog` hold together, in `memory_cost` bytes.

    ``order()`` names the logs to shed from, in the order to shed them (whoever owns the logs
    decides: the server's registry puts detached sessions first). When a charge takes `held` past
    ``max_bytes``, events leave the front of those logs until `held` is at most ``low_water`` (by
    default seven eighths of the bound, so that a busy server does not reclaim on every event).
    """

    __slots__ = ("held", "low_water", "max_bytes", "order", "reclaims", "shed_events")

    def __init__(
        self,
        max_bytes: int,
        order: Callable[[], Iterable[Sheddable]],
        *,
        low_water: int | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.low_water = max_bytes * 7 // 8 if low_water is None else min(low_water, max_bytes)
        self.order = order
        self.held = 0
        # Events shed so far, and how many times the bound was reached (for metrics and logs).
        self.shed_events = 0
        self.reclaims = 0

    def charge(self, cost: int) -> None:
        self.held += cost
        if self.held > self.max_bytes:
            self.reclaim()

    def reclaim(self) -> None:
        """Shed events, in ``order``, until `held` is at most ``low_water``."""
        self.reclaims += 1
        for log in self.order():
            excess = self.held - self.low_water
            if excess <= 0:
                return
            self.shed_events += log.shed(excess)


class MemoryEventLog:
    """An `EventLog` in a deque, bounded by its window (``capacity`` events, ``max_bytes``) and,
    when given one, a `LogBudget` it shares with other logs."""

    __slots__ = ("_budget", "_bytes", "_capacity", "_cost", "_events", "_last", "_max_bytes", "_sizes")

    def __init__(
        self, capacity: int, *, max_bytes: int = 0, budget: LogBudget | None = None, last_seq: int = 0
    ) -> None:
        """``last_seq``: the seq the log starts after (a copy of a log kept elsewhere, joined late)."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._budget = budget
        # Created on the first append: an idle session should cost a few bytes, not a deque block.
        # Deltas are held as `_HeldDelta` tuples, everything else as the model.
        self._events: deque[LoggedMessage | _HeldDelta] | None = None
        # Encoded size of each held event, in the same order, and their sum.
        self._sizes: deque[int] | None = None
        self._bytes = 0
        # What this log has charged to its budget (its events' `memory_cost`).
        self._cost = 0
        self._last = last_seq

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def held_bytes(self) -> int:
        """Encoded size of the events held."""
        return self._bytes

    @property
    def held_cost(self) -> int:
        """What the events held cost, as charged to the budget (`memory_cost`)."""
        return self._cost

    @property
    def last_seq(self) -> int:
        return self._last

    @property
    def oldest_seq(self) -> int:
        held = len(self._events) if self._events is not None else 0
        return self._last - held + 1

    def __len__(self) -> int:
        return len(self._events) if self._events is not None else 0

    def append(self, event: LoggedMessage) -> None:
        if event.seq != self._last + 1:
            raise ValueError(f"event seq {event.seq} does not follow {self._last}")
        if type(event) is Delta:
            self.append_delta(event.id, event.seq, event.text)
            return
        events, sizes = self._events, self._sizes
        if events is None or sizes is None:
            events, sizes = self._events, self._sizes = deque(), deque()
        size = encoded_size(event)
        events.append(event)
        self._add(events, sizes, size, _model_cost(size), event.seq)

    def append_delta(self, request_id: str, seq: int, text: str) -> None:
        """`append` of the delta ``Delta(id=request_id, seq=seq, text=text)``, from its fields (the
        session's hot path: no model is built for a token that only needs to be held)."""
        if seq != self._last + 1:
            raise ValueError(f"event seq {seq} does not follow {self._last}")
        events, sizes = self._events, self._sizes
        if events is None or sizes is None:
            events, sizes = self._events, self._sizes = deque(), deque()
        # `encoded_size` and `memory_cost`, inlined for the one-per-token case.
        size = _DELTA_FRAME + len(request_id) + len(text)
        events.append((request_id, text))
        self._add(events, sizes, size, size + _DELTA_OVERHEAD, seq)

    def _add(
        self, events: deque[LoggedMessage | _HeldDelta], sizes: deque[int], size: int, cost: int, seq: int
    ) -> None:
        """Account for the event just appended to ``events``: window, then budget."""
        sizes.append(size)
        self._bytes += size
        self._last = seq
        if len(events) > self._capacity and self._bytes - sizes[0] >= self._max_bytes:
            self._evict_window(events, sizes)
        budget = self._budget
        if budget is not None:
            # `LogBudget.charge`, inlined likewise.
            self._cost += cost
            budget.held += cost
            if budget.held > budget.max_bytes:
                budget.reclaim()

    def _evict_window(self, events: deque[LoggedMessage | _HeldDelta], sizes: deque[int]) -> None:
        # Keep the shortest suffix holding both `capacity` events and `max_bytes` bytes.
        capacity, floor = self._capacity, self._max_bytes
        while len(events) > capacity and self._bytes - sizes[0] >= floor:
            self._pop_oldest(events, sizes)

    def _pop_oldest(self, events: deque[LoggedMessage | _HeldDelta], sizes: deque[int]) -> None:
        held = events.popleft()
        size = sizes.popleft()
        self._bytes -= size
        budget = self._budget
        if budget is not None:
            cost = _held_cost(held, size)
            self._cost -= cost
            budget.held -= cost

    def after(self, seq: int) -> list[LoggedMessage] | None:
        if seq >= self._last:
            return [] if seq == self._last else None
        oldest = self.oldest_seq
        if seq < oldest - 1 or self._events is None:
            return None
        first = seq + 1
        return [
            Delta(id=held[0], seq=at, text=held[1]) if isinstance(held, tuple) else held
            for at, held in enumerate(islice(self._events, first - oldest, None), first)
        ]

    def trim(self, upto: int) -> None:
        events, sizes = self._events, self._sizes
        if events is None or sizes is None:
            return
        drop = min(upto, self._last) - self.oldest_seq + 1
        for _ in range(min(drop, len(events))):
            self._pop_oldest(events, sizes)

    def shed(self, cost: int) -> int:
        """Drop events from the front until about ``cost`` of budget is freed (the whole log at
        most); how many were dropped. The budget calls this; anyone may."""
        events, sizes = self._events, self._sizes
        if events is None or sizes is None:
            return 0
        freed = dropped = 0
        while events and freed < cost:
            freed += _held_cost(events[0], sizes[0])
            self._pop_oldest(events, sizes)
            dropped += 1
        return dropped

    def release(self) -> None:
        """Drop every event and give its cost back to the budget (the session ended)."""
        events, sizes = self._events, self._sizes
        if events is not None and sizes is not None:
            if self._budget is not None:
                self._budget.held -= self._cost
            self._cost = 0
            self._bytes = 0
            events.clear()
            sizes.clear()
