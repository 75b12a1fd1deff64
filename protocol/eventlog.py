"""The session's event log: the numbered server messages a reconnecting client resumes from.

`EventLog` is the small interface a session writes to (append, read after a seq, trim, oldest and
last seq); `MemoryEventLog` is the bounded in-process implementation. A log holds a contiguous run
of seqs ``oldest_seq..last_seq`` (empty when ``oldest_seq == last_seq + 1``); events leave it from
the front only, by eviction (capacity) or by `trim` (client ack). It never renumbers anything and
never does I/O: a Redis Streams implementation lives with the server, behind the same interface.

`append` runs once per streamed token, so `MemoryEventLog` keeps it to a few attribute operations.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Protocol, runtime_checkable

from protocol.messages import LoggedMessage

__all__ = ["EventLog", "MemoryEventLog"]


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


class MemoryEventLog:
    """An `EventLog` in a bounded deque: past `capacity` events, the oldest are evicted."""

    __slots__ = ("_capacity", "_events", "_last")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        # Created on the first append: an idle session should cost a few bytes, not a deque block.
        self._events: deque[LoggedMessage] | None = None
        self._last = 0

    @property
    def capacity(self) -> int:
        return self._capacity

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
        events = self._events
        if events is None:
            events = self._events = deque(maxlen=self._capacity)
        events.append(event)
        self._last = event.seq

    def after(self, seq: int) -> list[LoggedMessage] | None:
        if seq >= self._last:
            return [] if seq == self._last else None
        oldest = self.oldest_seq
        if seq < oldest - 1 or self._events is None:
            return None
        return list(islice(self._events, seq - oldest + 1, None))

    def trim(self, upto: int) -> None:
        events = self._events
        if events is None:
            return
        drop = min(upto, self._last) - self.oldest_seq + 1
        if drop >= len(events):
            events.clear()
            return
        for _ in range(drop):
            events.popleft()
