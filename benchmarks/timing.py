"""Wall-clock timing of repeated calls and its summary, shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def call_times_s(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary_ms(seconds: Sequence[float]) -> dict:
    """Median, mean and 95th percentile in ms, and the count, of times in seconds.

    The median leads: on a shared machine bursts of load inflate the mean.
    """
    ms = np.asarray(seconds, dtype=float) * 1e3
    return {
        "median_ms": round(float(np.median(ms)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "p95_ms": round(float(np.percentile(ms, 95)), 4),
        "n": len(ms),
    }
