"""The ultrasound arm: IK accuracy, probe-frame motion, tissue spring, admittance, coupling."""

from __future__ import annotations

import math

import numpy as np
import pybullet
import pytest
from pybullet_utils import bullet_client

from sonoray.envs import frames
from sonoray.envs.force_control import AdmittanceController, TissueSpring
from sonoray.envs.probe_arm import ARM_COLLISION_GROUP, ProbeArm, StepLimits
from sonoray.sensors.probes import element_positions_mm, get_preset

# Flat skin: a static box whose top is at BOX_TOP_M, spanning x in [0.30, 0.65] m.
BOX_TOP_M = 0.2
BOX_EDGE_X_M = 0.65
# Curved skin: a half-elliptic cylinder along world x (a torso lying on a table).
TORSO_HALF_WIDTH_M, TORSO_HEIGHT_M, TORSO_BASE_Z_M = 0.17, 0.11, 0.15
TORSO_ARM_BASE = ((0.0, -0.6, 0.0), pybullet.getQuaternionFromEuler((0.0, 0.0, math.pi / 2)))


def _client():
    return bullet_client.BulletClient(connection_mode=pybullet.DIRECT)


def _box_world(preset="linear", **kwargs):
    client = _client()
    shape = client.createCollisionShape(pybullet.GEOM_BOX, halfExtents=[0.175, 0.3, 0.1])
    box = client.createMultiBody(0, shape, basePosition=[BOX_EDGE_X_M - 0.175, 0.0, 0.1])
    arm = ProbeArm(client, ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0)), preset, **kwargs)
    return client, box, arm


def _torso_mesh(n_around=48, n_along=13, length_m=0.6):
    """Closed half-elliptic cylinder along x (vertices (V, 3) in metres, faces (F, 3))."""
    phi = np.linspace(0.0, np.pi, n_around)
    ring = np.stack([TORSO_HALF_WIDTH_M * np.cos(phi), TORSO_HEIGHT_M * np.sin(phi)], -1)
    xs = np.linspace(-length_m / 2, length_m / 2, n_along)
    vertices = np.concatenate([np.column_stack([np.full(n_around, x), ring]) for x in xs])
    i, j = np.meshgrid(np.arange(n_along - 1), np.arange(n_around - 1), indexing="ij")
    a = (i * n_around + j).ravel()
    b, c = a + 1, a + n_around
    faces = np.concatenate([np.stack([a, c, b], -1), np.stack([b, c, c + 1], -1)])
    first = np.arange(n_along - 1) * n_around
    last = first + n_around - 1
    bottom = np.concatenate(
        [
            np.stack([first, last, first + n_around], -1),
            np.stack([last, last + n_around, first + n_around], -1),
        ]
    )
    return vertices, np.concatenate([faces, bottom])


def _torso_world(preset="convex"):
    client = _client()
    vertices, faces = _torso_mesh()
    shape = client.createCollisionShape(
        pybullet.GEOM_MESH,
        vertices=vertices.tolist(),
        indices=faces.ravel().tolist(),
        flags=pybullet.GEOM_FORCE_CONCAVE_TRIMESH,
    )
    client.createMultiBody(0, shape, basePosition=[0.0, 0.0, TORSO_BASE_Z_M])
    return client, ProbeArm(client, TORSO_ARM_BASE, preset)


def _torso_point(x_m, y_m):
    """Point on the torso's skin and its outward normal (analytic ellipse)."""
    a, b = TORSO_HALF_WIDTH_M, TORSO_HEIGHT_M
    z = b * math.sqrt(1.0 - (y_m / a) ** 2)
    normal = np.array([0.0, y_m / a**2, z / b**2])
    return np.array([x_m, y_m, TORSO_BASE_Z_M + z]), normal / np.linalg.norm(normal)


def _place_on_box(arm, x_m=0.5, **kwargs):
    result = arm.place_on_skin([x_m, 0.0, BOX_TOP_M], [0.0, 0.0, 1.0], **kwargs)
    assert result.reachable
    return result


def _centre_indentation_mm(arm):
    return (BOX_TOP_M - arm.probe_in_world()[2, 3]) * frames.MM_PER_M


def _angle_deg(a, b):
    return math.degrees(math.acos(np.clip(np.dot(a, b), -1.0, 1.0)))


# ----- IK ---------------------------------------------------------------------------------


