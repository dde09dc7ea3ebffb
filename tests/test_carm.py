"""C-arm kinematics, limits and X-ray geometry against analytic values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pybullet
import pytest
from pybullet_utils.bullet_client import BulletClient

from sonoray.envs.carm import CARM_GEOMETRY, JOINT_NAMES, CArm, CArmLimits
from sonoray.envs.frames import (
    patient_in_world_matrix,
    rotation_about_axis,
)

ORBITALS_DEG = np.linspace(-40.0, 110.0, 7)
ANGULARS_DEG = np.linspace(-45.0, 45.0, 5)


@pytest.fixture(scope="module")
def client():
    c = BulletClient(connection_mode=pybullet.DIRECT)
    yield c
    c.disconnect()


@pytest.fixture(scope="module")
def carm(client):
    return CArm(client)


@pytest.fixture(autouse=True)
def _home(carm):
    carm.reset()


@pytest.fixture(scope="module")
def patient_in_world():
    # Patient origin 1 m above the floor origin, supine, head towards +x.
    return patient_in_world_matrix((0.0, 0.0, 0.0), (0.0, 0.0, 1.0))


def _project(point_mm, geometry):
    """Column and row offsets (mm on the detector, from its centre) of a patient point."""
    s, c = geometry.source_mm, geometry.detector_centre_mm
    n = geometry.beam_direction
    t = np.dot(c - s, n) / np.dot(point_mm - s, n)
    q = s + t * (point_mm - s)
    return np.dot(q - c, geometry.col_dir), np.dot(q - c, geometry.row_dir)


def test_source_detector_distance_and_isocentre_fixed_under_rotations(carm):
    rng = np.random.default_rng(0)
    for _ in range(3):
        prismatic = rng.uniform([-400, -150, -215], [400, 150, 215])
        carm.command(dict(zip(JOINT_NAMES[:3], prismatic, strict=True)), relative=False)
        iso_ref = carm.isocentre_world().copy()
        np.testing.assert_allclose(iso_ref * 1000, np.array([0, 0, 1000.0]) + prismatic, atol=1e-3)
        for orbital, angular in itertools.product(ORBITALS_DEG, ANGULARS_DEG):
            carm.command({"orbital": orbital, "angular": angular}, relative=False)
            source, detector = carm.source_detector_in_world()
            s, d = source[:3, 3] * 1000, detector[:3, 3] * 1000
            assert np.linalg.norm(d - s) == pytest.approx(1020.0, abs=1e-3)
            # The central ray passes through the fixed isocentre, 530 mm from the source.
            beam = carm.beam_direction()
            np.testing.assert_allclose(s + 530.0 * beam, iso_ref * 1000, atol=1e-3)
            np.testing.assert_allclose(carm.isocentre_world(), iso_ref, atol=1e-6)


def test_beam_direction_matches_analytic_rotation(carm):
    # angular about world y carries orbital about x: beam = Ry(angular) Rx(orbital) z.
    for orbital, angular in itertools.product(ORBITALS_DEG, ANGULARS_DEG):
        carm.command({"orbital": orbital, "angular": angular}, relative=False)
        expected = (
            rotation_about_axis((0, 1, 0), angular)
            @ rotation_about_axis((1, 0, 0), orbital)
            @ np.array([0.0, 0.0, 1.0])
        )
        np.testing.assert_allclose(carm.beam_direction(), expected, atol=1e-6)


def test_zero_angles_give_vertical_beam_from_below(carm, patient_in_world):
    source, detector = carm.source_detector_in_world()
    assert source[2, 3] == pytest.approx(1.0 - 0.530, abs=1e-6)
    assert detector[2, 3] == pytest.approx(1.0 + 0.490, abs=1e-6)
    np.testing.assert_allclose(carm.beam_direction(), [0, 0, 1], atol=1e-6)
    geometry = carm.xray_geometry_in_patient(patient_in_world)
    # Posterior -> anterior: patient +y.
    np.testing.assert_allclose(geometry.beam_direction, [0, 1, 0], atol=1e-6)


def test_orbital_90_gives_horizontal_right_to_left_beam(carm, patient_in_world):
    carm.command({"orbital": 90.0}, relative=False)
    np.testing.assert_allclose(carm.beam_direction(), [0, -1, 0], atol=1e-6)
    geometry = carm.xray_geometry_in_patient(patient_in_world)
    # Detector on the patient's left: beam towards patient -x (left).
    np.testing.assert_allclose(geometry.beam_direction, [-1, 0, 0], atol=1e-6)
    assert geometry.detector_centre_mm[0] == pytest.approx(-490.0, abs=1e-3)


def test_positive_orbital_is_lao_and_positive_angular_is_cranial(carm, patient_in_world):
    carm.command({"orbital": 30.0}, relative=False)
    detector = carm.xray_geometry_in_patient(patient_in_world).detector_centre_mm
    assert detector[0] < -100 and detector[1] > 100  # left (-x) and anterior (+y)
    carm.command({"orbital": -30.0}, relative=False)
    detector = carm.xray_geometry_in_patient(patient_in_world).detector_centre_mm
    assert detector[0] > 100 and detector[1] > 100  # RAO: right-anterior
    carm.command({"orbital": 0.0, "angular": 20.0}, relative=False)
    detector = carm.xray_geometry_in_patient(patient_in_world).detector_centre_mm
    assert detector[2] == pytest.approx(490.0 * math.sin(math.radians(20.0)), abs=1e-3)


def test_ap_view_follows_frontal_display_convention(carm, patient_in_world):
    geometry = carm.xray_geometry_in_patient(patient_in_world)
    np.testing.assert_allclose(geometry.col_dir, [-1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(geometry.row_dir, [0, 0, -1], atol=1e-6)
    right_col, _ = _project(np.array([60.0, 0.0, 0.0]), geometry)
    left_col, _ = _project(np.array([-60.0, 0.0, 0.0]), geometry)
    _, head_row = _project(np.array([0.0, 0.0, 60.0]), geometry)
    _, foot_row = _project(np.array([0.0, 0.0, -60.0]), geometry)
    assert right_col < 0 < left_col  # patient's right on the viewer's left
    assert head_row < 0 < foot_row  # head up
    # Magnification at the isocentre: 1020 / 530.
    assert left_col == pytest.approx(60.0 * 1020.0 / 530.0, rel=1e-6)


def test_left_lateral_is_seen_from_the_detector_side(carm, patient_in_world):
    carm.command({"orbital": 90.0}, relative=False)
    geometry = carm.xray_geometry_in_patient(patient_in_world)
    anterior_col, _ = _project(np.array([0.0, 60.0, 0.0]), geometry)
    posterior_col, _ = _project(np.array([0.0, -60.0, 0.0]), geometry)
    _, head_row = _project(np.array([0.0, 0.0, 60.0]), geometry)
    assert anterior_col < 0 < posterior_col  # viewer at the patient's left: face to the left
    assert head_row < 0
    # At orbital 90 the angular axis is the central ray: it spins the panel, not the view.
    carm.command({"angular": 45.0})
    spun = carm.xray_geometry_in_patient(patient_in_world)
    for name in ("source_mm", "detector_centre_mm", "col_dir", "row_dir"):
        np.testing.assert_allclose(getattr(spun, name), getattr(geometry, name), atol=1e-3)


def test_detector_axes_follow_convention_at_every_angle(carm, patient_in_world):
    inferior = np.array([0.0, 0.0, -1.0])
    for orbital, angular in itertools.product(ORBITALS_DEG, ANGULARS_DEG):
        carm.command({"orbital": orbital, "angular": angular}, relative=False)
        g = carm.xray_geometry_in_patient(patient_in_world)
        beam = g.beam_direction
        v = inferior - np.dot(inferior, beam) * beam
        v /= np.linalg.norm(v)
        np.testing.assert_allclose(g.row_dir, v, atol=1e-6)
        np.testing.assert_allclose(g.col_dir, np.cross(v, -beam), atol=1e-6)
        if angular == 0.0:  # the panel's edges are the image axes
            _, detector = carm.source_detector_in_world()
            np.testing.assert_allclose(
                detector[:3, :2].T @ patient_in_world[:3, :3],
                [g.col_dir, g.row_dir],
                atol=1e-6,
            )


def test_geometry_constants_match_the_urdf(carm, client):
    shapes = client.getCollisionShapeData(carm.body_id, carm.link_index["detector"])
    sizes = sorted((s[3] for s in shapes if s[2] == client.GEOM_BOX), key=lambda d: -d[0])
    width_m, height_m, _ = sizes[0]
    assert width_m * 1000 == pytest.approx(CARM_GEOMETRY.detector_size_mm)
    assert height_m * 1000 == pytest.approx(CARM_GEOMETRY.detector_size_mm)
    geometry = carm.xray_geometry_in_patient(np.eye(4), pixels=256)
    assert geometry.source_to_detector_mm == pytest.approx(CARM_GEOMETRY.source_to_detector_mm)
    iso_mm = carm.isocentre_world() * 1000
    assert np.linalg.norm(iso_mm - geometry.source_mm) == pytest.approx(
        CARM_GEOMETRY.source_to_isocentre_mm
    )
    assert geometry.pixel_mm == (300.0 / 256, 300.0 / 256)
    assert geometry.detector_size_mm == (300.0, 300.0) and geometry.rows == geometry.cols == 256
    assert CARM_GEOMETRY.pixel_spacing_mm == pytest.approx(0.195, abs=1e-3)


def test_command_past_limit_stops_there_and_reports(carm, client):
    report = carm.command([500.0, 0.0, -300.0, 0.0, 0.0], relative=False)
    assert report.limited == ("longitudinal", "lift")
    assert report.requested["longitudinal"] == 500.0
    assert report.applied["longitudinal"] == 400.0
    assert report.applied["lift"] == -215.0
    info = report.as_info()
    assert info["limit_hit"] and info["limited_joints"] == ["longitudinal", "lift"]

    carm.command({"orbital": 100.0}, relative=False)
    report = carm.command({"orbital": 30.0, "angular": -10.0})
    assert report.limited == ("orbital",)
    assert report.requested["orbital"] == pytest.approx(130.0)
    assert carm.joints_mm_deg()["orbital"] == 110.0
    assert carm.joints_mm_deg()["angular"] == -10.0

    # PyBullet holds the clamped values, not the requested ones.
    by_name = dict(zip(JOINT_NAMES, carm._joint_index, strict=True))
    assert client.getJointState(carm.body_id, by_name["orbital"])[0] == pytest.approx(
        math.radians(110.0)
    )
    assert client.getJointState(carm.body_id, by_name["longitudinal"])[0] == pytest.approx(0.4)

    within = carm.command([0.0, 10.0, 0.0, -5.0, 0.0])
    assert not within.hit_limit and within.applied["lateral"] == 10.0


def test_narrower_limits_are_enforced(client):
    arm = CArm(client, ((0.0, 3.0, 0.0), (0, 0, 0, 1)), CArmLimits(orbital_deg=(-10.0, 10.0)))
    report = arm.command({"orbital": 45.0})
    assert report.limited == ("orbital",) and arm.joints_mm_deg()["orbital"] == 10.0
    client.removeBody(arm.body_id)


@pytest.mark.parametrize(
    "values, match",
    [
        ([0.0, math.nan, 0.0, 0.0, 0.0], "lateral"),
        ([0.0, 0.0, 0.0, math.inf, 0.0], "orbital"),
        ({"angular": -math.inf}, "angular"),
        ([1.0, 2.0, 3.0], "5 values"),
        ({"roll": 1.0}, "roll"),
        ({"lift": "up"}, "up"),
    ],
)
def test_bad_commands_raise(carm, values, match):
    with pytest.raises(ValueError, match=match):
        carm.command(values)
    assert carm.joints_mm_deg() == dict.fromkeys(JOINT_NAMES, 0.0)


def test_bad_limits_and_pixels_raise(carm):
    with pytest.raises(ValueError, match="lower <= upper"):
        CArmLimits(lift_mm=(10.0, -10.0))
    with pytest.raises(ValueError, match="mechanical range"):
        CArmLimits(orbital_deg=(-90.0, 90.0))
    for pixels in (0, 2.5, True):
        with pytest.raises(ValueError, match="pixels"):
            carm.xray_geometry_in_patient(np.eye(4), pixels=pixels)


def test_pose_holds_when_simulation_is_stepped(carm, client):
    client.setGravity(0, 0, -9.81)
    carm.command([100.0, -50.0, 120.0, 60.0, -20.0], relative=False)
    expected = carm.link_in_world("detector")
    for _ in range(240):
        client.stepSimulation()
    np.testing.assert_allclose(carm.link_in_world("detector"), expected, atol=1e-4)
