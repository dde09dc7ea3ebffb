"""B-mode frames per second on the procedural phantom, against peers in the same run.

Run: ``python benchmarks/bench_bmode.py [--repeats 30] [--threads 1 2]``. Prints absolute
figures and ratios, and writes ``benchmarks/results/bench_bmode.json`` (with the machine and
its load average: on a shared machine, torch's two-thread kernels wait for each other when
another process holds a core, so the one-thread figures are the steadier ones).

Scene: ``make_phantom(0)`` (232 x 168 x 360 voxels at 2 mm), the probe on the anterior
abdominal skin above the liver, beam along the inward skin normal; a batch jitters the
pose by a few millimetres. Frames are 128 x 128 with the liver as target (its mask comes
with every frame). Measured per preset (convex, linear), batch 1 and 16, on CPU (and CUDA
when present):

- ``full``: the default B-mode frame (speckle, point-spread function, target mask);
- peer ``no speckle/PSF``: the same frame with speckle and PSF off (geometry, tissue
  lookup, transmission, attenuation, log compression, scan conversion), so the cost of
  speckle and PSF is visible;
- peer ``grid_sample``: one trilinear ``grid_sample`` of a float copy of the tissue volume
  at the frame's own line samples (B x 128 x S points), the floor of any renderer that
  samples the volume along the scan lines.

Aim: at least 100 frames per second at batch 1 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine_info import describe_machine
from scipy import ndimage

from sonoray.assets.phantom import make_phantom
from sonoray.sensors.probes import scan_lines
from sonoray.sensors.ultrasound import BModeSettings, BModeSimulator

RESULTS = Path(__file__).resolve().parent / "results" / "bench_bmode.json"
TARGET_FPS = 100.0
PRESS_MM = 5.0


def _probe_poses(patient, batch: int, seed: int = 0) -> torch.Tensor:
    """Poses on the anterior skin above the liver, beam along the inward skin normal."""
    centroid = patient.centroid_mm("liver")
    inverse = np.linalg.inv(patient.affine)
    ijk = np.round(centroid @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
    column = patient.body_mask[ijk[0], ijk[1] :, ijk[2]]
    skin_j = ijk[1] + int(np.argmin(column))  # first voxel outside the body going anterior
    skin = patient.voxel_to_patient(np.array([ijk[0], skin_j - 0.5, ijk[2]]))
    smooth = ndimage.gaussian_filter(patient.body_mask.astype(np.float32), 2.0)
    gradient = np.array([g[ijk[0], skin_j - 1, ijk[2]] for g in np.gradient(smooth)])
    outward = -(patient.affine[:3, :3] @ gradient)
    outward /= np.linalg.norm(outward)
    rng = np.random.default_rng(seed)
    poses = np.repeat(np.eye(4)[None], batch, 0)
    for pose in poses:
        beam = -outward
        lateral = np.array([1.0, 0.0, 0.0]) - beam[0] * beam
        lateral /= np.linalg.norm(lateral)
        pose[:3, 0], pose[:3, 2] = lateral, beam
        pose[:3, 1] = np.cross(beam, lateral)
        pose[:3, 3] = skin + PRESS_MM * beam + rng.uniform(-5.0, 5.0, 3) * [1, 0, 1]
    return torch.tensor(poses, dtype=torch.float32)


def _line_sample_grid(sim: BModeSimulator, patient, poses: torch.Tensor) -> torch.Tensor:
    """The line samples of ``poses`` as a ``grid_sample`` grid over the patient's volume."""
    origins, directions = scan_lines(sim.preset, dtype=torch.float32, device=poses.device)
    depths = sim.sample_depths_mm[:, None, None]
    probe = (origins + depths * directions).reshape(-1, 3)  # (S * L, 3)
    patient_mm = probe @ poses[:, :3, :3].transpose(1, 2) + poses[:, None, :3, 3]  # (B, N, 3)
    inverse = torch.as_tensor(np.linalg.inv(patient.affine), dtype=torch.float32)
    ijk = patient_mm @ inverse[:3, :3].T.to(poses.device) + inverse[:3, 3].to(poses.device)
    size = torch.tensor(patient.shape, dtype=torch.float32, device=poses.device)
    normalised = (2.0 * ijk / (size - 1) - 1.0).flip(-1)  # grid_sample wants (k, j, i)
    return normalised.reshape(1, 1, 1, -1, 3)


def _time(fn, repeats: int, device: torch.device) -> dict:
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds)}


def _bench_device(patient, device: torch.device, repeats: int, threads: int) -> list[dict]:
    rows = []
    target_ids = patient.structure_ids("liver")
    volume = torch.as_tensor(patient.tissue_map, device=device).float()[None, None]
    for preset in ("convex", "linear"):
        full = BModeSimulator(patient, preset, device=device)
        bare = BModeSimulator(
            patient, preset, device=device, settings=BModeSettings(speckle=False, psf=False)
        )
        for batch in (1, 16):
            poses = _probe_poses(patient, batch).to(device)
            grid = _line_sample_grid(full, patient, poses)
            cases = {
                "full": lambda s=full, p=poses: s.render(p, target_ids=target_ids),
                "peer: no speckle/PSF": lambda s=bare, p=poses: s.render(p),
                "peer: grid_sample": lambda g=grid: F.grid_sample(volume, g, align_corners=True),
            }
            timings = {name: _time(fn, repeats, device) for name, fn in cases.items()}
            reference = timings["full"]["median_ms"]
            for name, t in timings.items():
                rows.append(
                    {
                        "device": device.type,
                        "threads": threads,
                        "preset": preset,
                        "batch": batch,
                        "case": name,
                        "samples_per_frame": full.n_lines * full.n_samples,
                        "median_ms": round(t["median_ms"], 3),
                        "min_ms": round(t["min_ms"], 3),
                        "fps_median": round(1e3 * batch / t["median_ms"], 1),
                        "fps_best": round(1e3 * batch / t["min_ms"], 1),
                        "ratio_to_full": round(t["median_ms"] / reference, 3),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()})
    )
    args = parser.parse_args()

    machine = describe_machine()
    patient = make_phantom(0)
    patient.tissue_map  # noqa: B018  (built once, outside the timings)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for device in devices:
            rows += _bench_device(patient, device, args.repeats, threads)
    machine["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)

    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}")
    print(f"phantom: {patient.shape} voxels at 2 mm; 128 x 128 frames")
    header = f"{'device':6} {'thr':>3} {'preset':7} {'B':>3} {'case':22} {'ms':>9} {'fps':>8}"
    header += f" {'best fps':>9}"
    print(header + f" {'x full':>7}")
    for r in rows:
        print(
            f"{r['device']:6} {r['threads']:>3} {r['preset']:7} {r['batch']:>3} {r['case']:22}"
            f" {r['median_ms']:9.2f}"
            f" {r['fps_median']:8.1f} {r['fps_best']:9.1f} {r['ratio_to_full']:7.2f}"
        )
    cpu_single = [
        r for r in rows if r["device"] == "cpu" and r["batch"] == 1 and r["case"] == "full"
    ]
    verdict = {
        f"{r['preset']}, {r['threads']} thread(s)": r["fps_median"] >= TARGET_FPS
        for r in cpu_single
    }
    print(f"target {TARGET_FPS:.0f} fps at batch 1 on CPU (median): {verdict}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine,
                "phantom_shape": list(patient.shape),
                "image_shape": [128, 128],
                "repeats": args.repeats,
                "target_fps_batch1_cpu": TARGET_FPS,
                "meets_target": verdict,
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
