"""Body mask of a CT: the patient alone, without the scanner table, padding or air.

Threshold the CT numbers, detach thin objects (table shells, pads, sheets,
blanket folds) with a morphological opening, keep the largest 3-D connected
component, restore the body outline that the opening rounded off, and fill
holes (lungs, bowel gas, airways) slice by slice. Zhu, Cochoff & Sukalac
("Automatic patient table removal in CT images", J. Digit. Imaging 2012) describe
the problem and find the table with a Hough transform; thresholding and
morphology alone, as here, need no model of the table's shape.

Morphology runs in each axial slice with square structuring elements whose
half-widths are given in millimetres and converted per axis, so that the result
does not depend on the voxel size; the expensive connected-component step runs
on a grid subsampled to about 2 mm.

Limitations: the table is found only where air or low-density foam (below the
threshold, as mattresses and pads are) separates it from the body, or where it
touches the body along a narrow line; where the back lies flat on a dense slab
with nothing between them, the slab under the contact area stays in the mask
(all of it when it is thicker than twice ``detach_mm``). A sheet lying on the
skin adds its own thickness there. The largest component is assumed to be the
patient (a scan whose table outweighs the body would fail). Holes are filled
only within axial slices, so an air pocket that opens to the outside in every
slice (a mouth, a stoma) stays outside.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Parameters of the body segmentation, with where each value comes from.
BODY_MASK_DEFAULTS = {
    # Between lung/air (< -700) and fat (-100): the skin-air edge and table foam (-900)
    # fall below, every tissue at the body surface above.
    "threshold_hu": -500.0,
    # Half-width that detaches table shells, pads and sheets (a few mm thick each);
    # limbs and the trunk are many times thicker.
    "detach_mm": 5.0,
    # Half-width that removes thin sheets from the restored outline while keeping
    # the skin's shape to about a voxel.
    "smooth_mm": 1.5,
    # Grid on which connected components are labelled (a coarse seed only).
    "coarse_mm": 2.0,
}


def body_mask_from_hu(
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    threshold_hu: float = BODY_MASK_DEFAULTS["threshold_hu"],
    detach_mm: float = BODY_MASK_DEFAULTS["detach_mm"],
    smooth_mm: float = BODY_MASK_DEFAULTS["smooth_mm"],
) -> np.ndarray:
    """Boolean mask of the patient's body in a CT volume.

    Args:
        hu: CT numbers ``(I, J, K)``; padding should already be air.
        affine: 4 x 4 voxel -> patient mm; gives the voxel size and which voxel axis is
            closest to the patient's long (superior) axis, the one slices are taken across.
        threshold_hu: Voxels above this are body candidates.
        detach_mm: Half-width of the opening that detaches the table and other thin objects.
        smooth_mm: Half-width of the opening that trims thin sheets off the final outline.

    Returns:
        bool ``(I, J, K)``: the largest body component with its interior holes filled.
        All false when no voxel exceeds the threshold.

    Raises:
        ValueError: if ``hu`` is not 3-D, ``affine`` is not 4 x 4 with non-zero voxel size,
            or a width is not positive.
    """
    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D, got shape {hu.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, got shape {affine.shape}")
    for what, value in (("detach_mm", detach_mm), ("smooth_mm", smooth_mm)):
        if not value > 0:
            raise ValueError(f"{what} must be positive, got {value}")
    spacing_mm = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(spacing_mm > 0):
        raise ValueError(f"affine has a zero voxel size: spacing {spacing_mm} mm")

    axial_axis = int(np.argmax(np.abs(affine[2, :3])))
    in_plane = [a for a in range(3) if a != axial_axis]
    candidates = hu > threshold_hu
    if not candidates.any():
        return candidates

    # Coarse seed: open away the table, keep the largest component.
    step = _coarse_step(spacing_mm, in_plane, BODY_MASK_DEFAULTS["coarse_mm"])
    coarse = candidates[tuple(slice(None, None, s) for s in step)]
    core = _open(coarse, _half_widths(spacing_mm * step, in_plane, detach_mm))
    core = _largest_component(core)
    if not core.any():
        return np.zeros_like(candidates)
    core = _upsample(core, step, candidates.shape)

    # Fine outline, within the seed's box: everything thick enough near the seed and
    # connected to it.
    margin = step.copy()
    margin[axial_axis] = 0
    near_half = _half_widths(spacing_mm, in_plane, detach_mm) + margin
    smooth_half = _half_widths(spacing_mm, in_plane, smooth_mm)
    box = _bounding_box(core, near_half + smooth_half + 1)
    candidates, core = candidates[box], core[box]
    fine = _open(candidates, smooth_half) & _grow(core, near_half)
    body = ndimage.binary_propagation(core & fine, mask=fine)

    in_slice = np.zeros((3, 3, 3), dtype=bool)
    in_slice[tuple(slice(None) if a in in_plane else 1 for a in range(3))] = (
        ndimage.generate_binary_structure(2, 1)
    )
    out = np.zeros(hu.shape, dtype=bool)
    out[box] = ndimage.binary_fill_holes(body, structure=in_slice)
    return out


def _coarse_step(spacing_mm: np.ndarray, in_plane: list[int], coarse_mm: float) -> np.ndarray:
    """Integer subsampling step per axis (in-plane only) giving voxels of about coarse_mm."""
    step = np.ones(3, dtype=int)
    for a in in_plane:
        step[a] = max(1, int(coarse_mm // spacing_mm[a]))
    return step


def _half_widths(spacing_mm: np.ndarray, in_plane: list[int], width_mm: float) -> np.ndarray:
    """Half-widths in voxels per axis: width_mm in plane (at least one voxel), 0 across."""
    half = np.zeros(3, dtype=int)
    for a in in_plane:
        half[a] = max(1, int(round(width_mm / spacing_mm[a])))
    return half


def _shrink(mask: np.ndarray, half: np.ndarray) -> np.ndarray:
    # Separable min filter == erosion by a box; uint8 view avoids a copy.
    return ndimage.minimum_filter(mask.view(np.uint8), size=tuple(2 * half + 1)).view(bool)


def _grow(mask: np.ndarray, half: np.ndarray) -> np.ndarray:
    return ndimage.maximum_filter(mask.view(np.uint8), size=tuple(2 * half + 1)).view(bool)


def _open(mask: np.ndarray, half: np.ndarray) -> np.ndarray:
    return _grow(_shrink(mask, half), half)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(mask)
    if n <= 1:
        return components > 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def _bounding_box(mask: np.ndarray, pad: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, widened by ``pad`` voxels per axis."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo = max(0, int(present[0]) - int(pad[axis]))
        hi = min(mask.shape[axis], int(present[-1]) + int(pad[axis]) + 1)
        box.append(slice(lo, hi))
    return tuple(box)


def _upsample(coarse: np.ndarray, step: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a subsampled mask back to ``shape``."""
    out = coarse
    for axis, s in enumerate(step):
        if s > 1:
            out = np.repeat(out, s, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]
