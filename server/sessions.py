"""The registry of live sessions: opening, resuming, taking over, expiring and ending them.

A session lives in the registry while a connection is attached and for ``session_ttl_s`` after
the last one went away; meanwhile its requests keep running and their events go to its log. The
sweeper ends expired sessions (their requests are cancelled).

The transports reach sessions only through the async methods here and the runtime's own
(`SessionRuntime.attach`/``detach``/``handle``/``refuse``), never through the pure session
inside: that is the seam a session store shared by several nodes sits behind. `connect` (the
WebSocket: resume or open, then attach) and `open_or_resume` (``POST /v1/sessions``: the same
decision, attaching nothing) resume the named session when its log still holds every event the
client is missing, and otherwise open a new one (never a partial recovery); `attach` (the SSE
events stream) attaches to a session that exists or says why not; `find` and `end` look one up
and end it. In this in-memory registry nothing awaits between a replay snapshot and going live.

Every session's event log shares one `protocol.eventlog.LogBudget` (``log_budget_bytes``, the
``max_log_bytes`` setting) when one is set: past it, the logs of detached sessions are shed first,
the longest detached first, then those of attached sessions, the largest first. A resume that
needed a shed event gets a new session, as for any event no longer logged (never a partial one).

A session belongs to the key that opened it: another key naming it gets a new session, exactly
as if it did not exist, so session ids are no use to anyone else. The registry never touches a
socket, and only this module creates or forgets `SessionRuntime` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from protocol.eventlog import LogBudget, MemoryEventLog, Sheddable
from protocol.messages import Welcome
from protocol.session import Session, SessionLimits
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.runtime import SessionRuntime

__all__ = ["Connected", "NotAttached", "SessionRegistry", "new_session_id", "shedding_order"]

log = logging.getLogger("sluice.sessions")

# How often the sweeper looks for expired sessions, at most (a fraction of the TTL when shorter).
_SWEEP_EVERY_S = 5.0


def new_session_id() -> str:
    """An unguessable session id (it is what a client resumes with)."""
    return "s_" + secrets.token_urlsafe(18)


_L = TypeVar("_L", bound=Sheddable)


def shedding_order(
    logs: Iterable[tuple[float | None, _L]], what: str = "event logs past max_log_bytes"
) -> list[_L]:
    """A `LogBudget`'s order over (detached since, or None while attached; log) pairs: detached
    sessions' logs (longest detached first), then attached ones (largest first)."""
    detached: list[tuple[float, _L]] = []
    attached: list[tuple[int, _L]] = []
    for since, session_log in logs:
        if since is not None:
            detached.append((since, session_log))
        else:
            attached.append((-session_log.held_cost, session_log))
    detached.sort(key=lambda item: item[0])
    attached.sort(key=lambda item: item[0])
    log.warning(
        "%s: shedding the oldest events", what, extra={"detached": len(detached), "attached": len(attached)}
    )
    return [item[1] for item in detached] + [item[1] for item in attached]


class NotAttached(Enum):
    """Why `SessionRegistry.attach` attached nothing."""

    UNKNOWN = "unknown"  # no such session for this key (or it expired)
    INCOMPLETE = "incomplete"  # the events after last_seq are no longer all in the log


@dataclass(frozen=True, slots=True)
class Connected:
    """What `SessionRegistry.connect` attached the connection to."""

    runtime: SessionRuntime
    resumed: bool