def test_ik_reaches_skin_poses_within_residual():
    _, arm = _torso_world()
    for x_m in (-0.1, 0.0, 0.1):
        for y_m in (-0.08, 0.0, 0.08):
            point, normal = _torso_point(x_m, y_m)
            result = arm.place_on_skin(point, normal)
            assert result.reachable, (x_m, y_m, result)
            assert result.position_error_mm < 1.0
            assert result.orientation_error_deg < 0.5
            # Independent check of the achieved pose: axis along -normal, face centre on the
            # normal line through the point, and a few mm into the skin at 5 N.
            pose = arm.probe_in_world()
            assert _angle_deg(pose[:3, 2], -normal) < 0.5
            offset = pose[:3, 3] - point
            assert np.linalg.norm(np.cross(offset, normal)) * frames.MM_PER_M < 1.0
            assert 0.0 < -offset @ normal * frames.MM_PER_M < 20.0
            assert abs(arm.force_n() - 5.0) <= 0.5


def test_ik_moves_keep_residual_and_joint_limits():
    _, arm = _torso_world()
    point, normal = _torso_point(0.0, 0.0)
    arm.place_on_skin(point, normal)
    rng = np.random.default_rng(7)
    for _ in range(40):
        command = rng.uniform(-1.0, 1.0, 5) * (25.0, 25.0, 20.0, 12.0, 12.0)
        result = arm.move(*command)
        q = arm.joint_positions()
        assert np.all(q >= arm.lower_limits_rad) and np.all(q <= arm.upper_limits_rad)
        if result.reachable:
            assert result.position_error_mm < 1.0 and result.orientation_error_deg < 0.5


def test_unreachable_target_is_reported_and_arm_stays():
    _, _, arm = _box_world()
    q_before = arm.joint_positions()
    result = arm.place_on_skin([3.0, 0.0, BOX_TOP_M], [0.0, 0.0, 1.0])
    assert not result.reachable
    assert result.position_error_mm > 1.0
    np.testing.assert_array_equal(arm.joint_positions(), q_before)


# ----- motion in the probe frame -----------------------------------------------------------


def _lifted_arm():
    """Linear probe 30 mm above the box, so moves are pure kinematics."""
    _, _, arm = _box_world()
    _place_on_box(arm)
    for _ in range(4):
        arm.move(push_mm=-10.0, regulate_force=False)
    assert arm.force_n() == 0.0
    return arm


@pytest.mark.parametrize(
    "command, expected_shift_mm",
    [
        ({"slide_x_mm": 12.0}, (12.0, 0.0, 0.0)),
        ({"slide_y_mm": -7.0}, (0.0, -7.0, 0.0)),
        ({"push_mm": 4.0}, (0.0, 0.0, 4.0)),
    ],
)
def test_slides_act_in_probe_frame(command, expected_shift_mm):
    arm = _lifted_arm()
    before = arm.probe_in_world()
    result = arm.move(**command, regulate_force=False)
    after = arm.probe_in_world()
    shift_mm = before[:3, :3].T @ (after[:3, 3] - before[:3, 3]) * frames.MM_PER_M
    np.testing.assert_allclose(shift_mm, expected_shift_mm, atol=0.1)
    assert _angle_deg(before[:3, 2], after[:3, 2]) < 0.05
    assert result.clipped == ()


@pytest.mark.parametrize(
    "command, axis",
    [({"rotate_deg": 9.0}, 2), ({"tilt_x_deg": 8.0}, 0), ({"tilt_y_deg": -6.0}, 1)],
)
def test_rotations_pivot_about_face_centre(command, axis):
    arm = _lifted_arm()
    before = arm.probe_in_world()
    arm.move(**command, regulate_force=False)
    after = arm.probe_in_world()
    # The face centre stays put ...
    assert np.linalg.norm(after[:3, 3] - before[:3, 3]) * frames.MM_PER_M < 1.0
    # ... and the probe turned by the commanded angle about its own axis `axis`.
    angle_deg = next(iter(command.values()))
    expected = before[:3, :3] @ frames.rotation_about_axis(np.eye(3)[axis], angle_deg)
    np.testing.assert_allclose(after[:3, :3], expected, atol=math.radians(0.05))


def test_oversized_commands_are_clipped():
    arm = _lifted_arm()
    before = arm.probe_in_world()
    result = arm.move(slide_x_mm=500.0, rotate_deg=-90.0, regulate_force=False)
    assert set(result.clipped) == {"slide_x_mm", "rotate_deg"}
    after = arm.probe_in_world()
    shift_mm = before[:3, :3].T @ (after[:3, 3] - before[:3, 3]) * frames.MM_PER_M
    np.testing.assert_allclose(shift_mm, (arm.limits.slide_mm, 0.0, 0.0), atol=0.1)


