"""Benchmark the X-ray sensor (DRR) for speed and accuracy, against DiffDRR in the same run.

Usage::

    SONORAY_CHEST_CT=path/to/chest_ct python benchmarks/bench_drr.py [--quick] [--no-peer]

Cases: the example chest CT (512 x 512 x 133 at 0.70 x 0.70 x 2.5 mm) and a procedural
phantom (232 x 168 x 360 at 2 mm), AP views at 64, 128 and 256 px square, batch 1 and 16.
Geometry: source-to-detector 1020 mm, source-to-isocentre 850 mm, 400 mm detector (the
whole chest). Timings are the best wall-clock time of several runs after a warm-up, in
inference mode.

Accuracy: the sensor's total density line integrals (sum of its material channels) against a
dense reference: trilinear samples every 0.1 mm along each pixel's ray through the
full-resolution CT (3-D ``grid_sample``, independent of the sensor's code), NCC and NCC of
the image gradients.

Peer: DiffDRR 0.6.1 (MIT), its default ``trilinear`` renderer (500 points per ray) and its
exact ``siddon`` renderer, on the same density volume and the same rays. It is optional and
not a dependency of this project; without replacing torch it installs with::

    pip install --no-deps diffdrr==0.6.1 fastcore einops roma torchio kornia kornia_rs \\
        simpleitk humanize deprecated jaxtyping wadler_lindig pandas

Results go to ``benchmarks/results/bench_drr.json`` and ``.md``.
"""

from __future__ import annotations

import os

# Shared CPUs: threads that wait passively do not steal the core of the thread they wait for.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine_info import describe_machine

from sonoray.assets import tissues
from sonoray.sensors.drr import XRaySensor
from sonoray.sensors.xray_geometry import XRayGeometry

RESULTS = Path(__file__).parent / "results"
SOURCE_TO_DETECTOR_MM = 1020.0
SOURCE_TO_ISOCENTRE_MM = 850.0
DETECTOR_MM = 400.0
SIZES = (64, 128, 256)
REFERENCE_STEP_MM = 0.1
CT_MAX_VOXEL_MM = 1.5  # 0.7 x 0.7 x 2.5 mm -> 1.4 x 1.4 x 2.5 mm
SLOW_S = 2.0  # a call slower than this is timed once
PEER_MAX_RAYS = 16 * 128 * 128  # DiffDRR holds every sample of every ray in memory at once
FULL_MAX_RAYS = 16 * 128 * 128  # the full-resolution CT is timed up to this many rays


def timed(fn, repeats: int, device: torch.device) -> float:
    """Best wall time (ms) of ``fn`` after one warm-up call (one timed call if slow).

    The best of several runs is the least disturbed by other jobs on a shared machine.
    """
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > SLOW_S:
        repeats = 1
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def geometries(centre, pixels: int, batch: int, device) -> XRayGeometry:
    """AP views; a batch tilts each one a little (up to +-10 degrees) and shifts it."""
    rng = np.random.default_rng(0)
    geos = []
    for b in range(batch):
        tilt = np.zeros(3) if b == 0 else rng.uniform(-0.18, 0.18, 3) * [1, 0, 1]
        shift = np.zeros(3) if b == 0 else rng.uniform(-20, 20, 3)
        geos.append(
            XRayGeometry.from_isocentre(
                np.asarray(centre) + shift,
                np.array([0.0, 1.0, 0.0]) + tilt,
                source_to_isocentre_mm=SOURCE_TO_ISOCENTRE_MM,
                source_to_detector_mm=SOURCE_TO_DETECTOR_MM,
                detector_mm=DETECTOR_MM,
                pixels=pixels,
                device=device,
            )
        )
    return XRayGeometry.cat(geos)


