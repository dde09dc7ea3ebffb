"""Summary statistics of evaluation runs and the regression gate on success rates.

The 95% interval of a success rate is Wilson's score interval (Wilson 1927), which
stays inside [0, 1] and behaves at 0 and 100% success, unlike the normal one.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when ``n`` is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else low), (1.0 if successes == n else high)


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarize(records: Iterable[dict]) -> list[dict]:
    """One result per (env id, task, agent), sorted, from per-episode records."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["env_id"], r["task"], r["agent"])].append(r)
    results = []
    for (env_id, task, agent), recs in sorted(groups.items()):
        n = len(recs)
        k = sum(bool(r["success"]) for r in recs)
        low, high = wilson_interval(k, n)
        results.append(
            {
                "env_id": env_id,
                "task": task,
                "agent": agent,
                "episodes": n,
                "successes": k,
                "success_rate": k / n,
                "success_ci95": [low, high],
                "mean_score": _mean([r["final_score"] for r in recs]),
                "mean_return": _mean([r["return"] for r in recs]),
                "median_steps": _median([r["steps"] for r in recs]),
                "mean_dose_dap_mgy_cm2": _mean(
                    [r["dose_dap_mgy_cm2"] for r in recs if r.get("dose_dap_mgy_cm2") is not None]
                ),
                "max_peak_force_n": max(
                    (r["peak_force_n"] for r in recs if r.get("peak_force_n") is not None),
                    default=None,
                ),
                "safety_violations": sum(int(r.get("safety_violation", False)) for r in recs),
            }
        )
    return results


@dataclass(frozen=True)
class BaselineEntry:
    """Minimum success rate for one (env id, task, agent), with an allowed shortfall."""

    env_id: str
    task: str
    agent: str
    min_success_rate: float
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_success_rate", float(self.min_success_rate))
        object.__setattr__(self, "tolerance", float(self.tolerance))


def load_baseline(path: str | Path) -> list[BaselineEntry]:
    """Read a baseline file (YAML or JSON).

    Format::

        sonoray/XRayPositioning-v0:        # env id
          chest_ap:                        # task
            scripted:                      # agent
              min_success_rate: 0.9
              tolerance: 0.05              # optional, default 0

    Raises:
        ValueError: on a file that is not of this form, naming the bad entry.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"baseline file {str(path)!r} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"baseline file {str(path)!r} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"baseline file {str(path)!r} must map env id -> task -> agent -> "
            "{min_success_rate, tolerance}"
        )
    entries = []
    for env_id, tasks in data.items():
        if not isinstance(tasks, dict):
            raise ValueError(f"baseline {env_id!r}: expected a mapping of tasks, got {tasks!r}")
        for task, agents in tasks.items():
            if not isinstance(agents, dict):
                raise ValueError(f"baseline {env_id}/{task}: expected a mapping of agents")
            for agent, rule in agents.items():
                where = f"baseline {env_id}/{task}/{agent}"
                if not isinstance(rule, dict) or "min_success_rate" not in rule:
                    raise ValueError(f"{where}: expected {{min_success_rate: x}}, got {rule!r}")
                unknown = set(rule) - {"min_success_rate", "tolerance"}
                if unknown:
                    raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
                rate, tol = rule["min_success_rate"], rule.get("tolerance", 0.0)
                for name, value in (("min_success_rate", rate), ("tolerance", tol)):
                    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                        raise ValueError(f"{where}: {name} must be in [0, 1], got {value!r}")
                entries.append(
                    BaselineEntry(env_id, str(task), str(agent), float(rate), float(tol))
                )
    return entries


def check_baseline(results: Sequence[dict], baseline: Sequence[BaselineEntry]) -> list[str]:
    """Messages for each baseline entry whose success rate regressed (empty when none).

    An entry regresses when its measured rate is below ``min_success_rate - tolerance``.
    Entries with no measured result are skipped (a run may cover part of the baseline).
    """
    by_key = {(r["env_id"], r["task"], r["agent"]): r for r in results}
    regressions = []
    for b in baseline:
        r = by_key.get((b.env_id, b.task, b.agent))
        if r is None:
            continue
        floor = b.min_success_rate - b.tolerance
        if r["success_rate"] < floor - 1e-12:
            regressions.append(
                f"{b.env_id} {b.task} {b.agent}: success rate {r['success_rate']:.3f} "
                f"({r['successes']}/{r['episodes']}) below baseline {b.min_success_rate:.3f}"
                f" - tolerance {b.tolerance:.3f}"
            )
    return regressions
