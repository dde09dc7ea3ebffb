"""X-ray positioning env: tasks, kinematic inverse, checkers, determinism, safety, oracle."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import sonoray.envs  # noqa: F401  (registers the env ids)
from sonoray.agents.random_agent import RandomAgent
from sonoray.agents.xray_oracle import XRayOracle, fit_target_in_field
from sonoray.assets.patient import Patient
from sonoray.envs import XRAY_POSITIONING_ID
from sonoray.envs.carm import JOINT_NAMES
from sonoray.envs.patient_pool import PatientPool
from sonoray.envs.xray_env import (
    XRayEnvConfig,
    XRayPositioningEnv,
    carm_beam_direction,
    reachable_beam_joints,
)
from sonoray.envs.xray_tasks import (
    XRAY_VIEWS,
    angles_of_beam_direction,
    beam_direction_in_patient,
    get_view,
    supported_views,
)

SMALL = {"n_patients": 2, "image_size": 64}
ORBITAL_RANGE = (-40.0, 110.0)
ANGULAR_RANGE = (-45.0, 45.0)


def run_episode(env, agent, seed):
    obs, info = env.reset(seed=seed)
    agent.reset(env.unwrapped, seed=seed)
    rewards, observations = [], [obs]
    terminated = truncated = False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, env.unwrapped))
        rewards.append(reward)
        observations.append(obs)
    return observations, rewards, info


@pytest.fixture(scope="module")
def env():
    e = gym.make(XRAY_POSITIONING_ID, **SMALL)
    yield e
    e.close()


@pytest.fixture(scope="module")
def cardiac_env():
    e = gym.make(XRAY_POSITIONING_ID, task="cardiac_oblique", **SMALL)
    yield e
    e.close()


# ----- tasks as data ----------------------------------------------------------------------


def test_beam_directions_follow_the_clinical_angles():
    np.testing.assert_allclose(beam_direction_in_patient(0, 0), [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(beam_direction_in_patient(90, 0), [-1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(beam_direction_in_patient(-90, 0), [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(beam_direction_in_patient(0, 90), [0, 0, 1], atol=1e-12)
    # LAO 30 / cranial 20: longitude 30 towards the left, latitude 20 towards the head.
    c20, s20 = math.cos(math.radians(20)), math.sin(math.radians(20))
    np.testing.assert_allclose(
        get_view("cardiac_oblique").beam_direction_in_patient(), [-0.5 * c20, 0.75**0.5 * c20, s20]
    )
    for lao, cranial in [(30, 20), (-25, -10), (90, 0), (0, 40)]:
        got = angles_of_beam_direction(beam_direction_in_patient(lao, cranial))
        np.testing.assert_allclose(got, (lao, cranial), atol=1e-9)


def test_required_views_exist_with_their_targets():
    expected = {
        "chest_ap": "vertebrae_T7",
        "thoracic_spine_lateral": "vertebrae_T7",
        "lumbar_spine_ap": "vertebrae_L3",
        "lumbar_spine_lateral": "vertebrae_L3",
        "pelvis_ap": "sacrum",
        "kidney_ap": "kidney_left",
        "cardiac_oblique": "heart",
    }
    for name, target in expected.items():
        view = get_view(name)
        assert view.target == target and view.structures[0] == target
    oblique = get_view("cardiac_oblique")
    assert (oblique.lao_deg, oblique.cranial_deg) == (30.0, 20.0)
    with pytest.raises(ValueError, match="unknown X-ray task 'knee_ap'.*chest_ap"):
        get_view("knee_ap")


def _toy_patient(names: dict[int, str]) -> Patient:
    labels = np.zeros((6, 6, 6), dtype=np.int16)
    for i, label in enumerate(names):
        labels[i, 1:3, 1:3] = label
    return Patient(
        "toy",
        np.zeros((6, 6, 6), np.float32),
        labels,
        names,
        np.eye(4),
        np.ones((6, 6, 6), bool),
    )


def test_supported_views_need_every_structure():
    spine_only = _toy_patient({1: "vertebrae_T6", 2: "vertebrae_T7", 3: "vertebrae_T8"})
    assert supported_views([spine_only]) == ["thoracic_spine_lateral"]
    assert get_view("chest_ap").missing_structures(spine_only) == ["lungs", "heart"]


# ----- C-arm inverse kinematics ----------------------------------------------------------


def test_carm_beam_direction_matches_the_carm(env):
    carm = env.unwrapped.carm
    rng = np.random.default_rng(1)
    try:
        for _ in range(10):
            joints = rng.uniform([-400, -150, -215, -40, -45], [400, 150, 215, 110, 45])
            carm.reset(joints)
            np.testing.assert_allclose(
                carm_beam_direction(joints[3], joints[4]), carm.beam_direction(), atol=1e-6
            )
    finally:
        env.reset(seed=0)


def test_reachable_beam_joints_inverts_reachable_directions():
    rng = np.random.default_rng(2)
    for orbital, angular in rng.uniform([-40, -45], [89, 45], (20, 2)):
        got = reachable_beam_joints(
            carm_beam_direction(orbital, angular), ORBITAL_RANGE, ANGULAR_RANGE
        )
        np.testing.assert_allclose(got, (orbital, angular), atol=1e-9)


def test_lateral_beam_of_a_yawed_patient_misses_by_yaw_times_sin45():
    # The angular axis is parallel to a lateral beam: the best reachable direction tilts
    # by the 45 degree angular limit, leaving an error of asin(sin(yaw) / sqrt(2)).
    for yaw_deg in (2.0, 5.0):
        yaw = math.radians(yaw_deg)
        wanted = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        orbital, angular = reachable_beam_joints(wanted, ORBITAL_RANGE, ANGULAR_RANGE)
        error = math.degrees(math.acos(carm_beam_direction(orbital, angular) @ wanted))
        expected = math.degrees(math.acos(math.sqrt(1 - math.sin(yaw) ** 2 / 2)))
        assert error == pytest.approx(expected, abs=1e-6)
        assert abs(angular) == pytest.approx(45.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_goal_joints_give_the_view_exactly(env, seed):
    xray = env.unwrapped
    env.reset(seed=seed)
    try:
        xray.carm.reset(xray.goal_joints())
        errors = xray.view_errors()
        assert errors["view_angle_error_deg"] < 0.05  # float32 acos near 1
        assert errors["centring_error_mm"] < 0.01
        assert errors["target_in_field"]
    finally:
        env.reset(seed=seed)


# ----- configuration ----------------------------------------------------------------------


def test_make_overrides_config_fields(env):
    cfg = env.unwrapped.config
    assert cfg.image_size == 64 and cfg.n_patients == 2 and cfg.task == "chest_ap"
    assert env.observation_space["image"].shape == (1, 64, 64)
    assert env.action_space.shape == (5,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"colour": 3}, r"unknown XRayPositioning option\(s\) \['colour'\]; allowed: .*task"),
        ({"task": "knee_ap"}, "unknown X-ray task 'knee_ap'"),
        ({"image_size": 8}, r"image_size must be in \[16, 1024\], got 8"),
        ({"image_size": 64.5}, "image_size must be an integer"),
        ({"n_patients": 0}, "n_patients must be in"),
        ({"perturb_angle_deg": (45, 5)}, "perturb_angle_deg must satisfy"),
        ({"perturb_translation_mm": (20,)}, "perturb_translation_mm must be"),
        ({"kvp": 200.0}, "kvp must be a number in"),
        ({"mas": -1.0}, "mas must be a number in"),
        ({"max_exposures": 1}, r"max_exposures must be in \[2"),
        ({"step_rotation_deg": float("nan")}, "step_rotation_deg must be a number"),
        ({"reward_dose_weight": -0.1}, "reward_dose_weight must be a number"),
        ({"randomize_exposure": "yes"}, "randomize_exposure must be True or False"),
        ({"labels": "labels.nii.gz"}, "needs ct="),
        ({"device": "tpu:x"}, "device must name a torch device"),
        ({"drr_max_voxel_mm": 0.0}, "drr_max_voxel_mm must be a number in"),
        ({"patient_yaw_deg": -1.0}, "patient_yaw_deg must be a number in"),
    ],
)
def test_bad_config_raises_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XRayEnvConfig.from_kwargs(**kwargs)


def test_bad_render_mode_raises():
    with pytest.raises(ValueError, match="render_mode must be one of"):
        XRayPositioningEnv(render_mode="human", **SMALL)


# ----- Gymnasium contract -----------------------------------------------------------------


def test_gymnasium_env_checker(env):
    from gymnasium.utils.env_checker import check_env

    check_env(env.unwrapped, skip_render_check=True)


def test_sb3_env_checker(env):
    from stable_baselines3.common.env_checker import check_env

    check_env(env.unwrapped, warn=True)


def test_observation_and_info_contents(env):
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert obs["image"].dtype == np.uint8 and obs["image"].std() > 5
    assert info["exposures"] == 1 and info["dose_dap"] > 0
    assert info["cumulative_dose_dap"] == pytest.approx(info["dose_dap"])
    assert 0.0 <= info["scores"]["overall"] <= 1.0
    obs, reward, terminated, truncated, info = env.step(np.zeros(5, np.float32))
    assert np.isfinite(reward)
    assert info["exposures"] == 2
    assert info["cumulative_dose_dap"] == pytest.approx(2 * info["dose_dap"], rel=1e-6)
    assert obs["state"][-1] == pytest.approx(2 / env.unwrapped.config.max_exposures)
    assert set(info) >= {
        "is_success",
        "scores",
        "dose_dap",
        "cumulative_dose_dap",
        "collisions",
        "termination_reason",
        "limit_hits",
    }


@pytest.mark.slow
def test_same_seed_same_episode():
    # Two envs built apart, one episode each (6 exposures keeps it short), bit for bit.
    short = dict(SMALL, max_exposures=6)
    first_env, second_env = XRayPositioningEnv(**short), XRayPositioningEnv(**short)
    assert first_env.sensor is second_env.sensor  # one set of volumes per process
    try:
        first = run_episode(first_env, RandomAgent(), seed=11)
        second = run_episode(second_env, RandomAgent(), seed=11)
        third = run_episode(first_env, RandomAgent(), seed=12)
    finally:
        first_env.close()
        second_env.close()
    assert len(first[1]) == len(second[1]) > 1
    assert first[1] == second[1]
    for a, b in zip(first[0], second[0], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["state"], b["state"])
    assert not np.array_equal(third[0][0]["image"], first[0][0]["image"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_raises(env, bad):
    env.reset(seed=0)
    action = np.zeros(5, np.float32)
    action[2] = bad
    with pytest.raises(ValueError, match="action must be finite"):
        env.step(action)


def test_bad_reset_options_raise(env):
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['patient'\]"):
        env.reset(seed=0, options={"patient": 1})
    with pytest.raises(ValueError, match=r"patient index must be in \[0, 2\), got 5"):
        env.reset(seed=0, options={"patient_index": 5})
    env.reset(seed=0)


def test_wrong_action_shape_and_step_before_reset_raise():
    e = XRayPositioningEnv(**SMALL)
    with pytest.raises(RuntimeError, match="call reset"):
        e.step(np.zeros(5, np.float32))
    e.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must have shape \(5,\)"):
        e.step(np.zeros(4, np.float32))
    e.close()


def test_out_of_box_action_is_clipped_and_reported(env):
    env.reset(seed=5)
    before = env.unwrapped.joints()
    *_, info = env.step(np.array([3.0, 0, 0, 0, 0], np.float32))
    assert info["action_clipped"]
    step = env.unwrapped.step_limits[0]
    assert env.unwrapped.joints()[0] - before[0] == pytest.approx(step)


def test_limit_hits_are_reported(env):
    env.reset(seed=4)
    xray = env.unwrapped
    joints = xray.joints()
    joints[1] = xray.carm.limits.lateral_mm[1] - 5.0
    xray.carm.reset(joints)
    obs, _, _, _, info = env.step(np.array([0, 1, 0, 0, 0], np.float32))
    assert info["limit_hits"] == ["lateral"]
    assert info["command"]["requested"]["lateral"] == pytest.approx(joints[1] + 25.0)
    assert xray.joints()[1] == pytest.approx(xray.carm.limits.lateral_mm[1])
    assert obs["state"][1] == pytest.approx(1.0)


def test_collision_terminates_with_the_reason(env):
    # At orbital 30 and a high lift the X-ray tube meets the table top from below.
    env.reset(seed=6)
    xray = env.unwrapped
    xray.carm.reset([0.0, 0.0, 125.0, 30.0, 0.0])
    assert not xray.scene.collisions()
    _, reward, terminated, truncated, info = env.step(np.array([0, 0, 1, 0, 0], np.float32))
    assert terminated and not truncated
    assert info["termination_reason"] == "collision"
    assert any("source" in c and "table" in c for c in info["collisions"])
    assert not info["is_success"]
    assert reward < -0.5


def test_truncates_after_max_exposures():
    e = XRayPositioningEnv(max_exposures=3, **SMALL)
    e.reset(seed=0)
    for expected in (False, True):
        *_, terminated, truncated, info = e.step(np.zeros(5, np.float32))
        assert truncated is expected and not terminated
    assert info["termination_reason"] == "max_exposures" and info["exposures"] == 3
    e.close()


def test_render_rgb_array():
    e = XRayPositioningEnv(render_mode="rgb_array", render_size_px=160, **SMALL)
    e.reset(seed=0)
    e.step(np.zeros(5, np.float32))
    frame = e.render()
    e.close()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[0] == 160
    assert frame.shape[2] == 3 and frame.std() > 10


def test_unsupported_task_lists_supported_ones(chest_ct_path):
    with pytest.raises(ValueError, match=r"pelvis_ap.*sacrum.*supports: \[.*'chest_ap'"):
        XRayPositioningEnv(task="pelvis_ap", ct=str(chest_ct_path), image_size=64)


# ----- oracle -----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["env", "cardiac_env"])
def test_oracle_reaches_the_view(fixture, request):
    e = request.getfixturevalue(fixture)
    for seed in range(3):
        _, rewards, info = run_episode(e, XRayOracle(), seed=100 + seed)
        assert info["is_success"], info
        assert info["termination_reason"] == "success"
        assert len(rewards) <= 8
        assert info["view_angle_error_deg"] <= 3.0 and info["centring_error_mm"] <= 10.0


def test_what_if_queries_leave_the_carm_where_it_was(env):
    env.reset(seed=6)
    xray = env.unwrapped
    here = xray.joints()
    colliding = np.array([0.0, 0.0, 150.0, 30.0, 0.0])  # tube in the table top
    assert any("source" in c for c in xray.collisions_between(here, colliding))
    assert xray.collisions_between(here, here) == []
    geometry = xray.exposure_geometry_at(xray.goal_joints())
    np.testing.assert_array_equal(xray.joints(), here)
    np.testing.assert_allclose(
        geometry.source_mm + 530.0 * geometry.beam_direction, xray.target_centroid_mm(), atol=1e-3
    )


def test_field_fit_brings_a_lopsided_target_into_the_field():
    # The phantom's sacrum projects further below its centroid than the field reaches.
    e = XRayPositioningEnv(task="pelvis_ap", **SMALL)
    try:
        e.reset(seed=0, options={"patient_index": 0})
        goal = e.goal_joints()
        e.carm.reset(goal)
        assert not e.view_errors()["target_in_field"]
        e.carm.reset(fit_target_in_field(e, goal))
        errors = e.view_errors()
    finally:
        e.close()
    assert errors["target_in_field"]
    assert errors["centring_error_mm"] <= 0.9 * 10.0 + 1e-3
    assert errors["view_angle_error_deg"] < 0.05


@pytest.mark.chest_ct
@pytest.mark.slow
def test_oracle_on_the_example_ct(chest_ct_path):
    e = gym.make(XRAY_POSITIONING_ID, task="chest_ap", ct=str(chest_ct_path), image_size=64)
    try:
        for seed in range(2):
            _, _, info = run_episode(e, XRayOracle(), seed=seed)
            assert info["is_success"], info
    finally:
        e.close()


def test_patient_pool_is_seeded_and_cached():
    a, b = PatientPool(2, base_seed=0), PatientPool(2, base_seed=0)
    assert [p.name for p in a.patients] == [p.name for p in b.patients]
    assert a[1] is b[1]  # built once per process
    rng = np.random.default_rng(0)
    assert {a.pick(rng) for _ in range(50)} == {0, 1}
    with pytest.raises(ValueError, match="n_patients must be >= 1"):
        PatientPool(0)
    with pytest.raises(ValueError, match="base_seed must be >= 0"):
        PatientPool(1, base_seed=-1)


def test_joint_order_is_the_action_order():
    assert JOINT_NAMES == ("longitudinal", "lateral", "lift", "orbital", "angular")
    assert set(XRAY_VIEWS) >= {"chest_ap", "cardiac_oblique"}
