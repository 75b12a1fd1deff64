"""Graceful shutdown: drain the sessions, then let uvicorn stop.

On SIGTERM (or SIGINT) the server stops accepting connections, sends ``goaway`` to every session,
lets running requests finish for up to ``drain_timeout_s``, ends the ones still running with a
``shutting_down`` error (so every request still gets its one terminal message, and a client that
resumes elsewhere loses nothing it was told about), and closes each connection with 1012 once
what it has queued is sent.

uvicorn's own shutdown closes every WebSocket with 1012 at once, before the app hears of it, so
`DrainingServer` runs the drain first and only then hands over to uvicorn. `Drainer.drain` is
idempotent: the app's lifespan calls it too, for servers started some other way (there the
sockets are already closed and it only ends the requests). Besides the sessions, it drains what
was handed to `Drainer.watch` the same way (the Responses API's runs and WebSockets: they are no
sessions). Nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import uvicorn

from protocol.close import CloseCode
from protocol.errors import ErrorCode, SluiceError
from server.draining import GOAWAY_RETRY_MS, DrainState

if TYPE_CHECKING:
    from server.seam import Drainable, Sessions

__all__ = ["Drainer", "DrainingServer"]

log = logging.getLogger("sluice.shutdown")

# How long connections get to send what they queued and close, after the requests ended.
_CLOSE_GRACE_S = 5.0
_POLL_S = 0.05


class Drainer:
    """Drains one app's sessions once; see the module docstring."""

    def __init__(self, sessions: Sessions, state: DrainState, *, timeout_s: float) -> None:
        self._sessions = sessions
        self._state = state
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self._watched: set[Drainable] = set()  # drained beside the sessions

    def watch(self, drainable: Drainable) -> None:
        """Drain ``drainable`` with the sessions (until `unwatch`)."""
        self._watched.add(drainable)

    def unwatch(self, drainable: Drainable) -> None:
        self._watched.discard(drainable)

    def _all(self) -> list[Drainable]:
        return [*self._sessions, *self._watched]

    async def drain(self) -> None:
        if self._task is None:
            self._state.begin()
            self._task = asyncio.create_task(self._drain(), name="sluice drain")
        await asyncio.shield(self._task)

    async def _drain(self) -> None:
        started = time.monotonic()
        log.info("draining %d sessions (up to %.1f s)", len(self._sessions), self._timeout_s)
        for runtime in self._all():
            runtime.goaway("server shutting down", GOAWAY_RETRY_MS)
        await _until(lambda: not any(runtime.busy for runtime in self._all()), self._timeout_s)
        cut_short = 0
        error = SluiceError(ErrorCode.SHUTTING_DOWN, "the server shut down before this request finished")
        for runtime in self._all():
            if runtime.busy:
                cut_short += 1
                runtime.fail_all(error)
            runtime.finish_connection(CloseCode.SERVICE_RESTART, "server shutting down")
        await _until(lambda: not any(runtime.attached for runtime in self._all()), _CLOSE_GRACE_S)
        log.info(
            "drained in %.2f s (%d sessions had requests cut short)", time.monotonic() - started, cut_short
        )


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Wait until ``condition()`` holds or ``timeout_s`` passes (polled: what it watches, running
    requests and attached connections of every session, has no single event to wait on)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(math.ceil(timeout_s / _POLL_S) + 1):
        if condition() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(_POLL_S)


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains the app (``drain``) before its own shutdown closes sockets."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stop accepting first: a client told to go away must not be let back in here.
        for server in getattr(self, "servers", ()):
            server.close()
        drain = asyncio.ensure_future(self._drain())
        while not drain.done():
            if self.force_exit:  # a second Ctrl+C: stop waiting for the drain
                drain.cancel()
                break
            await asyncio.wait({drain}, timeout=0.1)
        if drain.done() and not drain.cancelled() and drain.exception() is not None:
            log.error("draining failed; shutting down anyway", exc_info=drain.exception())
        await super().shutdown(sockets=sockets)
        # uvicorn re-raises the signal it caught once it is done, so the process would end "killed
        # by SIGTERM"; after a completed drain that is a clean exit, and says so with status 0.
        if not self.force_exit and isinstance(getattr(self, "_captured_signals", None), list):
            self._captured_signals.clear()
