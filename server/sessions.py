"""The registry of live sessions: opening, resuming, taking over, expiring and ending them.

A session lives in the registry while a connection is attached and for ``session_ttl_s`` after
the last one went away; meanwhile its requests keep running and their events go to its log. The
sweeper ends expired sessions (their requests are cancelled). `connect` is the one way a
transport gets a session: it resumes the named one when its log still holds every event the
client is missing, and otherwise opens a new one (never a partial recovery), all without an
await between the replay snapshot and going live.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from protocol.messages import Welcome
from protocol.session import Session, SessionLimits
from server.dispatcher import Dispatcher
from server.metrics import Metrics
from server.outbox import Outbox
from server.ratelimit import RateLimiter
from server.runtime import SessionRuntime

__all__ = ["Connected", "SessionRegistry", "new_session_id"]

log = logging.getLogger("sluice.sessions")

# How often the sweeper looks for expired sessions, at most (a fraction of the TTL when shorter).
_SWEEP_EVERY_S = 5.0


def new_session_id() -> str:
    """An unguessable session id (it is what a client resumes with)."""
    return "s_" + secrets.token_urlsafe(18)


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
    ) -> None:
        self._limits = limits
        self._ttl_s = ttl_s
        self._dispatcher = dispatcher
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._sessions: dict[str, SessionRuntime] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[SessionRuntime]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str, key_id: str) -> SessionRuntime | None:
        """The live session ``session_id`` if it belongs to ``key_id``."""
        runtime = self._sessions.get(session_id)
        if runtime is None or runtime.key_id != key_id:
            return None
        return runtime

    # -- attaching ---------------------------------------------------------------------------

    def connect(
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
            runtime = self.get(resume, key_id)
            if runtime is not None and runtime.attach(
                outbox, last_seq or 0, lambda sid, seq: welcome(sid, True, seq)
            ):
                return Connected(runtime, resumed=True)
        runtime = self.open(key_id)
        attached = runtime.attach(outbox, 0, lambda sid, seq: welcome(sid, False, seq))
        assert attached, "a new session always replays from 0"
        return Connected(runtime, resumed=False)

    def open(self, key_id: str) -> SessionRuntime:
        """A new, unattached session for ``key_id`` (it expires after the TTL if none attaches)."""
        self._limiter.acquire_session(key_id)
        session_id = new_session_id()
        runtime = SessionRuntime(
            Session(session_id, self._limits),
            dispatcher=self._dispatcher,
            metrics=self._metrics,
            key_id=key_id,
            clock=self._clock,
        )
        self._sessions[session_id] = runtime
        self._metrics.session_opened()
        return runtime

    # -- ending ------------------------------------------------------------------------------

    async def end(self, session_id: str) -> bool:
        """End a session now, cancelling what it has in flight; whether it existed."""
        runtime = self._sessions.pop(session_id, None)
        if runtime is None:
            return False
        self._limiter.release_session(runtime.key_id)
        self._metrics.session_closed()
        await runtime.close()
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
