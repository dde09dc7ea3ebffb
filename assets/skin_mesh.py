"""Skin surface mesh from a body mask, light enough for PyBullet's static concave shapes.

Marching cubes (Lorensen & Cline 1987, as in scikit-image) on the body mask, keep
the largest connected component, fill holes, then quadric decimation (Garland &
Heckbert 1997, as in ``fast-simplification``) to at most ``max_faces`` faces.

Limitations: the surface follows the voxel grid, smoothed only by the half-voxel
offset of marching cubes; folds finer than a voxel are lost.
"""

from __future__ import annotations

import logging

import numpy as np
import trimesh
from scipy import ndimage
from skimage import measure

logger = logging.getLogger(__name__)

DEFAULT_MAX_FACES = 30_000
#: Voxels finer than this are averaged in blocks before marching cubes: a 30k-face
#: mesh of a torso cannot hold finer detail, and the full grid costs 10x the time.
MESH_VOXEL_MM = 2.0


def skin_mesh_from_mask(
    mask: np.ndarray, affine: np.ndarray, *, max_faces: int = DEFAULT_MAX_FACES
) -> trimesh.Trimesh:
    """Closed, single-component skin mesh in patient mm from a boolean body mask.

    Args:
        mask: Body mask ``(I, J, K)``, true inside the patient.
        affine: 4 x 4 voxel -> patient RAS mm.
        max_faces: Upper bound on the decimated mesh's face count.

    Returns:
        A watertight ``trimesh.Trimesh`` with outward normals, vertices in patient mm.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"body mask must be 3-D, got shape {mask.shape}")
    if max_faces < 100:
        raise ValueError(f"max_faces must be at least 100, got {max_faces}")
    if not mask.any():
        raise ValueError("body mask is empty: no voxel belongs to the patient")

    # Crop to the body and average blocks of fine voxels: (I', J', K') fractions in [0, 1].
    extent = [
        np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)
    ]
    lo = np.array([e[0] for e in extent])
    hi = np.array([e[-1] + 1 for e in extent])
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    factor = np.maximum(1, np.floor(MESH_VOXEL_MM / spacing)).astype(int)
    hi = lo + -(-(hi - lo) // factor) * factor
    crop = np.zeros(hi - lo, dtype=np.float32)
    body = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    crop[: body.shape[0], : body.shape[1], : body.shape[2]] = body
    shape = np.stack([np.array(crop.shape) // factor, factor], axis=1).ravel()
    frac = crop.reshape(shape).mean(axis=(1, 3, 5))

    # Largest component, holes closed, so that the surface is the outer skin alone; the
    # fractions keep the surface's sub-voxel position where they agree with that solid.
    solid = frac >= 0.5
    components, n = ndimage.label(solid)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        solid = components == int(sizes.argmax())
    solid = ndimage.binary_fill_holes(solid)
    field = np.where(solid, np.maximum(frac, 0.51), np.minimum(frac, 0.49))

    # Pad by one voxel so that the surface closes where the body touches the grid edge.
    verts, faces, _, _ = measure.marching_cubes(np.pad(field, 1), level=0.5)
    # Pooled voxel u covers original voxels f*u ... f*u + f - 1: its centre is f*u + (f-1)/2.
    verts = (verts - 1.0) * factor + (factor - 1) / 2.0 + lo
    mesh = _largest_piece(trimesh.Trimesh(verts, faces, process=True))
    if mesh.volume < 0:  # outward normals before decimation keeps them outward after
        mesh.invert()
    if len(mesh.faces) > max_faces:
        mesh = _decimate(mesh, max_faces)

    mesh.apply_transform(affine)
    if np.linalg.det(affine[:3, :3]) < 0:
        mesh.invert()
    trimesh.repair.fix_normals(mesh)
    logger.debug("skin mesh: %d vertices, %d faces", len(mesh.vertices), len(mesh.faces))
    return mesh


def _largest_piece(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    pieces = mesh.split(only_watertight=False)
    if len(pieces) <= 1:
        return mesh
    return max(pieces, key=lambda m: len(m.faces))


def _decimate(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    import fast_simplification

    # Quadric decimation can, rarely, pinch an edge into a non-manifold one; a slightly
    # different target moves the collapses and gives a closed surface again.
    for fraction in (0.98, 0.95, 0.9, 0.85, 0.8):
        target = 1.0 - (fraction * max_faces) / len(mesh.faces)
        verts, faces = fast_simplification.simplify(
            mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32), target_reduction=target
        )
        out = _largest_piece(trimesh.Trimesh(verts, faces, process=True))
        if out.is_watertight:
            return out
    logger.warning("skin mesh is not watertight after decimation (%d faces)", len(out.faces))
    return out
