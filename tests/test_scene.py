"""Scene: patient pool on the table, C-arm placement, collisions, resets without leaks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from sonoray.assets.patient import Patient
from sonoray.envs.frames import (
    matrix_to_pose,
    patient_in_world_matrix,
    patient_mm_to_world_m,
    pose_to_matrix,
    world_m_to_patient_mm,
)
from sonoray.envs.scene import Scene, SceneConfig


def synthetic_patient(
    name: str,
    half_width_mm: float,
    half_depth_mm: float,
    length_mm: float,
    origin_mm=(0.0, 0.0, 0.0),
    flip_x: bool = False,
    spacing_mm: float = 6.0,
) -> Patient:
    """Elliptic-cylinder torso with a liver and a vertebra; axes may be flipped (LPS-like)."""
    shape = tuple(
        int(extent / spacing_mm) + 8 for extent in (2 * half_width_mm, 2 * half_depth_mm, length_mm)
    )
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = origin_mm
    if flip_x:
        affine[0, 0] = -spacing_mm
    xyz = np.indices(shape).transpose(1, 2, 3, 0) @ affine[:3, :3].T + affine[:3, 3]
    d = xyz - (affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3])  # from the centre
    body = (d[..., 0] / half_width_mm) ** 2 + (d[..., 1] / half_depth_mm) ** 2 <= 1.0
    body &= np.abs(d[..., 2]) <= length_mm / 2
    labels = np.zeros(shape, dtype=np.int16)
    liver = ((d[..., 0] - 60) / 60) ** 2 + (d[..., 1] / 50) ** 2 + ((d[..., 2] - 80) / 70) ** 2
    labels[liver <= 1] = 1  # on the patient's right, superior half
    labels[(np.abs(d[..., 0]) < 15) & (np.abs(d[..., 1] + 60) < 15) & body] = 2
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    return Patient(name, hu, labels, {1: "liver", 2: "vertebrae_L1"}, affine, body)


@pytest.fixture(scope="module")
def patients():
    return [
        synthetic_patient("slim", 150.0, 100.0, 420.0, origin_mm=(-200.0, -150.0, -700.0)),
        synthetic_patient("broad", 175.0, 120.0, 380.0, origin_mm=(210.0, 40.0, 90.0), flip_x=True),
    ]


@pytest.fixture(scope="module")
def scene(patients):
    with Scene(patients) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(request):
    yield
    if "scene" in request.fixturenames:
        s = request.getfixturevalue("scene")
        s.set_table_height(s.config.table_height_m)
        s.reset(0)


def _world_skin(scene: Scene) -> np.ndarray:
    return patient_mm_to_world_m(scene.active_patient.skin_mesh.vertices, scene.patient_in_world)


def test_frames_round_trip_and_axes():
    rng = np.random.default_rng(1)
    quat = rng.normal(size=4)
    pose = pose_to_matrix((0.1, -0.2, 0.3), quat)
    position, back = matrix_to_pose(pose)
    np.testing.assert_allclose(pose_to_matrix(position, back), pose, atol=1e-12)
    np.testing.assert_allclose(np.abs(back), np.abs(quat / np.linalg.norm(quat)), atol=1e-12)
    patient_in_world = patient_in_world_matrix((10.0, 20.0, 30.0), (1.0, 2.0, 3.0), yaw_deg=0.0)
    axes_mm = np.array(
        [[10.0, 20.0, 30.0], [110.0, 20.0, 30.0], [10.0, 120.0, 30.0], [10, 20, 130]]
    )
    world = patient_mm_to_world_m(axes_mm, patient_in_world)
    np.testing.assert_allclose(world[0], [1.0, 2.0, 3.0])
    # right -> +y, anterior -> +z, superior -> +x, 100 mm = 0.1 m
    np.testing.assert_allclose(world[1:] - world[0], [[0, 0.1, 0], [0, 0, 0.1], [0.1, 0, 0]])
    np.testing.assert_allclose(world_m_to_patient_mm(world, patient_in_world), axes_mm)
    with pytest.raises(ValueError, match="non-zero"):
        pose_to_matrix((0, 0, 0), (0, 0, 0, 0))
    with pytest.raises(ValueError, match="finite"):
        patient_in_world_matrix((0, 0, math.nan), (0, 0, 0))


def test_scene_builds_with_two_patients_and_parks_the_inactive_one(scene):
    c = scene.client
    active = c.getBasePositionAndOrientation(scene.patient_ids[0])
    parked = c.getBasePositionAndOrientation(scene.patient_ids[1])
    np.testing.assert_allclose(pose_to_matrix(*active), scene.patient_in_world, atol=1e-6)
    assert parked[0][2] == scene.config.park_z_m


def test_switching_patient_moves_bodies_only(scene):
    c = scene.client
    bodies = c.getNumBodies()
    first = scene.patient_in_world
    second = scene.set_active_patient(1, offset_xy_m=(0.03, -0.02), yaw_deg=4.0)
    assert c.getNumBodies() == bodies
    assert scene.active_index == 1
    assert c.getBasePositionAndOrientation(scene.patient_ids[0])[0][2] == scene.config.park_z_m
    np.testing.assert_allclose(
        pose_to_matrix(*c.getBasePositionAndOrientation(scene.patient_ids[1])), second, atol=1e-6
    )
    assert not np.allclose(first, second)
    # PyBullet sees the moved body: its bounds sit on the table around the offset.
    low, high = (np.array(b) for b in c.getAABB(scene.patient_ids[1]))
    assert low[2] == pytest.approx(scene.table_top_z_m, abs=3e-3)
    assert (low[0] + high[0]) / 2 == pytest.approx(0.03, abs=0.02)


@pytest.mark.parametrize("index, offset, yaw", [(0, (0, 0), 0.0), (1, (0.04, 0.02), -5.0)])
def test_posterior_surface_rests_on_table_and_patient_is_centred(scene, index, offset, yaw):
    scene.set_active_patient(index, offset_xy_m=offset, yaw_deg=yaw)
    skin = _world_skin(scene)
    assert skin[:, 2].min() == pytest.approx(scene.table_top_z_m, abs=1e-6)
    # A patient-frame check, independent of the anchor: most posterior skin on the table.
    posterior = scene.active_patient.skin_mesh.vertices[:, 1].argmin()
    assert skin[posterior, 2] == pytest.approx(scene.table_top_z_m, abs=1e-6)
    centre = (skin.min(0) + skin.max(0)) / 2
    np.testing.assert_allclose(centre[:2], offset, atol=0.02)
    # Head towards +x (turned by the yaw).
    superior_world = scene.patient_in_world[:3, 2]
    np.testing.assert_allclose(
        superior_world, [math.cos(math.radians(yaw)), math.sin(math.radians(yaw)), 0], atol=1e-9
    )


def test_anatomy_lands_on_the_world_sides_of_the_design(scene):
    for index in (0, 1):  # the second patient's voxel grid runs right to left
        scene.set_active_patient(index)
        liver = patient_mm_to_world_m(
            scene.active_patient.centroid_mm("liver"), scene.patient_in_world
        )
        spine = patient_mm_to_world_m(
            scene.active_patient.centroid_mm("vertebrae_L1"), scene.patient_in_world
        )
        assert liver[1] > 0.03  # patient's right = world +y
        assert liver[0] > spine[0] + 0.03  # liver centred superior to the vertebra's middle
        assert spine[2] < liver[2]  # spine posterior = lower


def test_carm_at_zero_sees_the_patient_from_below_without_collision(scene):
    assert scene.collisions() == []
    source, detector = scene.carm.source_detector_in_world()
    assert source[2, 3] < scene.table_top_z_m - scene.config.table_thickness_m
    assert detector[2, 3] - 0.06 > _world_skin(scene)[:, 2].max()
    geometry = scene.carm.xray_geometry_in_patient(scene.patient_in_world)
    np.testing.assert_allclose(geometry.beam_direction, [0, 1, 0], atol=1e-6)


def test_forced_collisions_are_reported(scene):
    scene.set_table_height(1.10)
    scene.carm.command({"lift": -215.0}, relative=False)
    hits = scene.collisions()
    assert {(h.body_a, h.link_a, h.body_b, h.link_b) for h in hits} >= {
        ("patient", "skin", "carm", "detector")
    }
    assert all(h.distance_m <= 0.0 for h in hits)

    scene.set_table_height(0.70)
    scene.carm.command({"lift": 215.0}, relative=False)
    hits = scene.collisions()
    assert ("table", "table", "carm", "source") in {
        (h.body_a, h.link_a, h.body_b, h.link_b) for h in hits
    }


def test_collision_margin_reports_near_pairs(scene):
    scene.set_table_height(1.0)
    scene.carm.command({"lift": -200.0}, relative=False)  # detector face about 9 cm above skin
    assert scene.collisions() == []
    near = scene.collisions(margin_m=0.1)
    assert [(h.body_a, h.link_a, h.body_b, h.link_b) for h in near] == [
        ("patient", "skin", "carm", "detector")
    ]
    gap_m = scene.carm.source_detector_in_world()[1][2, 3] - _world_skin(scene)[:, 2].max()
    assert near[0].distance_m == pytest.approx(gap_m, abs=2e-3)
    with pytest.raises(ValueError, match="margin_m"):
        scene.collisions(margin_m=-0.1)


def test_table_height_carries_the_patient(scene):
    scene.set_table_height(0.95)
    assert _world_skin(scene)[:, 2].min() == pytest.approx(0.95, abs=1e-6)
    table_z = scene.client.getBasePositionAndOrientation(scene.table_id)[0][2]
    assert table_z == pytest.approx(0.95)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.set_active_patient(2), "index"),
        (lambda s: s.set_active_patient(True), "integer"),
        (lambda s: s.set_active_patient(0, offset_xy_m=(math.nan, 0)), "offset_xy_m"),
        (lambda s: s.set_active_patient(0, offset_xy_m=(0.0,)), "offset_xy_m"),
        (lambda s: s.set_active_patient(0, yaw_deg=math.inf), "yaw_deg"),
        (lambda s: s.set_table_height(2.0), "table height"),
        (lambda s: s.place_probe_arm("up"), "side"),
    ],
)
def test_bad_scene_input_raises(scene, call, match):
    with pytest.raises(ValueError, match=match):
        call(scene)


def test_bad_config_and_misuse_raise(scene, patients):
    with pytest.raises(ValueError, match="table_height_m"):
        SceneConfig(table_height_m=2.0)
    with pytest.raises(ValueError, match="probe_arm_side"):
        SceneConfig(probe_arm_side="front")
    with pytest.raises(ValueError, match="table_width_m"):
        SceneConfig(table_width_m=-0.5)
    with pytest.raises(ValueError, match="at least one patient"):
        Scene([])
    with pytest.raises(RuntimeError, match="no ultrasound arm"):
        scene.place_probe_arm("left")
    empty = patients[0]
    no_body = Patient(
        "empty", empty.hu, empty.labels, empty.label_names, empty.affine, empty.body_mask & False
    )
    with pytest.raises(ValueError, match="empty"):
        Scene([no_body])


def test_camera_image_shows_the_scene(scene):
    image = scene.camera_image((1.6, 2.0, 1.9), (0.0, -0.2, 0.9), width=96, height=72)
    assert image.shape == (72, 96, 3) and image.dtype == np.uint8
    assert image.std() > 10.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_two_hundred_resets_do_not_leak(scene):
    rng = np.random.default_rng(0)
    bodies = scene.client.getNumBodies()
    for i in range(20):
        scene.reset(i % 2, rng.uniform(-0.03, 0.03, 2), rng.uniform(-5, 5))
    before = _rss_mb()
    for i in range(200):
        scene.reset(i % 2, rng.uniform(-0.03, 0.03, 2), rng.uniform(-5, 5))
        scene.carm.command(rng.uniform(-20, 20, 5))
        scene.collisions()
    assert _rss_mb() - before < 20.0
    assert scene.client.getNumBodies() == bodies


def test_close_twice_is_safe(patients):
    s = Scene(patients[:1], SceneConfig(carm=False))
    assert s.carm is None
    s.close()
    s.close()


# ----- with the ultrasound arm -------------------------------------------------------------


def _arm_base_in_world(scene: Scene) -> np.ndarray:
    c, body = scene.client, scene.probe_arm.body_id
    com = pose_to_matrix(*c.getBasePositionAndOrientation(body))
    inertial = pose_to_matrix(*c.getDynamicsInfo(body, -1)[3:5])
    return com @ np.linalg.inv(inertial)


def test_probe_arm_stands_beside_the_table_on_the_window_side(patients):
    pytest.importorskip("sonoray.envs.probe_arm")
    with Scene(patients[:1], SceneConfig(probe_arm=True, probe_arm_side="right")) as s:
        half_width = s.config.table_width_m / 2
        base = _arm_base_in_world(s)
        assert base[1, 3] > half_width  # patient's right = world +y
        assert base[2, 3] == pytest.approx(s.table_top_z_m - s.config.probe_arm_below_top_m)
        np.testing.assert_allclose(base[:3, 0], [0, -1, 0], atol=1e-6)  # facing the table
        assert s.collisions() == []

        s.place_probe_arm("left")
        base = _arm_base_in_world(s)
        assert base[1, 3] < -half_width
        np.testing.assert_allclose(base[:3, 0], [0, 1, 0], atol=1e-6)
        stand = s.client.getBasePositionAndOrientation(s.arm_stand_id)[0]
        np.testing.assert_allclose(stand, base[:3, 3], atol=1e-6)
        assert s.collisions() == []
        assert set(s.named_bodies()) == {"table", "patient", "carm", "probe_arm", "arm_stand"}
