"""Continuous batching of embed and classify work: many small requests, one forward pass.

Requests from every session meet in one `MicroBatcher` per model. Its dedicated worker thread
never waits for company: when it is idle, a submitted request runs at once; while a pass runs,
whatever arrives is gathered and makes up the next pass (continuous batching, as
text-embeddings-inference does). A pass is capped by padded tokens (rows x longest row,
``max_batch_tokens``) and by rows (``max_batch``), and is planned from length buckets
(`server.backends.batch_plan`) so one long text does not pad many short ones. Items of a pass are
sorted by length; a request larger than one pass is split across passes.

What callers can rely on:
- CPU-bound work never runs on the event loop; `submit` only appends the request to a deque under
  a lock (no per-item work) and later sets futures (one ``call_soon_threadsafe`` per pass and
  loop). Item lengths (``lengths``) are computed on the worker thread.
- A request whose awaiting task is cancelled has its items dropped if they have not run yet.
- The queue is bounded (``max_queue`` items): past it `submit` raises ``overloaded`` at once.
- An exception in a forward pass fails only the requests that had items in that pass; it is
  translated to a `SluiceError` in `forward_error`, the one place this boundary maps exceptions.

This module must never import a model library: the forward and length functions are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from protocol.errors import ErrorCode, SluiceError
from server.backends.batch_plan import Buckets, Slot
from server.settings import Settings

__all__ = ["BatchRecord", "BatcherStats", "MicroBatcher", "forward_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Batch-size bucket bounds for `BatcherStats.size_buckets` (Prometheus-style, cumulative "le").
SIZE_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# What one more pass costs beyond its rows, in padded tokens: buckets merge when padding is cheaper.
PASS_OVERHEAD_TOKENS = 64


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
    padded_tokens: int = 0  # rows x longest row


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
    padded_tokens_sum: int = 0
    padded_tokens_max: int = 0
    size_buckets: dict[int, int] = field(default_factory=lambda: dict.fromkeys(SIZE_BUCKETS, 0))

    def record(self, batch: BatchRecord) -> None:
        self.batches += 1
        self.items += batch.size
        self.failed_batches += not batch.ok
        self.queue_wait_ms_sum += batch.queue_wait_ms
        self.queue_wait_ms_max = max(self.queue_wait_ms_max, batch.queue_wait_ms)
        self.run_ms_sum += batch.run_ms
        self.padded_tokens_sum += batch.padded_tokens
        self.padded_tokens_max = max(self.padded_tokens_max, batch.padded_tokens)
        for bound in SIZE_BUCKETS:
            if batch.size <= bound:
                self.size_buckets[bound] += 1


class _Pending(Generic[T, R]):
    """One submitted request: its items, the slots its results fill, and who waits for them."""

    __slots__ = ("done", "enqueued", "filled", "future", "items", "loop", "results", "taken")

    def __init__(self, items: Sequence[T], loop: asyncio.AbstractEventLoop) -> None:
        self.items = items
        self.loop = loop
        self.future: asyncio.Future[list[R]] = loop.create_future()
        self.results: list[R | None] = [None] * len(items)
        self.taken = 0  # items taken into a pass so far
        self.filled = 0
        self.done = False  # set under the lock once the outcome is decided (or it was cancelled)
        self.enqueued = time.monotonic()


Outcome = tuple[_Pending[T, R], list[R] | SluiceError]


def _settle(outcomes: list[Outcome[T, R]]) -> None:
    """Runs on the event loop: hand each finished request its results or its error."""
    for pending, outcome in outcomes:
        if pending.future.done():  # cancelled while its pass was running
            continue
        if isinstance(outcome, SluiceError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)


def _deliver(outcomes: list[Outcome[T, R]]) -> None:
    """From the worker thread: one callback per event loop for all of its finished requests."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome[T, R]]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # that loop is closed; nobody is waiting any more
            pass


def _alive(pending: _Pending[T, R]) -> bool:
    return not pending.done