def dense_reference(density: torch.Tensor, affine: np.ndarray, g: XRayGeometry) -> torch.Tensor:
    """(rows, cols) density line integrals sampled every 0.1 mm along each ray (batch item 0)."""
    shape = torch.tensor(density.shape, dtype=torch.float64)
    a = torch.as_tensor(affine, dtype=torch.float64)
    inv = torch.linalg.inv(a)
    src = g.source_mm[0].double().cpu()
    pixels = g.pixel_centres_mm()[0].reshape(-1, 3).double().cpu()
    corners = torch.cartesian_prod(*[torch.tensor([-0.5, n - 0.5]) for n in shape.tolist()])
    corners_mm = corners.double() @ a[:3, :3].T + a[:3, 3]
    centre = corners_mm.mean(0)
    radius = (corners_mm - centre).norm(dim=1).max()
    t0, t1 = float((centre - src).norm() - radius), float((centre - src).norm() + radius)
    n = int(np.ceil((t1 - t0) / REFERENCE_STEP_MM))
    ts = t0 + (torch.arange(n, dtype=torch.float64) + 0.5) * (t1 - t0) / n
    step = (t1 - t0) / n
    vol = density[None, None].float()
    out = torch.zeros(pixels.shape[0])
    chunk = max(1, 2_000_000 // n)
    for s in range(0, pixels.shape[0], chunk):
        p = pixels[s : s + chunk]
        length = (p - src).norm(dim=1, keepdim=True)
        u = (p - src) / length
        pts = src + u[:, None] * ts[None, :, None]  # (r, n, 3) mm
        ijk = pts @ inv[:3, :3].T + inv[:3, 3]
        keep = ((ijk >= -0.5) & (ijk <= shape - 0.5)).all(-1) & (ts[None] <= length)
        coords = (2 * ijk / (shape - 1) - 1).flip(-1).float()  # x -> k, y -> j, z -> i
        values = F.grid_sample(
            vol,
            coords.reshape(1, p.shape[0], n, 1, 3),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )[0, 0, :, :, 0]
        out[s : s + chunk] = (values * keep).sum(-1) * step
    return out.reshape(g.rows, g.cols)


def ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def gradient_ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    dx = ncc(a[:, 1:] - a[:, :-1], b[:, 1:] - b[:, :-1])
    dy = ncc(a[1:] - a[:-1], b[1:] - b[:-1])
    return (dx + dy) / 2


def load_ct(folder: Path):
    from sonoray.assets.ct import load_example_ct

    return load_example_ct(folder)


def diffdrr_renderers(density: torch.Tensor, affine: np.ndarray, pixels: int):
    """DiffDRR's renderers over ``density`` (its own voxel order and affine), or None."""
    try:
        from diffdrr.data import read
        from diffdrr.drr import DRR
        from torchio import ScalarImage
    except ImportError:
        return None
    subject = read(
        ScalarImage(tensor=density[None], affine=affine), orientation=None, center_volume=False
    )
    common = {"sdd": SOURCE_TO_DETECTOR_MM, "height": pixels, "delx": DETECTOR_MM / pixels}
    return {r: DRR(subject, renderer=r, **common) for r in ("trilinear", "siddon")}


def diffdrr_render(drr, density: torch.Tensor, g: XRayGeometry) -> torch.Tensor:
    """Render the same rays (source -> our pixel centres) with DiffDRR: (B, rows, cols)."""
    source = g.source_mm[:, None, :]
    target = g.pixel_centres_mm().reshape(g.batch_size, -1, 3)
    with torch.no_grad():
        out = drr.render(density, source, target)
    return out.reshape(g.batch_size, g.rows, g.cols)


def run_case(name, patient, sensors, repeats, device, peer, accuracy_sizes, records):
    centre = patient.voxel_to_patient((np.array(patient.shape) - 1) / 2)
    density = torch.from_numpy(tissues.density_from_hu(patient.hu).astype(np.float32))
    for pixels in SIZES:
        peers = diffdrr_renderers(density, patient.affine, pixels) if peer else None
        for batch in (1, 16):
            g = geometries(centre, pixels, batch, device)
            row = {"case": name, "pixels": pixels, "batch": batch}
            for label, sensor in sensors.items():
                if label == "full" and batch * pixels**2 > FULL_MAX_RAYS:
                    continue
                row[f"{label}_line_integrals_ms"] = timed(
                    partial(sensor.material_paths, g), repeats, device
                )
                row[f"{label}_render_ms"] = timed(
                    partial(sensor.render, g, kvp=90, mas=2.0, noise_seeds=list(range(batch))),
                    repeats,
                    device,
                )
            if peers is not None and device.type == "cpu":
                for r, drr in peers.items():
                    if r == "trilinear" and batch * pixels**2 <= PEER_MAX_RAYS or batch == 1:
                        row[f"diffdrr_{r}_ms"] = timed(
                            partial(diffdrr_render, drr, density, g), repeats, device
                        )
                if "diffdrr_trilinear_ms" in row:
                    fast = min(v for k, v in row.items() if k.endswith("_render_ms"))
                    row["speedup_vs_diffdrr_trilinear"] = row["diffdrr_trilinear_ms"] / fast
            records["timing"].append(row)
            print(json.dumps(row))

        if pixels in accuracy_sizes:
            g = geometries(centre, pixels, 1, device)
            start = time.perf_counter()
            reference = dense_reference(density, patient.affine, g.to("cpu"))
            acc = {
                "case": name,
                "pixels": pixels,
                "reference_s": round(time.perf_counter() - start, 1),
            }
            for label, sensor in sensors.items():
                total = sensor.material_paths(g)[0].sum(0).cpu() * 10.0  # g/cm^2 -> g/cm^3 mm
                acc[f"{label}_ncc"] = ncc(total, reference)
                acc[f"{label}_gradient_ncc"] = gradient_ncc(total, reference)
            if peers is not None:
                for r, drr in peers.items():
                    img = diffdrr_render(drr, density, g.to("cpu"))[0]
                    acc[f"diffdrr_{r}_ncc"] = ncc(img, reference)
                    acc[f"diffdrr_{r}_gradient_ncc"] = gradient_ncc(img, reference)
            records["accuracy"].append(acc)
            print(json.dumps(acc))


def write_markdown(records: dict, path: Path) -> None:
    m = records["machine"]
    lines = [
        "# DRR benchmark",
        "",
        f"Machine: {m['description']}, torch {m['torch']}, {m['torch_threads']} threads, load "
        f"average at start {m['load_average_1min_at_start']} (shared machine: "
        "other jobs ran at the same time, so times are noisy). Command: "
        "`python benchmarks/bench_drr.py`.",
        "",
        "Times are the best wall-clock time of several runs, in ms (OMP_WAIT_POLICY=PASSIVE). "
        "`full` = full-resolution CT (exact Joseph sampling), `slab3` / `slab6` = the same "
        "with rays sampling slabs about 3 / 6 mm thick across their dominant axis (CT: 4 / 8 "
        "planes of 0.7 mm, 1 / 2 of 2.5 mm), `vox1.5` = voxels averaged up to "
        f"{CT_MAX_VOXEL_MM} mm (1.4 x 1.4 x 2.5 mm), `native` = the phantom's own 2 mm grid. "
        "`render` = line integrals of 3 material channels + polychromatic detector + noise + "
        "window. The speed-up is DiffDRR trilinear over the fastest render.",
        "",
    ]
    for case in dict.fromkeys(r["case"] for r in records["timing"]):
        rows = [r for r in records["timing"] if r["case"] == case]
        keys = list(
            dict.fromkeys(k for r in rows for k in r if k not in ("case", "pixels", "batch"))
        )
        lines += [
            f"### {case}",
            "",
            "| px | B | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for r in rows:
            cells = [f"{r[k]:.1f}" if k in r else "-" for k in keys]
            lines.append(f"| {r['pixels']} | {r['batch']} | " + " | ".join(cells) + " |")
        lines.append("")
    if records["accuracy"]:
        keys = [k for k in records["accuracy"][0] if k not in ("case", "pixels")]
        lines += [
            "",
            "Accuracy against the dense reference (0.1 mm trilinear, full-resolution "
            "CT), total density line integrals:",
            "",
            "| case | px | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for r in records["accuracy"]:
            cells = [f"{r[k]:.5f}" if "ncc" in k else f"{r[k]}" for k in keys]
            lines.append(f"| {r['case']} | {r['pixels']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, accuracy at 128 only")
    parser.add_argument("--no-peer", action="store_true", help="skip DiffDRR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 3 if args.quick else 5
    accuracy_sizes = (128,) if args.quick else (128, 256)
    records = {"machine": describe_machine(), "timing": [], "accuracy": []}
    print(json.dumps(records["machine"]))

    with torch.inference_mode():
        ct_dir = os.environ.get("SONORAY_CHEST_CT")
        if ct_dir and (Path(ct_dir) / "ct.nii.gz").is_file():
            patient = load_ct(Path(ct_dir))
            sensors = {
                "full": XRaySensor.from_patients(patient, device=device),
                "slab3": XRaySensor.from_patients(patient, device=device, slab_mm=3.0),
                "slab6": XRaySensor.from_patients(patient, device=device, slab_mm=6.0),
                "vox1.5": XRaySensor.from_patients(
                    patient, device=device, max_voxel_mm=CT_MAX_VOXEL_MM
                ),
            }
            run_case(
                "chest CT",
                patient,
                sensors,
                repeats,
                device,
                not args.no_peer,
                accuracy_sizes,
                records,
            )
            del sensors
        else:
            print("example chest CT not found (set SONORAY_CHEST_CT); skipping it")

        from sonoray.assets.phantom import make_phantom

        phantom = make_phantom(0)
        sensors = {"native": XRaySensor.from_patients(phantom, device=device)}
        run_case("phantom", phantom, sensors, repeats, device, False, (), records)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_drr.json").write_text(json.dumps(records, indent=1))
    write_markdown(records, RESULTS / "bench_drr.md")
    print(f"wrote {RESULTS / 'bench_drr.json'} and .md")


if __name__ == "__main__":
    main()
