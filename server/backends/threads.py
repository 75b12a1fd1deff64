"""Torch intra-op threads for a model worker thread: set once, or chosen per pass by measurement.

On a small shared machine the best thread count for a forward pass changes with the pass size and
with what else holds the cores: two threads can be several times slower than one when another
process is busy, and faster when the machine is quiet. `ThreadTuner` times passes of each size
class with each candidate count, runs the fastest, and now and then (rationed by time) tries the
others again so that it follows the load. `set_torch_threads` is the fixed
alternative (``SLUICE_TORCH_THREADS`` above 0).

Everything here runs on the worker thread that owns the forward passes, never on the event loop.
Only `set_torch_threads` and `ThreadTuner.run` touch torch, and they import it lazily.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["ThreadTuner", "available_cores", "set_torch_threads", "thread_candidates"]

V = TypeVar("V")


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads for the calling worker thread (0: all cores).

    Per thread on purpose: the local decode loop wants fewer threads than a batched encode, and
    torch takes the count from the thread that runs the ops.
    """
    import torch

    torch.set_num_threads(threads or available_cores())


def thread_candidates(setting: int) -> list[int]:
    """The counts a tuner chooses from: just ``setting`` when it is fixed (> 0), else 1 and all cores."""
    if setting > 0:
        return [setting]
    return sorted({1, available_cores()})


class ThreadTuner:
    """Chooses the thread count of each pass from the measured wall seconds per padded token.

    Per size class (padded tokens, by powers of four) each candidate runs until it has a sample,
    and from then on the one with the lowest median of its last ``window`` samples, where a count
    other than the smallest must be faster by ``margin`` (its extra threads cost CPU). A candidate
    that is not the best is tried again after ``explore_interval_s`` times how much slower than the
    best it was, per class: on a loaded machine a pass with too many threads can take many times
    as long, so trying it is rationed by time and by its cost, not by a count of passes.

    The first pass of each count in each class on each thread only warms up and is not counted: a
    first pass of a shape is slow whatever the count, and the first one with more threads on a
    thread also starts that thread's OpenMP team, which can take longer than the pass itself. Were
    it counted, more threads would look several times slower than they are and not be tried again
    for minutes (the load-time calibration runs on another thread than the passes it tunes).
    """

    def __init__(
        self,
        candidates: Sequence[int],
        *,
        window: int = 5,
        explore_interval_s: float = 10.0,
        margin: float = 1.2,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not candidates or min(candidates) < 1 or window < 1 or explore_interval_s <= 0 or margin < 1:
            raise ValueError("need candidates >= 1, window >= 1, a positive explore interval, margin >= 1")
        self.candidates = sorted(set(candidates))
        self.margin = margin
        self.window = window
        self.explore_interval_s = explore_interval_s
        self.clock = clock
        self.current = 0  # the count last set on the worker thread (0: not yet)
        self.chosen: dict[int, int] = {}  # passes run per thread count, for stats
        self._samples: dict[tuple[int, int], deque[float]] = {}
        self._tried_at: dict[tuple[int, int], float] = {}
        self._warm: set[tuple[int, int, int]] = set()  # (thread, size class, count) seen once

    def measured_classes(self) -> list[int]:
        """The size classes where every candidate has been timed."""
        keys = {key for key, _ in self._samples}
        return sorted(k for k in keys if all(self._samples.get((k, c)) for c in self.candidates))

    @staticmethod
    def size_class(padded_tokens: int) -> int:
        return (max(1, padded_tokens).bit_length() + 1) // 2

    def choose(self, padded_tokens: int) -> int:
        """The thread count for the next pass of this size (call `record` after it)."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        key = self.size_class(padded_tokens)
        untried = [count for count in self.candidates if not self._samples.get((key, count))]
        if untried:
            return untried[0]
        medians = {count: statistics.median(self._samples[(key, count)]) for count in self.candidates}
        # More threads cost more CPU: they must be clearly faster (by ``margin``) to be chosen.
        best = min(
            self.candidates,
            key=lambda count: medians[count] * (1.0 if count == self.candidates[0] else self.margin),
        )
        now = self.clock()
        for count in self.candidates:
            # A count k times slower than the best waits k intervals: trying it costs little.
            wait = self.explore_interval_s * max(1.0, medians[count] / max(medians[best], 1e-12))
            if count != best and now - self._tried_at[(key, count)] >= wait:
                return count
        return best

    def record(self, padded_tokens: int, threads: int, seconds: float) -> None:
        self.chosen[threads] = self.chosen.get(threads, 0) + 1
        if len(self.candidates) == 1 or threads not in self.candidates:
            return
        key = self.size_class(padded_tokens)
        first = (threading.get_ident(), key, threads)
        if first not in self._warm:
            self._warm.add(first)
            return
        samples = self._samples.setdefault((key, threads), deque(maxlen=self.window))
        samples.append(seconds / max(1, padded_tokens))
        self._tried_at[(key, threads)] = self.clock()

    def run(self, padded_tokens: int, forward: Callable[[], V]) -> V:
        """Run ``forward`` with the chosen thread count (set on this thread) and time it."""
        threads = self.choose(padded_tokens)
        if threads != self.current:
            set_torch_threads(threads)
            self.current = threads
        started = self.clock()
        result = forward()
        self.record(padded_tokens, threads, self.clock() - started)
        return result
