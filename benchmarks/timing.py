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


def env_step_times_s(env, steps: int, rng: np.random.Generator) -> tuple[list, list]:
    """Seconds of each of ``steps`` env steps with uniform random actions in [-1, 1], and
    of the resets between episodes (the ``k``-th reset seeded ``k``)."""
    step_s, reset_s = [], []
    episode = 0
    for _ in range(steps):
        action = rng.uniform(-1.0, 1.0, env.action_space.shape).astype(np.float32)
        start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        step_s.append(time.perf_counter() - start)
        if terminated or truncated:
            episode += 1
            reset_s += call_times_s(lambda: env.reset(seed=episode), 1)  # noqa: B023
    return step_s, reset_s


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


def step_report(step_s: Sequence[float], reset_s: Sequence[float], peers: dict) -> dict:
    """Env step and reset summaries, and each peer's summary (``{name: seconds}``) with
    ``step_over_this``: the median step over the peer's median, the ratio to report."""
    report = {
        "steps_per_s": round(len(step_s) / sum(step_s), 2),
        "env_step": summary_ms(step_s),
        "env_reset": summary_ms(reset_s) if reset_s else None,
    }
    step_ms = report["env_step"]["median_ms"]
    for name, seconds in peers.items():
        peer = summary_ms(seconds)
        peer["step_over_this"] = round(step_ms / peer["median_ms"], 2)
        report[name] = peer
    return report
