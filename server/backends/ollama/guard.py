"""First-token and idle timeouts for one upstream stream, at the cost of one clock read per chunk.

A stream is read by the consumer's own task (the backend is an async generator). Wrapping every
read in ``asyncio.timeout`` would create and cancel a timer per chunk, for hundreds of streams at
once; `StallGuard` instead keeps one timer per stream that re-arms itself lazily and, when
upstream has been silent for too long *while the stream is waiting on it*, cancels the reading
task the way ``asyncio.timeout`` does. Time spent while the consumer holds a piece (the generator
is suspended at ``yield``) never counts: a slow consumer is not a stalled upstream. A relayed
stream (pieces handed on from the read callback, `OllamaBackend.relay`) calls only `waiting`,
after each piece: it is always waiting, and the guard counts from the last piece.

Use: `start` before the first upstream await, `waiting` just before each read, `received` after
it, `first_piece` once, `stop` in ``finally``; on ``CancelledError`` ask `expired` whether the
cancellation was the guard's own (it then undoes it, and the caller raises a timeout). The guard
never reads, closes or retries anything itself: it only cancels the reading task.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from server.backends.ollama.errors import StreamStalled

__all__ = ["StallGuard"]

# call_at may run a callback up to one clock tick early; never treat that as "not yet".
_SLACK_S = 0.001


class StallGuard:
    __slots__ = (
        "_baseline",
        "_fired",
        "_first_s",
        "_handle",
        "_idle_s",
        "_limit",
        "_loop",
        "_phase",
        "_since",
        "_task",
        "_waiting",
    )

    def __init__(self, first_token_s: float, idle_s: float) -> None:
        self._first_s = first_token_s
        self._idle_s = idle_s
        self._limit = first_token_s
        self._phase: Literal["first_token", "idle"] = "first_token"
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._since = 0.0
        self._waiting = False
        self._fired = False
        self._baseline = 0

    def start(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "StallGuard needs to run inside a task"
        self._task = task
        self._baseline = task.cancelling()
        self._since = self._loop.time()
        self._waiting = True
        self._handle = self._loop.call_at(self._since + self._limit, self._check)

    def waiting(self) -> None:
        self._since = self._loop.time()
        self._waiting = True

    def received(self) -> None:
        self._waiting = False

    def first_piece(self) -> None:
        """Switch from the first-token limit to the idle limit."""
        self._phase = "idle"
        self._limit = self._idle_s
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self._loop.call_at(self._loop.time() + self._limit, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def expired(self) -> StreamStalled | None:
        """After a ``CancelledError``: the stall it stands for, or None when someone else cancelled.

        When the guard fired, its own cancellation is withdrawn from the task, so the caller can
        raise a timeout instead; if the task was also cancelled from outside, that cancellation
        wins and this returns None.
        """
        if not self._fired or self._task is None:
            return None
        self._fired = False
        if self._task.uncancel() > self._baseline:
            return None
        return StreamStalled(self._phase, self._limit)

    def _check(self) -> None:
        self._handle = None
        now = self._loop.time()
        if self._waiting:
            deadline = self._since + self._limit
            if now + _SLACK_S >= deadline:
                assert self._task is not None
                self._fired = True
                self._task.cancel()
                return
        else:
            deadline = now + self._limit
        self._handle = self._loop.call_at(deadline, self._check)