def test_probe_in_patient_is_world_pose_in_patient_mm():
    arm = _lifted_arm()
    patient_in_world = frames.patient_in_world_matrix((10.0, -20.0, 300.0), (0.5, 0.0, 0.1), 7.0)
    probe_in_patient = arm.probe_in_patient(patient_in_world)
    probe_in_world = arm.probe_in_world()
    np.testing.assert_allclose(
        probe_in_patient[:3, 3],
        frames.world_m_to_patient_mm(probe_in_world[:3, 3], patient_in_world),
        atol=1e-9,
    )
    np.testing.assert_allclose(
        probe_in_patient[:3, :3],
        frames.world_to_patient_direction(probe_in_world[:3, :3].T, patient_in_world).T,
        atol=1e-12,
    )


def test_base_pose_moves_probe_rigidly():
    client, _, arm = _box_world()
    before = arm.probe_in_world()
    base = frames.pose_to_matrix((0.1, -0.2, 0.05), pybullet.getQuaternionFromEuler((0, 0, 0.4)))
    arm.set_base_pose(*frames.matrix_to_pose(base))
    np.testing.assert_allclose(arm.probe_in_world(), base @ before, atol=1e-6)


def test_moves_are_deterministic():
    runs = []
    for _ in range(2):
        _, arm = _torso_world()
        arm.place_on_skin(*_torso_point(0.05, 0.02))
        for step in range(5):
            arm.move(slide_x_mm=4.0, slide_y_mm=-3.0 * step, tilt_x_deg=2.0, rotate_deg=1.5)
        runs.append((arm.joint_positions(), arm.force_n(), arm.element_indentation_mm()))
    for first, second in zip(*runs, strict=True):
        np.testing.assert_array_equal(first, second)


# ----- tissue spring -----------------------------------------------------------------------


