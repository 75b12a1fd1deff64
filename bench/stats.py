"""Small statistics shared by the benchmarks: percentiles, medians, client CPU accounting."""

from __future__ import annotations

import math
import resource
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CpuMeter", "median", "percentile", "ratio"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    finite = [value for value in values if value is not None and not math.isnan(value)]
    return statistics.median(finite) if finite else math.nan


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return None
    return value / baseline


@dataclass
class CpuMeter:
    """CPU seconds this process spends between `start()` and `stop()` (the load generator's own cost)."""

    _start: float = 0.0
    seconds: float = 0.0

    @staticmethod
    def _now() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> float:
        self.seconds = self._now() - self._start
        return self.seconds
