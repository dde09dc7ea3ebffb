"""Ultrasound navigation: standard planes from labels, the env's contract, the oracle."""

from __future__ import annotations

import numpy as np
import pytest

from sonoray.assets.patient import Patient
from sonoray.envs import us_tasks
from sonoray.sensors.us_quality import plane_errors

# ----- standard planes of a synthetic ellipsoid organ ------------------------------------------

_SPACING_MM = 2.0
_GRID = (100, 80, 120)
_BODY_SEMI_MM = (90.0, 70.0)  # elliptic cylinder, x and y semi-axes
_BODY_HALF_LENGTH_MM = 110.0


def _ellipsoid_patient(
    organ: str, centre_mm, semi_axes_mm, axes_columns: np.ndarray, name: str = "ellipsoid"
) -> Patient:
    """An elliptic-cylinder body holding one ellipsoid organ with the given axes."""
    affine = np.diag([_SPACING_MM] * 3 + [1.0])
    affine[:3, 3] = -0.5 * _SPACING_MM * (np.array(_GRID) - 1)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in _GRID], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    body = (xyz[..., 0] / _BODY_SEMI_MM[0]) ** 2 + (xyz[..., 1] / _BODY_SEMI_MM[1]) ** 2 < 1
    body &= np.abs(xyz[..., 2]) < _BODY_HALF_LENGTH_MM
    local = (xyz - np.asarray(centre_mm)) @ axes_columns
    organ_mask = ((local / np.asarray(semi_axes_mm)) ** 2).sum(-1) < 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    return Patient(name, hu, organ_mask.astype(np.int16), {1: organ}, affine, body)


def _plane_error(plane: us_tasks.StandardPlane, pose: np.ndarray) -> tuple[float, float]:
    distance, angle, _ = plane_errors(pose, plane.centroid_mm, plane.normal)
    return float(distance[0]), float(angle[0])


def _rotation_x(angle_deg: float) -> np.ndarray:
    a = np.radians(angle_deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


@pytest.fixture(scope="module")
def tilted_kidney() -> tuple[Patient, np.ndarray, np.ndarray]:
    """Right kidney: longest semi-axis 60 mm along superior tilted 20 deg towards posterior."""
    axes = _rotation_x(-20.0)[:, [0, 1, 2]]  # columns: short (x), middle, long
    centre = np.array([10.0, -5.0, 3.0])
    return _ellipsoid_patient("kidney_right", centre, (15.0, 25.0, 60.0), axes), centre, axes


def test_standard_plane_of_an_ellipsoid_is_the_analytic_one(tilted_kidney):
    patient, centre, axes = tilted_kidney
    plane = us_tasks.standard_plane(patient, us_tasks.US_TASKS["kidney_right_long_axis"])
    long_axis = axes[:, 2]

    np.testing.assert_allclose(plane.centroid_mm, centre, atol=0.05)
    assert abs(plane.organ.axes[0] @ long_axis) > np.cos(np.radians(0.5))
    # Right flank: beam towards the patient's left; the plane holds the beam and the long axis.
    np.testing.assert_allclose(plane.beam, [-1.0, 0.0, 0.0], atol=1e-12)
    expected_normal = np.cross(plane.beam, long_axis)
    assert abs(plane.normal @ expected_normal) > np.cos(np.radians(0.5))
    # Long axis view: the marker (-x of the probe) points to the head.
    assert -plane.array @ us_tasks.SUPERIOR > 0.9
    # The window line leaves the elliptic body where x^2/a^2 + y^2/b^2 = 1 at y = centre y.
    a, b = _BODY_SEMI_MM
    skin_x = a * np.sqrt(1 - (centre[1] / b) ** 2)
    np.testing.assert_allclose(plane.skin_point_mm, [skin_x, centre[1], centre[2]], atol=1.0)
    assert plane.depth_mm == pytest.approx(skin_x - centre[0], abs=1.0)
    # Goal pose: right-handed, beam = probe z, array = probe x, face centre on the skin.
    pose = plane.probe_in_patient
    np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-9)
    assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)
    np.testing.assert_allclose(pose[:3, 2], plane.beam)
    np.testing.assert_allclose(pose[:3, 0], plane.array)
    assert _plane_error(plane, pose) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_skin_normal_of_the_elliptic_body_matches_its_gradient(tilted_kidney):
    patient, centre, _ = tilted_kidney
    a, b = _BODY_SEMI_MM
    y = 30.0
    x = a * np.sqrt(1 - (y / b) ** 2)
    gradient = np.array([x / a**2, y / b**2, 0.0])
    normal = us_tasks.skin_normal_mm(patient, np.array([x, y, 0.0]), gradient)
    assert np.degrees(np.arccos(normal @ gradient / np.linalg.norm(gradient))) < 3.0


def test_transverse_organ_puts_the_marker_to_the_right():
    # A liver-like organ whose longest axis runs left-right, seen from the anterior window.
    axes = np.eye(3)[:, [1, 2, 0]]  # columns: short (y), middle (z), long (x)
    patient = _ellipsoid_patient("liver", (20.0, 0.0, 0.0), (20.0, 30.0, 60.0), axes)
    plane = us_tasks.standard_plane(patient, us_tasks.US_TASKS["liver_long_axis"])
    assert abs(plane.array @ us_tasks.RIGHT) > 0.99
    assert -plane.array @ us_tasks.RIGHT > 0  # marker towards the patient's right
    np.testing.assert_allclose(plane.beam, -us_tasks.WINDOWS["anterior_subcostal"].direction())


def test_missing_or_cut_organ_is_unsupported_and_lists_supported_tasks(tilted_kidney):
    patient, _, _ = tilted_kidney
    with pytest.raises(us_tasks.UnsupportedTaskError, match="has no 'liver' label"):
        us_tasks.standard_plane(patient, us_tasks.US_TASKS["liver_long_axis"])
    assert us_tasks.supported_tasks(patient) == ["kidney_right_long_axis"]

    cut = _ellipsoid_patient("kidney_left", (0.0, 0.0, -100.0), (15, 25, 60), np.eye(3))
    with pytest.raises(us_tasks.UnsupportedTaskError, match="cut by the scan"):
        us_tasks.standard_plane(cut, us_tasks.US_TASKS["kidney_left_long_axis"])
    assert us_tasks.supported_tasks(cut) == []


def test_too_deep_organ_is_unsupported(tilted_kidney):
    patient, _, _ = tilted_kidney
    with pytest.raises(us_tasks.UnsupportedTaskError, match="beyond the imaging depth 40 mm"):
        us_tasks.standard_plane(patient, us_tasks.US_TASKS["kidney_right_long_axis"], 40.0)


def test_unknown_task_name_lists_known_tasks():
    with pytest.raises(ValueError, match="known tasks: .*spleen_long_axis"):
        us_tasks.task("heart_four_chamber")
