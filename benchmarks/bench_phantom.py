"""Seconds to build one procedural phantom, against a plain fill of the same grid.

Run: ``python benchmarks/bench_phantom.py [--seeds 5]``. Prints absolute figures and
ratios, and writes ``benchmarks/results/bench_phantom.json`` (with the machine).

Measured in one process:

- ``make_phantom``: ``make_phantom(seed)`` for seeds 0 .. N-1 (232 x 168 x 360 voxels at
  2 mm: HU, labels, body mask, noise); the first call is reported apart (``cold``: it
  also pays first-touch page faults and caches), the others as ``warm``;
- peer ``numpy fill``: the same arrays made as plainly as numpy allows: a float32 HU
  grid filled with air, an int16 label grid of zeros, a boolean body mask and Gaussian
  noise added to the HU grid, so the ratio says how much the anatomy costs over the
  floor of producing a volume of this size at all.

Aim: under 2 s per phantom on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from machine_info import describe_machine

from sonoray.assets.phantom import PHANTOM_SHAPE, make_phantom

RESULTS = Path(__file__).resolve().parent / "results" / "bench_phantom.json"
TARGET_S = 2.0


def _numpy_fill(seed: int) -> None:
    hu = np.full(PHANTOM_SHAPE, -1000.0, dtype=np.float32)
    labels = np.zeros(PHANTOM_SHAPE, dtype=np.int16)
    body = np.zeros(PHANTOM_SHAPE, dtype=bool)
    noise = np.random.default_rng(seed).standard_normal(PHANTOM_SHAPE, dtype=np.float32)
    hu += noise
    del labels, body


def _seconds(fn, seed: int) -> float:
    start = time.perf_counter()
    fn(seed)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="phantoms to build (at least 2)")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds must be at least 2, got {args.seeds}")

    machine = describe_machine()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, "
        f"load {machine['load_average_1min_at_start']}"
    )
    cold = _seconds(make_phantom, 0)
    warm = [_seconds(make_phantom, seed) for seed in range(1, args.seeds)]
    fill = [_seconds(_numpy_fill, seed) for seed in range(args.seeds)]

    phantom_s = statistics.median(warm)
    fill_s = statistics.median(fill)
    rows = [
        {"name": "make_phantom (cold, seed 0)", "seconds": cold},
        {"name": f"make_phantom (warm, median of {len(warm)})", "seconds": phantom_s,
         "min_s": min(warm), "max_s": max(warm)},
        {"name": f"peer numpy fill (median of {len(fill)})", "seconds": fill_s,
         "min_s": min(fill), "max_s": max(fill)},
    ]  # fmt: skip
    for row in rows:
        print(f"{row['name']:<40s} {row['seconds']:7.3f} s")
    ratio = phantom_s / fill_s
    print(
        f"make_phantom / numpy fill: {ratio:.1f}x; aim under {TARGET_S:.1f} s: "
        f"{'met' if max(cold, *warm) < TARGET_S else 'missed'}"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "bench_phantom",
        "grid": list(PHANTOM_SHAPE),
        "machine": machine,
        "rows": rows,
        "ratio_phantom_to_numpy_fill": ratio,
        "target_s": TARGET_S,
        "target_met": max(cold, *warm) < TARGET_S,
        "date": time.strftime("%Y-%m-%d"),
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS.name}")


if __name__ == "__main__":
    main()