def test_spring_model_analytic():
    spring = TissueSpring(stiffness_n_per_mm=1.5, damping_n_s_per_mm=0.02)
    n = 128
    assert spring.force_n(np.full(n, 4.0)) == pytest.approx(6.0)
    half = np.where(np.arange(n) < n // 2, 4.0, -np.inf)
    assert spring.force_n(half) == pytest.approx(3.0)
    assert spring.force_n(np.full(n, -2.0)) == 0.0
    # Damper: 1 mm deeper within 0.01 s = 100 mm/s -> +2 N; lifting cannot pull.
    assert spring.force_n(np.full(n, 4.0), np.full(n, 3.0), 0.01) == pytest.approx(6.0 + 2.0)
    assert spring.force_n(np.full(n, 1.0), np.full(n, 5.0), 0.001) == 0.0
    assert spring.max_indentation_mm(20.0) == pytest.approx(20.0 / 1.5)


@pytest.mark.parametrize("stiffness", [0.5, 1.0, 2.0])
def test_force_is_stiffness_times_indentation_on_flat_box(stiffness):
    _, _, arm = _box_world(spring=TissueSpring(stiffness, damping_n_s_per_mm=0.01))
    _place_on_box(arm, target_force_n=3.0)
    for push_mm in (-2.0, 3.0, 1.5):
        arm.move(push_mm=push_mm, regulate_force=False)
        indentation_mm = max(_centre_indentation_mm(arm), 0.0)
        assert arm.force_n() == pytest.approx(stiffness * indentation_mm, abs=0.02)
        assert arm.indentation_mm() == pytest.approx(indentation_mm, abs=0.02)
    # Pushing 2 mm in one 20 ms control period adds the damper, c * 100 mm/s = 1 N, to the
    # peak; at rest afterwards only the spring remains.
    before_mm = _centre_indentation_mm(arm)
    result = arm.move(push_mm=2.0, regulate_force=False)
    after_mm = _centre_indentation_mm(arm)
    assert after_mm - before_mm == pytest.approx(2.0, abs=0.01)
    assert result.peak_force_n == pytest.approx(stiffness * after_mm + 0.01 * 2.0 / 0.02, abs=0.03)
    assert result.force_n == pytest.approx(stiffness * after_mm, abs=0.02)


def test_convex_face_on_flat_box_matches_arc_geometry():
    _, _, arm = _box_world("convex")
    _place_on_box(arm)
    arm.move(regulate_force=False)
    preset = get_preset("convex")
    sag_mm = -element_positions_mm(preset).numpy()[:, 2]  # how far each element sits behind
    expected = arm.spring.force_n(_centre_indentation_mm(arm) - sag_mm)
    assert arm.force_n() == pytest.approx(expected, abs=0.02)
    assert 0.0 < arm.coupling().mean() < 1.0  # the face's ends stay off a flat skin


# ----- admittance --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["linear", "convex"])
@pytest.mark.parametrize("target", [2.0, 5.0, 10.0])
def test_admittance_converges_on_flat_skin(preset, target):
    _, _, arm = _box_world(preset)
    result = _place_on_box(arm, target_force_n=target)
    assert abs(result.force_n - target) <= 0.5
    assert result.force_iterations <= 6
    for _ in range(3):
        result = arm.move(slide_y_mm=10.0, rotate_deg=5.0)
        assert abs(result.force_n - target) <= 0.5
        assert result.force_converged and result.force_iterations <= 6


def test_admittance_converges_on_curved_skin():
    _, arm = _torso_world()
    result = arm.place_on_skin(*_torso_point(0.0, -0.05))
    assert abs(result.force_n - 5.0) <= 0.5
    # Slide sideways over the flank, where the skin curves away under the probe.
    for _ in range(5):
        result = arm.move(slide_y_mm=10.0, tilt_x_deg=3.0)
        assert result.reachable
        assert abs(result.force_n - 5.0) <= 0.5, result
        assert result.force_iterations <= 6
        assert not result.safety_violation


def test_admittance_approaches_from_free_space():
    _, _, arm = _box_world()
    _place_on_box(arm)
    for _ in range(2):
        arm.move(push_mm=-10.0, regulate_force=False)
    assert _centre_indentation_mm(arm) == pytest.approx(-15.0, abs=0.2)
    result = arm.move()
    assert result.force_converged and abs(result.force_n - 5.0) <= 0.5


def test_controller_alone_is_deadbeat_on_a_uniform_contact():
    controller = AdmittanceController()
    run = controller.regulate(np.full(128, 1.0), np.full(128, 1.0), TissueSpring(), 30.0)
    assert run.offset_mm == pytest.approx(4.0, abs=1e-9)
    assert run.force_n == pytest.approx(5.0, abs=1e-9)
    # The damper adds c * (4 mm / 20 ms) = 2 N while the probe moves.
    assert run.peak_force_n == pytest.approx(7.0, abs=1e-9)
    assert run.converged and run.iterations == 1


# ----- safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("regulate_force", [False, True])
def test_large_push_cannot_tunnel(regulate_force):
    client, _, arm = _box_world()
    _place_on_box(arm)
    limit_mm = arm.spring.max_indentation_mm(arm.controller.force_cap_n)
    for _ in range(6):
        result = arm.move(push_mm=1000.0, regulate_force=regulate_force)
        assert "push_mm" in result.clipped
        # Spring part bounded by construction: every element at most limit_mm deep.
        assert arm.indentation_mm() <= limit_mm + 1e-6
        assert arm.spring.force_n(arm.element_indentation_mm()) <= arm.controller.force_cap_n + 1e-6
        # Independent look from far above: the face is still under the same skin surface.
        face = arm.probe_in_world()[:3, 3]
        hit = client.rayTest(
            [face[0], face[1], 2.0],
            [face[0], face[1], -1.0],
            collisionFilterMask=~ARM_COLLISION_GROUP,
        )[0]
        assert hit[3][2] == pytest.approx(BOX_TOP_M, abs=1e-6)
        assert (hit[3][2] - face[2]) * frames.MM_PER_M <= limit_mm + 1e-6
    if regulate_force:
        assert abs(result.force_n - 5.0) <= 0.5
    else:
        # Held at the guard: the whole flat face at the limit, i.e. at the cap -> reported.
        assert result.guarded and result.safety_violation
        assert result.force_n == pytest.approx(arm.controller.force_cap_n, abs=0.05)


def test_slide_onto_a_step_is_guarded():
    client, _, arm = _box_world()
    # A 40 mm high block beyond x = 0.55 (world): the probe slides into it.
    shape = client.createCollisionShape(pybullet.GEOM_BOX, halfExtents=[0.05, 0.3, 0.02])
    client.createMultiBody(0, shape, basePosition=[0.6, 0.0, BOX_TOP_M + 0.02])
    _place_on_box(arm, x_m=0.52, x_axis_world=(1.0, 0.0, 0.0))
    result = arm.move(slide_x_mm=20.0, regulate_force=False)
    limit_mm = arm.spring.max_indentation_mm(arm.controller.force_cap_n)
    assert result.guarded and result.reachable
    assert arm.indentation_mm() <= limit_mm + 1e-3
    result = arm.move()
    assert abs(result.force_n - 5.0) <= 0.5 and not result.safety_violation


def test_lift_off_gives_zero_force_and_coupling():
    _, _, arm = _box_world()
    _place_on_box(arm)
    assert arm.coupling().all()
    arm.move(push_mm=-10.0, regulate_force=False)
    assert arm.force_n() == 0.0
    assert not arm.coupling().any()
    assert arm.indentation_mm() == 0.0


@pytest.mark.parametrize("preset", ["linear", "convex"])
def test_half_face_over_edge_couples_half(preset):
    _, _, arm = _box_world(preset)
    arm.place_on_skin([BOX_EDGE_X_M, 0.0, BOX_TOP_M], [0.0, 0.0, 1.0], x_axis_world=(1, 0, 0))
    coupling = arm.coupling()
    assert coupling.shape == (get_preset(preset).n_elements,) and coupling.dtype == bool
    assert 0.45 <= coupling.mean() <= 0.55
    assert coupling[:50].all() and not coupling[-50:].any()  # marker end over the box
    assert abs(arm.force_n() - 5.0) <= 0.5


def test_exclude_from_contacts_silences_probe_skin_contacts():
    client, box, arm = _box_world()
    _place_on_box(arm)
    client.performCollisionDetection()
    assert client.getContactPoints(arm.body_id, box, arm.probe_link, -1)
    arm.exclude_from_contacts(box)
    client.performCollisionDetection()
    assert not client.getContactPoints(arm.body_id, box, arm.probe_link, -1)


# ----- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["slide_x_mm", "slide_y_mm", "rotate_deg", "tilt_x_deg", "tilt_y_deg", "push_mm"]
)
def test_nan_motion_raises(name):
    _, _, arm = _box_world()
    with pytest.raises(ValueError, match=name):
        arm.move(**{name: float("nan")})


