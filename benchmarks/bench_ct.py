"""Benchmark real CT import and skin meshing on the example chest CT.

Times ``load_example_ct`` at the native grid and resampled to 2 mm, and the skin
mesh built from each (``Patient.skin_mesh``), against a peer measured in the same
run: a bare ``nibabel`` load with ``get_fdata`` of the same CT and label files (the
decompression and conversion every importer pays). Prints absolute seconds and
ratios, and writes ``benchmarks/results/bench_ct.json``.

Usage::

    python benchmarks/bench_ct.py [--ct FOLDER] [--repeats 3]

FOLDER defaults to the ``SONORAY_CHEST_CT`` environment variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine_info import describe_machine, load_average

from sonoray.assets.ct import load_example_ct

RESULTS = Path(__file__).resolve().parent / "results" / "bench_ct.json"
TARGET_S = 5.0  # aim: CT load plus skin mesh on a 2-core CPU


def _time(fn, repeats: int) -> tuple[float, float, object]:
    """Median and minimum wall time of ``fn()`` over ``repeats`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), result


def _peer(folder: Path):
    ct = nib.load(folder / "ct.nii.gz").get_fdata(dtype=np.float32)
    labels = np.asanyarray(nib.load(folder / "labels.nii.gz").dataobj)
    return ct, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=os.environ.get("SONORAY_CHEST_CT"), help="CT folder")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.ct or not (Path(args.ct) / "ct.nii.gz").is_file():
        raise SystemExit("example CT not found: pass --ct FOLDER or set SONORAY_CHEST_CT")
    folder = Path(args.ct)

    rows = {}
    rows["peer: nibabel load + get_fdata (ct and labels)"] = _time(
        lambda: _peer(folder), args.repeats
    )
    for label, spacing in (("native", None), ("2 mm", 2.0)):
        med, low, patient = _time(
            lambda s=spacing: load_example_ct(folder, spacing_mm=s), args.repeats
        )
        rows[f"load_ct {label}"] = (med, low, patient)
        # A fresh Patient per call so that the cached mesh is rebuilt each time.
        mesh_repeats = args.repeats if spacing else 1
        rows[f"skin mesh {label}"] = _time(
            lambda p=patient: dataclasses.replace(p).skin_mesh, mesh_repeats
        )

    peer_s = rows["peer: nibabel load + get_fdata (ct and labels)"][0]
    machine = describe_machine()
    print(f"CT import on {machine['cpu']}, {machine['cores']} cores; median of {args.repeats}")
    out = {"machine": machine, "ct": folder.name, "repeats": args.repeats, "seconds": {}}
    for name, (med, low, _) in rows.items():
        print(f"  {name:<50s} {med:6.2f} s (min {low:5.2f})  x{med / peer_s:4.1f} peer")
        out["seconds"][name] = {
            "median": round(med, 3),
            "min": round(low, 3),
            "ratio_to_peer": round(med / peer_s, 2),
        }
    for label in ("native", "2 mm"):
        total = rows[f"load_ct {label}"][0] + rows[f"skin mesh {label}"][0]
        verdict = "within" if total <= TARGET_S else "over"
        print(f"  load + mesh {label}: {total:.2f} s ({verdict} the {TARGET_S:.0f} s aim)")
        out["seconds"][f"load + mesh {label}"] = round(total, 3)
    for label in ("native", "2 mm"):
        patient, mesh = rows[f"load_ct {label}"][2], rows[f"skin mesh {label}"][2]
        out[f"grid {label}"] = {
            "shape": list(patient.shape),
            "spacing_mm": [round(float(s), 4) for s in patient.spacing_mm],
            "mesh_faces": int(len(mesh.faces)),
        }
    machine["load_average_1min_at_end"] = load_average()
    print(
        f"  load average (1 min) at start {machine['load_average_1min_at_start']}, "
        f"at end {machine['load_average_1min_at_end']}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print("written benchmarks/results/bench_ct.json")


if __name__ == "__main__":
    main()
