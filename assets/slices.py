"""Figures of a patient's three orthogonal slices, with its labelled structures coloured.

``save_mid_slices(patient, path_png)`` writes an axial, a coronal and a sagittal slice
through one point (by default the body's centre, at the liver's level when the patient
has a liver): the top row shows CT numbers in a soft-tissue window, the bottom row the
same with every labelled structure tinted in its own colour and the larger ones named.
Slices are shown in radiological convention: axial seen from the feet (anterior up,
patient's right on the viewer's left), coronal seen from the front (head up, patient's
right on the left), sagittal seen from the patient's left (head up, anterior on the left).
Any axis order or orientation of the voxel grid works: the volume is first permuted and
flipped to RAS order (the nearest axis-aligned orientation; oblique grids are not
resampled).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

from sonoray.assets.patient import Patient

#: Default grey window (level, width) in HU: soft tissue, with lungs and bone saturated.
SOFT_TISSUE_WINDOW_HU = (40.0, 500.0)


def canonical_arrays(patient: Patient) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HU and labels permuted and flipped so that axes run along +x, +y, +z (RAS).

    Returns:
        hu, labels, spacing_mm (3,) along x, y, z, and origin_mm (3,): the patient
        coordinates of voxel (0, 0, 0) of the returned arrays.
    """
    rot = patient.affine[:3, :3]
    order = np.argmax(np.abs(rot), axis=1)  # voxel axis that runs along x, y, z
    if sorted(order.tolist()) != [0, 1, 2]:
        raise ValueError(f"affine {patient.affine.tolist()} has no clear axis per direction")
    hu = np.transpose(patient.hu, order)
    labels = np.transpose(patient.labels, order)
    flips = [rot[d, order[d]] < 0 for d in range(3)]
    index = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    hu, labels = hu[index], labels[index]
    spacing = np.abs(rot[np.arange(3), order])
    corner = np.array([patient.hu.shape[order[d]] - 1 if flips[d] else 0 for d in range(3)])
    ijk = np.zeros(3)
    ijk[order] = corner
    return hu, labels, spacing, patient.voxel_to_patient(ijk)


def default_point_mm(patient: Patient) -> np.ndarray:
    """Body centre in x and y; the liver's level in z when there is a liver."""
    point = patient.body_bounds_mm.mean(axis=0)
    if patient.has_structure("liver"):
        point[2] = patient.centroid_mm("liver")[2]
    return point


def label_colour(label_id: int) -> tuple[float, float, float]:
    """A stable, well-spread RGB colour for a label id."""
    hue = (label_id * 0.6180339887) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95)


def save_mid_slices(
    patient: Patient,
    path_png: str | Path,
    point_mm: np.ndarray | None = None,
    window_hu: tuple[float, float] = SOFT_TISSUE_WINDOW_HU,
) -> Path:
    """Write a PNG of the axial, coronal and sagittal slices through ``point_mm``.

    Args:
        patient: Any patient (phantom or CT).
        path_png: Output file.
        point_mm: Patient RAS point the three slices pass through; default
            :func:`default_point_mm`.
        window_hu: Grey window (level, width) in HU.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hu, labels, spacing, origin = canonical_arrays(patient)
    point = default_point_mm(patient) if point_mm is None else np.asarray(point_mm, float)
    idx = np.clip(np.round((point - origin) / spacing).astype(int), 0, np.array(hu.shape) - 1)
    level, width = window_hu
    grey = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)

    lut = np.zeros((int(labels.max()) + 1, 3))
    for i in range(1, len(lut)):
        lut[i] = label_colour(i)
    # Each view: (2-D slice in display order, extent in mm, title)
    x0, y0, z0 = origin
    x1, y1, z1 = origin + spacing * (np.array(hu.shape) - 1)
    views = (
        (np.s_[::-1, ::-1, idx[2]], (x1, x0, y0, y1), f"axial z = {point[2]:.0f} mm", "R", "A"),
        (np.s_[::-1, idx[1], ::-1], (x1, x0, z0, z1), f"coronal y = {point[1]:.0f} mm", "R", "S"),
        (np.s_[idx[0], ::-1, ::-1], (y1, y0, z0, z1), f"sagittal x = {point[0]:.0f} mm", "A", "S"),
    )
    fig = Figure(figsize=(15, 10), dpi=100)
    FigureCanvasAgg(fig)
    for col, (sl, extent, title, left, _up) in enumerate(views):
        g = grey[sl].T
        lab = labels[sl].T
        rgb = np.repeat(g[..., None], 3, axis=2)
        tinted = np.where(lab[..., None] > 0, 0.55 * rgb + 0.45 * lut[lab], rgb)
        for row, image in enumerate((rgb, tinted)):
            ax = fig.add_subplot(2, 3, 1 + col + 3 * row)
            ax.imshow(image, extent=extent, interpolation="nearest")
            ax.set_title(title if row == 0 else f"{title}, labels", fontsize=10)
            ax.set_xlabel(f"mm (patient {left} on the left)", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 1:
                _name_structures(ax, lab, extent, patient.label_names)
    fig.suptitle(f"{patient.name}: HU window L{level:.0f} W{width:.0f}", fontsize=12)
    fig.tight_layout()
    path = Path(path_png)
    fig.savefig(path)
    return path


def _name_structures(ax, lab: np.ndarray, extent: tuple, names: dict[int, str]) -> None:
    """Write each large enough structure's name at its centroid in the slice."""
    h, w = lab.shape
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    rows, cols = np.indices(lab.shape)
    for i, n in zip(ids, counts, strict=True):
        if n < 120 or int(i) not in names:
            continue
        m = lab == i
        c, r = cols[m].mean(), rows[m].mean()
        x = extent[0] + (c + 0.5) / w * (extent[1] - extent[0])
        y = extent[3] - (r + 0.5) / h * (extent[3] - extent[2])
        ax.text(x, y, names[int(i)], fontsize=6, ha="center", va="center", color="white")
