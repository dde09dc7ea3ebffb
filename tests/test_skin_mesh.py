"""Skin mesh: one closed component whose bounds and volume match the body mask."""

from __future__ import annotations

import numpy as np
import pytest

from sonoray.assets.skin_mesh import skin_mesh_from_mask


def _body(shape=(60, 50, 80)):
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((i - 30) / 25.0) ** 2 + ((j - 25) / 18.0) ** 2 <= 1
    body = np.broadcast_to(body, shape).copy()
    body[:, :, :5] = body[:, :, -5:] = False
    return body


def _check(mesh, mask, affine, tol_mm):
    assert mesh.is_watertight and mesh.body_count == 1
    idx = np.argwhere(mask)
    corners = np.stack([idx.min(0), idx.max(0)]).astype(float)
    expected = np.sort(corners @ affine[:3, :3].T + affine[:3, 3], axis=0)
    np.testing.assert_allclose(mesh.bounds, expected, atol=tol_mm)
    voxel_ml = abs(np.linalg.det(affine[:3, :3]))
    assert mesh.volume == pytest.approx(mask.sum() * voxel_ml, rel=0.03)


def test_mesh_is_one_closed_component_matching_the_mask_with_holes_and_debris():
    mask = _body()
    mask[25:35, 20:30, 30:40] = False  # an internal cavity (lungs) must not make a surface
    mask[1:3, 1:3, 1:3] = True  # a speck outside the body is dropped
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-60, -50, -80)
    mesh = skin_mesh_from_mask(mask, affine, max_faces=5000)
    assert len(mesh.faces) <= 5000
    clean = _body()
    _check(mesh, clean, affine, tol_mm=1.5)


def test_fine_anisotropic_grid_is_pooled_and_flipped_axes_keep_outward_normals():
    mask = _body((120, 100, 32))
    affine = np.diag([-0.7, 0.7, 2.5, 1.0])  # an L-A-S storage order
    mesh = skin_mesh_from_mask(mask, affine, max_faces=8000)
    _check(mesh, mask, affine, tol_mm=2.0)


@pytest.mark.parametrize(
    "mask, match",
    [(np.zeros((4, 4, 4), bool), "empty"), (np.ones((4, 4), bool), "3-D")],
)
def test_bad_masks_raise(mask, match):
    with pytest.raises(ValueError, match=match):
        skin_mesh_from_mask(mask, np.eye(4))


def test_too_few_faces_raise():
    with pytest.raises(ValueError, match="max_faces"):
        skin_mesh_from_mask(_body(), np.eye(4), max_faces=10)
