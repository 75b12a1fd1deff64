"""A node's bound on what the logs of the sessions it homes hold in Redis.

Redis keeps each session's replay window (PROTOCOL §2: ``replay_events`` and ``replay_bytes``,
`server.cluster.eventlog`) for as long as the session lives, so without a bound the number of
sessions, not any setting, decides Redis's memory. Each home counts the JSON bytes of its
sessions' windows (what `RedisEventLog` tracks of Redis's window, counted once per write, never
per event) against one `protocol.eventlog.LogBudget` of ``max_log_bytes``; past it, it sheds in
the order one node sheds its in-memory logs (`server.sessions.shedding_order`: detached sessions
first, the longest detached first, then the largest attached ones), down to seven eighths of the
bound. A shed event goes from memory at once and from Redis exactly with that session's next
write (as an acknowledged one does: `RedisEventLog.trim`): no command of its own, though a session
with nothing else to write makes the writer's next round trip come sooner (one `APPEND` carries
every session a reclaim trimmed). A resume that needs a shed event gets a new session
(``resumed: false``), never a partial replay.

This module never talks to Redis and never decides when a session ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from protocol.eventlog import LogBudget
from server.cluster.eventlog import RedisEventLog
from server.sessions import shedding_order

__all__ = ["RedisBound", "RedisShare", "release"]

_WHAT = "Redis logs of the sessions homed here past max_log_bytes"


class RedisShare:
    """One session's log as the `RedisBound` counts it (a `protocol.eventlog.Sheddable`)."""

    __slots__ = ("_budget", "_log", "held_cost")

    def __init__(self, event_log: RedisEventLog, budget: LogBudget) -> None:
        self._log = event_log
        self._budget = budget
        # What this log counts against the bound, as of its last write.
        self.held_cost = 0
        self._count()

    def _count(self) -> None:
        _, held = self._log.window
        self._budget.held += held - self.held_cost
        self.held_cost = held

    def written(self) -> None:
        """A write of the log is in Redis: count what its window holds now, shedding past the bound."""
        self._count()
        if self._budget.held > self._budget.max_bytes:
            self._budget.reclaim()

    def shed(self, cost: int) -> int:
        """Give up about ``cost`` bytes of the session's oldest events; how many."""
        sizes, _ = self._log.window
        freed = count = 0
        while count < len(sizes) and freed < cost:
            freed += sizes[count]
            count += 1
        if count:
            self._log.trim(self._log.last_seq - len(sizes) + count)
            self._count()
        return count

    def drop(self) -> None:
        """The session is no longer homed here: nothing of it counts any more."""
        self._budget.held -= self.held_cost
        self.held_cost = 0


class RedisBound:
    """The bound of the sessions a node homes; ``homed`` names them with when each was detached
    (None while attached), as `server.sessions.shedding_order` takes them."""

    def __init__(
        self, max_bytes: int, homed: Callable[[], Iterable[tuple[float | None, RedisEventLog]]]
    ) -> None:
        self._homed = homed
        self.budget = LogBudget(max_bytes, self._order)

    def join(self, event_log: RedisEventLog) -> RedisEventLog:
        """Count ``event_log`` (a session homed here from now on) against the bound."""
        event_log.share = RedisShare(event_log, self.budget)
        return event_log

    def _order(self) -> list[RedisShare]:
        shares = ((since, event_log.share) for since, event_log in self._homed())
        return shedding_order(((since, share) for since, share in shares if share is not None), _WHAT)


def release(event_log: RedisEventLog) -> None:
    """A session is no longer homed here: its log's memory and its share of the bound go."""
    event_log.memory.release()
    if event_log.share is not None:
        event_log.share.drop()
