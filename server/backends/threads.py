"""Torch intra-op threads for a model worker thread: set once, or chosen per pass by measurement.

On a small shared machine the best thread count for a forward pass changes with the pass size and
with what else holds the cores: two threads can be several times slower than one when another
process is busy, and faster when the machine is quiet. `ThreadTuner` times passes of each size
class (padded tokens, by power of two) with each candidate count, runs the fastest, and now and
then tries the others again so that it follows the load. `set_torch_threads` is the fixed
alternative (``SLUICE_TORCH_THREADS`` above 0).

Everything here runs on the worker thread that owns the forward passes, never on the event loop.
Only `set_torch_threads` and `ThreadTuner.run` touch torch, and they import it lazily.
"""

from __future__ import annotations

import os
import statistics
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
    """Chooses the thread count of each pass from the measured seconds per padded token.

    Per size class it first runs each candidate ``trials`` times, then the one with the lowest
    median of its last ``window`` samples; every ``explore_every`` passes of a class it runs the
    candidate measured longest ago instead, so a change of load is noticed.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        *,
        trials: int = 2,
        window: int = 5,
        explore_every: int = 64,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not candidates or min(candidates) < 1 or trials < 1 or window < 1 or explore_every < 2:
            raise ValueError("need candidates >= 1, trials >= 1, window >= 1, explore_every >= 2")
        self.candidates = list(dict.fromkeys(candidates))
        self.trials = trials
        self.window = window
        self.explore_every = explore_every
        self.clock = clock
        self.current = 0  # the count last set on the worker thread (0: not yet)
        self.chosen: dict[int, int] = {}  # passes run per thread count, for stats
        self._samples: dict[int, dict[int, deque[float]]] = {}
        self._last_run: dict[int, dict[int, int]] = {}
        self._passes: dict[int, int] = {}

    @staticmethod
    def size_class(padded_tokens: int) -> int:
        return max(1, padded_tokens).bit_length()

    def choose(self, padded_tokens: int) -> int:
        if len(self.candidates) == 1:
            return self.candidates[0]
        key = self.size_class(padded_tokens)
        samples = self._samples.setdefault(
            key, {count: deque(maxlen=self.window) for count in self.candidates}
        )
        last_run = self._last_run.setdefault(key, dict.fromkeys(self.candidates, -1))
        passes = self._passes.get(key, 0)
        self._passes[key] = passes + 1
        untried = [count for count in self.candidates if len(samples[count]) < self.trials]
        if untried:
            return min(untried, key=lambda count: len(samples[count]))
        if passes % self.explore_every == self.explore_every - 1:
            return min(self.candidates, key=lambda count: last_run[count])
        return min(self.candidates, key=lambda count: statistics.median(samples[count]))

    def record(self, padded_tokens: int, threads: int, seconds: float) -> None:
        key = self.size_class(padded_tokens)
        samples = self._samples.setdefault(
            key, {count: deque(maxlen=self.window) for count in self.candidates}
        )
        if threads not in samples:
            return
        samples[threads].append(seconds / max(1, padded_tokens))
        self._last_run.setdefault(key, dict.fromkeys(self.candidates, -1))[threads] = self._passes.get(key, 0)
        self.chosen[threads] = self.chosen.get(threads, 0) + 1

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