@pytest.mark.parametrize("target", [1.9, 10.5, float("nan")])
def test_target_force_out_of_range_raises(target):
    _, _, arm = _box_world()
    with pytest.raises(ValueError, match="target_force_n"):
        arm.target_force_n = target
    with pytest.raises(ValueError, match="target_force_n"):
        arm.place_on_skin([0.5, 0.0, BOX_TOP_M], [0.0, 0.0, 1.0], target_force_n=target)
    with pytest.raises(ValueError, match="target_force_n"):
        AdmittanceController(target_force_n=target)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stiffness_n_per_mm": -1.0}, "stiffness_n_per_mm"),
        ({"stiffness_n_per_mm": 0.0}, "stiffness_n_per_mm"),
        ({"stiffness_n_per_mm": float("inf")}, "stiffness_n_per_mm"),
        ({"damping_n_s_per_mm": -0.1}, "damping_n_s_per_mm"),
    ],
)
def test_bad_spring_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TissueSpring(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"force_cap_n": 8.0}, "force_cap_n"),
        ({"force_range_n": (5.0, 3.0)}, "force_range_n"),
        ({"tolerance_n": 0.0}, "tolerance_n"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"control_period_s": -0.01}, "control_period_s"),
    ],
)
def test_bad_controller_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdmittanceController(**kwargs)


def test_bad_arm_arguments_raise():
    client, _, arm = _box_world()
    with pytest.raises(ValueError, match="unknown probe preset"):
        ProbeArm(client, ((0, 0, 0), (0, 0, 0, 1)), "phased")
    with pytest.raises(ValueError, match="StepLimits.slide_mm"):
        StepLimits(slide_mm=0.0)
    with pytest.raises(ValueError, match="coupling_tolerance_mm"):
        ProbeArm(client, ((0, 0, 0), (0, 0, 0, 1)), coupling_tolerance_mm=-1.0)
    with pytest.raises(ValueError, match="joint_margin_deg"):
        ProbeArm(client, ((0, 0, 0), (0, 0, 0, 1)), joint_margin_deg=-2.0)
    with pytest.raises(ValueError, match="normal_world"):
        arm.place_on_skin([0.5, 0.0, BOX_TOP_M], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="point_world"):
        arm.place_on_skin([0.5, float("nan"), BOX_TOP_M], [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="parallel"):
        arm.place_on_skin([0.5, 0.0, BOX_TOP_M], [0.0, 0.0, 1.0], x_axis_world=(0, 0, 2))
    with pytest.raises(ValueError, match="outside the limits"):
        arm.reset_joints(np.full(7, 3.1))
    with pytest.raises(ValueError, match="finite"):
        arm.reset_joints([0.0] * 6 + [float("nan")])