class MicroBatcher(Generic[T, R]):
    """Collects items from concurrent `submit` calls into passes for ``forward``.

    ``forward`` runs on this batcher's worker thread and must return one result per item, in order.
    ``lengths`` (worker thread too) gives each item's length in tokens, one int per item; without
    it every item counts as one token and passes are plain arrival order. Call `start` once before
    submitting and `close` (awaited) when done.
    """

    def __init__(
        self,
        name: str,
        forward: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int,
        max_queue: int,
        max_batch_tokens: int = 16384,
        lengths: Callable[[Sequence[T]], Sequence[int]] | None = None,
        pass_overhead_tokens: int = PASS_OVERHEAD_TOKENS,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch, max_queue and max_batch_tokens must be >= 1")
        self.name = name
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._forward = forward
        self._lengths = lengths
        self._buckets: Buckets[_Pending[T, R]] = Buckets(
            max_rows=max_batch, max_tokens=max_batch_tokens, pass_overhead_tokens=pass_overhead_tokens
        )
        self._inbox: deque[_Pending[T, R]] = deque()  # submitted, not yet measured by the worker
        self._sizing: list[_Pending[T, R]] = []  # taken from the inbox, lengths being computed
        self._queued_items = 0
        self._cond = threading.Condition(threading.Lock())
        self._idle = False  # the worker waits for work: only then does `submit` wake it
        self._closed = False
        self._thread: threading.Thread | None = None
        self._observers: list[Callable[[BatchRecord], None]] = []
        # Runs first on the worker thread (e.g. to set that thread's torch intra-op threads, or to
        # time passes there), before `start` returns.
        self.on_thread_start: Callable[[], None] | None = None
        self._set_up = threading.Event()

    @classmethod
    def from_settings(
        cls,
        name: str,
        forward: Callable[[list[T]], Sequence[R]],
        settings: Settings,
        *,
        lengths: Callable[[Sequence[T]], Sequence[int]] | None = None,
        on_thread_start: Callable[[], None] | None = None,
    ) -> MicroBatcher[T, R]:
        """A batcher sized by the ``embed_max_*`` settings (embed and classify share them)."""
        batcher = cls(
            name,
            forward,
            max_batch=settings.embed_max_batch,
            max_queue=settings.embed_max_queue,
            max_batch_tokens=settings.embed_max_batch_tokens,
            lengths=lengths,
        )
        batcher.on_thread_start = on_thread_start
        return batcher

    def add_observer(self, observer: Callable[[BatchRecord], None]) -> None:
        """Call ``observer`` after every pass. It runs on the worker thread: keep it quick and thread-safe."""
        self._observers.append(observer)

    @property
    def queued(self) -> int:
        """Items waiting for a pass (not counting the one running)."""
        return self._queued_items

    def start(self) -> None:
        """Start the worker thread; returns once its ``on_thread_start`` has run (which may take
        seconds: a slow one is started from a thread, never from the event loop)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()
        self._set_up.wait()

    async def close(self) -> None:
        """Stop taking requests, fail the waiting ones with ``shutting_down``, join the worker."""
        with self._cond:
            self._closed = True
            waiting = [*self._inbox, *self._sizing, *self._buckets.owners()]
            self._inbox.clear()
            self._sizing = []
            self._buckets.clear()
            self._queued_items = 0
            abandoned = [pending for pending in waiting if not pending.done]
            for pending in abandoned:
                pending.done = True
            self._cond.notify_all()
        error = SluiceError(ErrorCode.SHUTTING_DOWN, f"model {self.name} is shutting down")
        _deliver([(pending, error) for pending in abandoned])
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
            self._inbox.append(pending)
            self._queued_items += count
            self.stats.requests += 1
            # A busy worker looks at the inbox after its pass anyway: wake only an idle one, so
            # concurrent submits during a pass do not each cost a thread switch.
            if self._idle:
                self._idle = False
                self._cond.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._drop(pending)
            raise

    def _drop(self, pending: _Pending[T, R]) -> None:
        with self._cond:
            remaining = len(pending.items) - pending.taken
            if pending.done or remaining == 0:
                return
            pending.done = True  # its queued slots are skipped, and removed, by the planner
            self._queued_items -= remaining
            self.stats.dropped_items += remaining

    # -- worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.on_thread_start is not None:
                self.on_thread_start()
        except Exception:  # the passes still run; a broken model fails them one by one
            log.exception("setting up the worker thread of %s failed", self.name)
        finally:
            self._set_up.set()
        while True:
            with self._cond:
                while self._queued_items == 0 and not self._closed:
                    self._inbox.clear()  # only cancelled requests can be left in it
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if self._closed:
                    return
                arrivals = [pending for pending in self._inbox if not pending.done]
                self._inbox.clear()
                self._sizing = arrivals
            if arrivals and not self._admit(arrivals):
                return
            with self._cond:
                slots = self._buckets.take(_alive)
                for slot in slots:
                    slot.owner.taken += 1
                self._queued_items -= len(slots)
            if slots:
                self._run_batch(slots)

    def _admit(self, arrivals: list[_Pending[T, R]]) -> bool:
        """Measure new requests (outside the lock) and queue their items; False once closed."""
        sized = self._measure(arrivals)
        failed: list[Outcome[T, R]] = []
        with self._cond:
            self._sizing = []
            if self._closed:  # `close` has failed these already
                return False
            for pending, outcome in sized:
                if pending.done:
                    continue
                if isinstance(outcome, SluiceError):
                    pending.done = True
                    self._queued_items -= len(pending.items)
                    failed.append((pending, outcome))
                else:
                    self._buckets.add(pending, outcome)
        _deliver(failed)
        return True

    def _measure(
        self, arrivals: list[_Pending[T, R]]
    ) -> list[tuple[_Pending[T, R], list[int] | SluiceError]]:
        """Item lengths per request: one ``lengths`` call for all of them, or, when that fails,
        one per request, so that only the request that cannot be measured fails."""
        if self._lengths is None:
            return [(pending, [1] * len(pending.items)) for pending in arrivals]
        if len(arrivals) > 1:
            with contextlib.suppress(Exception):  # measured again one by one below
                every = list(self._lengths([item for pending in arrivals for item in pending.items]))
                if len(every) == sum(len(pending.items) for pending in arrivals):
                    out: list[tuple[_Pending[T, R], list[int] | SluiceError]] = []
                    start = 0
                    for pending in arrivals:
                        out.append((pending, every[start : start + len(pending.items)]))
                        start += len(pending.items)
                    return out
        sized: list[tuple[_Pending[T, R], list[int] | SluiceError]] = []
        for pending in arrivals:
            try:
                lengths = list(self._lengths(pending.items))
                if len(lengths) != len(pending.items):
                    raise RuntimeError(f"lengths gave {len(lengths)} values for {len(pending.items)} items")
                sized.append((pending, lengths))
            except Exception as exc:  # a request that cannot be measured fails alone
                sized.append((pending, forward_error(exc)))
        return sized

    def _run_batch(self, slots: list[Slot[_Pending[T, R]]]) -> None:
        if self._lengths is not None:
            slots.sort(key=lambda slot: slot.length)
        started = time.monotonic()
        oldest_wait = started - min(slot.owner.enqueued for slot in slots)
        padded = len(slots) * max(slot.length for slot in slots)
        error: SluiceError | None = None
        results: Sequence[R] = ()
        try:
            results = self._forward([slot.owner.items[slot.index] for slot in slots])
            if len(results) != len(slots):
                raise RuntimeError(f"forward returned {len(results)} results for {len(slots)} items")
        except Exception as exc:  # every failure must reach the waiting requests
            error = forward_error(exc)
        run_ms = (time.monotonic() - started) * 1000.0

        outcomes: list[Outcome[T, R]] = []
        with self._cond:
            for position, slot in enumerate(slots):
                pending = slot.owner
                if pending.done:  # cancelled, or already failed by an earlier slot of this pass
                    continue
                if error is not None:
                    pending.done = True
                    self._queued_items -= len(pending.items) - pending.taken  # its rest never runs
                    outcomes.append((pending, error))
                    continue
                pending.results[slot.index] = results[position]
                pending.filled += 1
                if pending.filled == len(pending.items):
                    pending.done = True
                    # Every slot is filled now, so the list holds no None.
                    outcomes.append((pending, cast(list[R], pending.results)))
        # Counted before the waiters wake, so that whoever a result reaches sees its pass counted.
        requests = len({id(slot.owner) for slot in slots})
        record = BatchRecord(
            self.name, len(slots), requests, oldest_wait * 1000.0, run_ms, error is None, padded
        )
        self.stats.record(record)
        for observer in self._observers:
            try:
                observer(record)
            except Exception:
                log.exception("batch observer failed")
        _deliver(outcomes)
