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

    # Largest component only; closed holes so that the surface is the outer skin.
    components, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        mask = components == int(sizes.argmax())
    mask = ndimage.binary_fill_holes(mask)

    # Pad by one voxel so that the surface closes where the body touches the grid edge.
    padded = np.pad(mask, 1).astype(np.float32)
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.5)
    verts = verts - 1.0
    mesh = trimesh.Trimesh(verts, faces, process=True)
    mesh = _largest_piece(mesh)
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

    target = 1.0 - (0.98 * max_faces) / len(mesh.faces)
    verts, faces = fast_simplification.simplify(
        mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32), target_reduction=target
    )
    out = trimesh.Trimesh(verts, faces, process=True)
    trimesh.repair.fill_holes(out)
    return _largest_piece(out)
