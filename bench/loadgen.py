"""Several client processes driving one server in lock-step phases (the multi-process load generator).

One Python process cannot drive hundreds of streams or thousands of sockets without becoming the
bottleneck, so a benchmark forks N workers, each running `fn(spec, sync)` on its own asyncio loop.
Workers and the parent meet at `sync` checkpoints (a cyclic barrier of N + 1 parties): the parent
uses them to read server counters exactly when every worker is connected, started or finished, and
to hand every worker a common start time (`sync.start_at`, on the system-wide monotonic clock).
Every wait is bounded; a failing worker breaks the barrier, and the parent raises `WorkerFailed`
with the reason. Workers are this module's own children and are always reaped on exit.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from bench.procs import raise_nofile

__all__ = ["Sync", "WorkerFailed", "Workers"]

_CTX = multiprocessing.get_context("fork")


class WorkerFailed(RuntimeError):
    """A worker raised, or a checkpoint was not reached in time."""


class Sync:
    """The checkpoint all workers and the parent share, plus a shared start time."""

    def __init__(self, parties: int) -> None:
        self._barrier: multiprocessing.synchronize.Barrier = _CTX.Barrier(parties)
        self._start_at = _CTX.Value("d", 0.0)

    @property
    def start_at(self) -> float:
        return float(self._start_at.value)

    @start_at.setter
    def start_at(self, value: float) -> None:
        self._start_at.value = value

    def wait(self, timeout: float) -> None:
        self._barrier.wait(timeout)

    async def checkpoint(self, limit_s: float = 300.0) -> None:
        """Meet the other workers and the parent here (from a worker's event loop)."""
        await asyncio.to_thread(self._barrier.wait, limit_s)

    def abort(self) -> None:
        self._barrier.abort()


WorkerFn = Callable[[dict[str, Any], Sync], Awaitable[dict[str, Any]]]


def _entry(fn: WorkerFn, spec: dict[str, Any], sync: Sync, results: Any, index: int) -> None:
    raise_nofile()
    try:
        result = asyncio.run(fn(spec, sync))
        results.put((index, "ok", result))
    except BaseException as exc:
        sync.abort()
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        results.put((index, "error", f"{detail}\n{traceback.format_exc()[-1500:]}"))


class Workers:
    """`with Workers(fn, specs) as workers: workers.checkpoint(); ...; results = workers.results()`."""

    def __init__(self, fn: WorkerFn, specs: list[dict[str, Any]], *, timeout: float = 300.0) -> None:
        self.sync = Sync(len(specs) + 1)
        self.timeout = timeout
        self._results: Any = _CTX.Queue()
        self._procs = [
            _CTX.Process(target=_entry, args=(fn, spec, self.sync, self._results, i), daemon=True)
            for i, spec in enumerate(specs)
        ]
        self._collected: dict[int, tuple[str, Any]] = {}

    def __enter__(self) -> Workers:
        for proc in self._procs:
            proc.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None:
            self.sync.abort()
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)

    def _errors(self) -> str:
        while True:
            try:
                index, status, value = self._results.get_nowait()
            except queue_module.Empty:
                break
            self._collected[index] = (status, value)
        errors = [str(value) for status, value in self._collected.values() if status == "error"]
        return "\n".join(errors) or "a worker did not reach the checkpoint in time"

    def checkpoint(self, timeout: float | None = None) -> None:
        """Wait until every worker reaches its next checkpoint; raise `WorkerFailed` if one cannot."""
        try:
            self.sync.wait(timeout if timeout is not None else self.timeout)
        except threading.BrokenBarrierError:
            time.sleep(0.5)  # let the failing worker post its reason
            raise WorkerFailed(self._errors()) from None

    def results(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout
        while len(self._collected) < len(self._procs):
            try:
                index, status, value = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                raise WorkerFailed("workers did not report in time") from None
            self._collected[index] = (status, value)
        errors = [str(v) for s, v in self._collected.values() if s == "error"]
        if errors:
            raise WorkerFailed("\n".join(errors))
        return [self._collected[i][1] for i in range(len(self._procs))]
