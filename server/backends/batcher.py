"""Micro-batching of embed and classify work: many small requests, one forward pass.

Requests from every session meet in one `MicroBatcher` per model. Its dedicated worker thread takes
up to ``max_batch`` items, or whatever has arrived ``max_wait_ms`` after the oldest waiting item,
sorts them by length (so padding is small), runs ONE forward pass and routes the result slices
back to the awaiting coroutines. A request larger than ``max_batch`` is split across passes.

What callers can rely on:
- CPU-bound work never runs on the event loop; the loop only appends to a deque under a lock and
  later sets futures (one ``call_soon_threadsafe`` per batch and loop, not per request).
- A request whose awaiting task is cancelled has its items dropped if they have not run yet.
- The queue is bounded (``max_queue`` items): past it `submit` raises ``overloaded`` at once.
- An exception in a forward pass fails only the requests that had items in that pass; it is
  translated to a `SluiceError` in `forward_error`, the one place this boundary maps exceptions.

This module must never import a model library: the forward function is injected.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from protocol.errors import ErrorCode, SluiceError

__all__ = ["BatchRecord", "BatcherStats", "MicroBatcher", "forward_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Batch-size bucket bounds for `BatcherStats.size_buckets` (Prometheus-style, cumulative "le").
SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def forward_error(exc: BaseException) -> SluiceError:
    """Translate an exception raised by a forward pass into the error its requests receive."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, MemoryError):
        return SluiceError(ErrorCode.OVERLOADED, "not enough memory for this batch; retry later")
    log.error("forward pass failed", exc_info=exc)
    return SluiceError.internal()


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One forward pass, as reported to observers (on the worker thread)."""

    model: str
    size: int
    requests: int
    queue_wait_ms: float  # how long the oldest item of the batch waited before the pass began
    run_ms: float
    ok: bool


@dataclass(slots=True)
class BatcherStats:
    """Running totals a metrics endpoint can read at any time (plain ints and floats)."""

    batches: int = 0
    items: int = 0
    requests: int = 0
    failed_batches: int = 0
    dropped_items: int = 0  # cancelled before they ran
    rejected_requests: int = 0  # refused with ``overloaded``
    queue_wait_ms_sum: float = 0.0
    queue_wait_ms_max: float = 0.0
    run_ms_sum: float = 0.0
    size_buckets: dict[int, int] = field(default_factory=lambda: dict.fromkeys(SIZE_BUCKETS, 0))

    def record(self, batch: BatchRecord) -> None:
        self.batches += 1
        self.items += batch.size
        self.failed_batches += not batch.ok
        self.queue_wait_ms_sum += batch.queue_wait_ms
        self.queue_wait_ms_max = max(self.queue_wait_ms_max, batch.queue_wait_ms)
        self.run_ms_sum += batch.run_ms
        for bound in SIZE_BUCKETS:
            if batch.size <= bound:
                self.size_buckets[bound] += 1


class _Pending(Generic[T, R]):
    """One submitted request: its items, the slots its results fill, and who waits for them."""

    __slots__ = ("done", "enqueued", "filled", "future", "items", "loop", "next_item", "results")

    def __init__(self, items: Sequence[T], loop: asyncio.AbstractEventLoop) -> None:
        self.items = items
        self.loop = loop
        self.future: asyncio.Future[list[R]] = loop.create_future()
        self.results: list[R | None] = [None] * len(items)
        self.next_item = 0  # items before this index were taken into a batch
        self.filled = 0
        self.done = False  # set on the worker thread once the outcome is decided
        self.enqueued = time.monotonic()


def _settle(outcomes: list[tuple[_Pending[T, R], list[R] | SluiceError]]) -> None:
    """Runs on the event loop: hand each finished request its results or its error."""
    for pending, outcome in outcomes:
        if pending.future.done():  # cancelled while its pass was running
            continue
        if isinstance(outcome, SluiceError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)


class MicroBatcher(Generic[T, R]):
    """Collects items from concurrent `submit` calls into batches for ``forward``.

    ``forward`` runs on this batcher's worker thread and must return one result per item, in order.
    Call `start` once before submitting and `close` (awaited) when done.
    """

    def __init__(
        self,
        name: str,
        forward: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        length: Callable[[T], int] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._forward = forward
        self._length = length
        self._queue: deque[_Pending[T, R]] = deque()
        self._queued_items = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread: threading.Thread | None = None
        self._observers: list[Callable[[BatchRecord], None]] = []
        # Runs first on the worker thread (e.g. to set that thread's torch intra-op threads).
        self.on_thread_start: Callable[[], None] | None = None

    def add_observer(self, observer: Callable[[BatchRecord], None]) -> None:
        """Call ``observer`` after every pass. It runs on the worker thread: keep it quick and thread-safe."""
        self._observers.append(observer)

    @property
    def queued(self) -> int:
        """Items waiting for a pass (not counting the one running)."""
        return self._queued_items

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop taking requests, fail the waiting ones with ``shutting_down``, join the worker."""
        with self._cond:
            self._closed = True
            abandoned = list(self._queue)
            self._queue.clear()
            self._queued_items = 0
            self._cond.notify_all()
        error = SluiceError(ErrorCode.SHUTTING_DOWN, f"model {self.name} is shutting down")
        for pending in abandoned:
            pending.done = True
            settled: list[tuple[_Pending[T, R], list[R] | SluiceError]] = [(pending, error)]
            try:
                pending.loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items``, in order, once the passes that include them have run.

        Raises `SluiceError`: ``overloaded`` when the queue is full, ``shutting_down`` after
        `close`, or whatever `forward_error` made of a failed pass.
        """
        if not items:
            return []
        if self._thread is None and not self._closed:
            raise RuntimeError(f"batcher {self.name} was not started")
        pending: _Pending[T, R] = _Pending(items, asyncio.get_running_loop())
        count = len(items)
        with self._cond:
            if self._closed:
                raise SluiceError(ErrorCode.SHUTTING_DOWN, f"model {self.name} is shutting down")
            if self._queued_items + count > self.max_queue:
                self.stats.rejected_requests += 1
                raise SluiceError(
                    ErrorCode.OVERLOADED,
                    f"model {self.name} has {self._queued_items} texts queued; retry later",
                    retry_after_ms=100,
                )
            was_empty = not self._queue
            self._queue.append(pending)
            self._queued_items += count
            self.stats.requests += 1
            # The worker only waits for "first item" and "batch full": wake it for nothing else,
            # so concurrent single-item submits do not each cost a thread switch.
            if was_empty or self._queued_items >= self.max_batch:
                self._cond.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._drop(pending)
            raise

    def _drop(self, pending: _Pending[T, R]) -> None:
        with self._cond:
            if pending.done or pending.next_item >= len(pending.items):
                return
            remaining = len(pending.items) - pending.next_item
            pending.done = True
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            self._queued_items -= remaining
            self.stats.dropped_items += remaining

    # -- worker thread -------------------------------------------------------------------------

    def _take_batch(self) -> tuple[list[tuple[_Pending[T, R], int]], float] | None:
        """Block until a batch is due; return (request, item index) pairs and the oldest wait."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_items < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed or not self._queue:
                return None if self._closed else ([], 0.0)
            oldest_wait = time.monotonic() - self._queue[0].enqueued
            taken: list[tuple[_Pending[T, R], int]] = []
            while self._queue and len(taken) < self.max_batch:
                pending = self._queue[0]
                stop = min(len(pending.items), pending.next_item + self.max_batch - len(taken))
                taken.extend((pending, index) for index in range(pending.next_item, stop))
                self._queued_items -= stop - pending.next_item
                pending.next_item = stop
                if stop == len(pending.items):
                    self._queue.popleft()
            return taken, oldest_wait

    def _run(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            taken, oldest_wait = batch
            if taken:
                self._run_batch(taken, oldest_wait)

    def _run_batch(self, taken: list[tuple[_Pending[T, R], int]], oldest_wait: float) -> None:
        if self._length is not None:
            length = self._length
            taken.sort(key=lambda slot: length(slot[0].items[slot[1]]))
        started = time.monotonic()
        error: SluiceError | None = None
        results: Sequence[R] = ()
        try:
            results = self._forward([pending.items[index] for pending, index in taken])
            if len(results) != len(taken):
                raise RuntimeError(f"forward returned {len(results)} results for {len(taken)} items")
        except Exception as exc:  # every failure must reach the waiting requests
            error = forward_error(exc)
        run_ms = (time.monotonic() - started) * 1000.0

        outcomes: dict[asyncio.AbstractEventLoop, list[tuple[_Pending[T, R], list[R] | SluiceError]]] = {}
        with self._cond:
            for position, (pending, index) in enumerate(taken):
                if pending.done:  # cancelled, or already failed by an earlier slot of this pass
                    continue
                if error is not None:
                    pending.done = True
                    self._forget(pending)
                    outcomes.setdefault(pending.loop, []).append((pending, error))
                    continue
                pending.results[index] = results[position]
                pending.filled += 1
                if pending.filled == len(pending.items):
                    pending.done = True
                    # Every slot is filled now, so the list holds no None.
                    outcomes.setdefault(pending.loop, []).append((pending, cast(list[R], pending.results)))
        # Counted before the waiters wake, so that whoever a result reaches sees its pass counted.
        requests = len({id(pending) for pending, _ in taken})
        record = BatchRecord(self.name, len(taken), requests, oldest_wait * 1000.0, run_ms, error is None)
        self.stats.record(record)
        for observer in self._observers:
            try:
                observer(record)
            except Exception:
                log.exception("batch observer failed")
        for loop, settled in outcomes.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass

    def _forget(self, pending: _Pending[T, R]) -> None:
        """Remove a failed request's items that have not run yet (caller holds the lock)."""
        remaining = len(pending.items) - pending.next_item
        if remaining:
            pending.next_item = len(pending.items)
            self._queued_items -= remaining
            try:
                self._queue.remove(pending)
            except ValueError:
                pass