class SessionRegistry:
    """Every live session of this process, by id."""

    def __init__(
        self,
        *,
        limits: SessionLimits,
        ttl_s: float,
        dispatcher: Dispatcher,
        limiter: RateLimiter,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        log_budget_bytes: int = 0,
    ) -> None:
        self._limits = limits
        self._ttl_s = ttl_s
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._sessions: dict[str, SessionRuntime] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.log_budget = LogBudget(log_budget_bytes, self._shedding_order) if log_budget_bytes else None

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[SessionRuntime]:
        return iter(list(self._sessions.values()))

    async def find(self, session_id: str, key_id: str) -> SessionRuntime | None:
        """The live session ``session_id`` if it belongs to ``key_id``."""
        return self._mine(session_id, key_id)

    def _mine(self, session_id: str, key_id: str) -> SessionRuntime | None:
        runtime = self._sessions.get(session_id)
        if runtime is None or runtime.key_id != key_id:
            return None
        return runtime

    # -- attaching ---------------------------------------------------------------------------

    async def connect(
        self,
        outbox: Outbox,
        *,
        key_id: str,
        welcome: Callable[[str, bool, int], Welcome],
        resume: str | None = None,
        last_seq: int | None = None,
    ) -> Connected:
        """Attach ``outbox`` to session ``resume`` (replaying after ``last_seq``, 0 when None), or
        to a new session when that is not possible. ``welcome(session, resumed, last_seq)`` builds
        the first message. Raises ``SluiceError(rate_limited)`` when a new session is needed and
        the key has too many."""
        if resume is not None:
            runtime = self._mine(resume, key_id)
            if runtime is not None and runtime.attach(
                outbox, last_seq or 0, lambda sid, seq: welcome(sid, True, seq)
            ):
                return Connected(runtime, resumed=True)
        runtime = self._open(key_id)
        attached = runtime.attach(outbox, 0, lambda sid, seq: welcome(sid, False, seq))
        assert attached, "a new session always replays from 0"
        return Connected(runtime, resumed=False)

    async def open_or_resume(
        self,
        *,
        key_id: str,
        welcome: Callable[[str, bool, int], Welcome],
        resume: str | None = None,
        last_seq: int | None = None,
    ) -> Welcome:
        """The decision of `connect` without attaching anything: the welcome of session
        ``resume`` when every event after ``last_seq`` can still be replayed, else of a new one."""
        if resume is not None:
            runtime = self._mine(resume, key_id)
            if runtime is not None and runtime.can_replay(last_seq or 0):
                return welcome(runtime.id, True, runtime.last_seq)
        runtime = self._open(key_id)
        return welcome(runtime.id, False, runtime.last_seq)

    async def attach(
        self, outbox: Outbox, *, session_id: str, key_id: str, last_seq: int
    ) -> SessionRuntime | NotAttached:
        """Attach ``outbox`` to the existing session ``session_id`` (no welcome: an SSE stream
        carries none), replaying every event after ``last_seq``; a connection already attached is
        taken over (closed 4009). The session it attached to, or why it did not."""
        runtime = self._mine(session_id, key_id)
        if runtime is None:
            return NotAttached.UNKNOWN
        return runtime if runtime.attach(outbox, last_seq) else NotAttached.INCOMPLETE

    def _open(self, key_id: str) -> SessionRuntime:
        """A new, unattached session for ``key_id`` (it expires after the TTL if none attaches)."""
        self._limiter.acquire_session(key_id)
        session_id = new_session_id()
        runtime = SessionRuntime(
            Session(session_id, self._limits, self._new_log()),
            dispatcher=self._dispatcher,
            metrics=self._metrics,
            key_id=key_id,
            clock=self._clock,
        )
        self._sessions[session_id] = runtime
        self._metrics.session_opened()
        return runtime

    def _new_log(self) -> MemoryEventLog:
        limits = self._limits
        return MemoryEventLog(limits.replay_events, max_bytes=limits.replay_bytes, budget=self.log_budget)

    def _shedding_order(self) -> list[MemoryEventLog]:
        """The `LogBudget`'s order: see `shedding_order`."""
        return shedding_order(
            (runtime.detached_since if not runtime.attached else None, runtime.session.log)
            for runtime in self._sessions.values()
            if isinstance(runtime.session.log, MemoryEventLog)
        )

    # -- ending ------------------------------------------------------------------------------

    async def end(self, session_id: str) -> bool:
        """End a session now, cancelling what it has in flight; whether it existed."""
        runtime = self._sessions.pop(session_id, None)
        if runtime is None:
            return False
        self._limiter.release_session(runtime.key_id)
        self._metrics.session_closed()
        await runtime.close()
        if isinstance(runtime.session.log, MemoryEventLog):
            runtime.session.log.release()  # after close: nothing is logged any more
        return True

    def expired(self) -> list[str]:
        now = self._clock()
        return [
            runtime.id
            for runtime in self._sessions.values()
            if runtime.detached_since is not None
            and not runtime.attached
            and now - runtime.detached_since >= self._ttl_s
        ]

    async def sweep(self) -> int:
        """End every session detached for longer than the TTL; how many ended."""
        ended = 0
        for session_id in self.expired():
            runtime = self._sessions.get(session_id)
            # Re-check: a connection may have resumed it while an earlier one was being ended.
            if runtime is None or runtime.attached:
                continue
            log.info("session expired", extra={"session": session_id})
            ended += await self.end(session_id)
        return ended

    def start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="sluice session sweeper")

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(_SWEEP_EVERY_S, self._ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:  # the sweeper must outlive any one bad session
                log.exception("session sweep failed")

    async def close(self) -> None:
        """Stop the sweeper and end every session."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for session_id in list(self._sessions):
            await self.end(session_id)
