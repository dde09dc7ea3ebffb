"""Ultrasound navigation: standard planes from labels, the env's contract, the oracle."""

from __future__ import annotations

import gymnasium as gym
import nibabel as nib
import numpy as np
import pytest
import torch

from sonoray.agents.random_agent import RandomAgent
from sonoray.agents.us_oracle import UltrasoundOracle
from sonoray.assets.patient import Patient
from sonoray.envs import ULTRASOUND_NAVIGATION_ID, us_tasks
from sonoray.envs.us_env import UltrasoundEnvConfig
from sonoray.sensors.us_quality import SCORE_NAMES, plane_errors

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


# ----- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"colour": "blue"}, r"unknown UltrasoundNavigation option\(s\) \['colour'\]; allowed:"),
        ({"task": "heart"}, r"task must be one of \['kidney_left_long_axis'"),
        ({"preset": "phased"}, r"preset must be one of \['convex', 'linear'\]"),
        ({"image_size": 8}, "image_size must be an integer >= 16"),
        ({"n_patients": 0}, "n_patients must be an integer >= 1"),
        ({"max_steps": 2.5}, "max_steps must be an integer >= 1"),
        ({"slide_mm": float("nan")}, "slide_mm must be a finite number > 0"),
        ({"target_force_n": 12.0}, r"target_force_n must lie in \[2.0, 10.0\] N"),
        ({"target_force_n": 3.0, "comfort_force_n": (4.0, 8.0)}, "must lie in comfort_force_n"),
        ({"force_cap_n": 25.0}, "at most the controller's hard limit 20.0 N"),
        ({"force_cap_n": 9.0}, "must exceed comfort_force_n's upper end 10.0 N"),
        ({"comfort_force_n": (6.0, 3.0)}, "comfort_force_n must be"),
        ({"start_angle_deg": (10.0, 120.0)}, "start_angle_deg must be"),
        ({"patient_yaw_deg": -1.0}, "patient_yaw_deg must be a number >= 0"),
        ({"depth_choices_mm": (0.0,)}, "depth_choices_mm must be a finite number > 0"),
        ({"labels": "labels.nii.gz"}, "given without ct"),
        ({"device": "abacus"}, "device must be a torch device"),
    ],
)
def test_bad_configuration_names_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UltrasoundEnvConfig.from_kwargs(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda' asked for, but CUDA is not available"):
        UltrasoundEnvConfig.from_kwargs(device="cuda")


def test_gym_make_passes_options_and_rejects_unknown_ones():
    with pytest.raises(ValueError, match=r"unknown UltrasoundNavigation option\(s\) \['gain'\]"):
        gym.make(ULTRASOUND_NAVIGATION_ID, gain=3.0)


def test_unsupported_task_fails_at_construction_listing_supported_ones(tmp_path):
    # A body holding only a right kidney, written as a labelled NIfTI CT.
    patient = _ellipsoid_patient("kidney_right", (30.0, -10.0, 0.0), (15, 25, 55), np.eye(3))
    nib.save(nib.Nifti1Image(patient.hu, patient.affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(patient.labels, patient.affine), tmp_path / "labels.nii.gz")
    (tmp_path / "structures.csv").write_text("id,name\n1,kidney_right\n")
    with pytest.raises(ValueError, match=r"supports: \['kidney_right_long_axis'\]"):
        gym.make(
            ULTRASOUND_NAVIGATION_ID,
            task="spleen_long_axis",
            ct=str(tmp_path / "ct.nii.gz"),
            labels=str(tmp_path / "labels.nii.gz"),
        )


# ----- the environment -------------------------------------------------------------------------

_SMALL = {"task": "kidney_right_long_axis", "n_patients": 2, "image_size": 64, "max_steps": 40}


@pytest.fixture(scope="module")
def env():
    environment = gym.make(ULTRASOUND_NAVIGATION_ID, render_mode="rgb_array", **_SMALL)
    yield environment
    environment.close()


@pytest.mark.slow
def test_env_passes_gymnasium_and_sb3_checkers(env):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    gym_check_env(env.unwrapped)
    sb3_check_env(env.unwrapped, warn=True)


@pytest.mark.slow
def test_spaces_observation_and_info(env):
    observation, info = env.reset(seed=3)
    assert env.observation_space.contains(observation)
    assert observation["image"].shape == (1, 64, 64) and observation["image"].dtype == np.uint8
    assert observation["image"].max() > 0  # the probe couples and sees tissue
    assert env.action_space.shape == (5,)
    for key in ("is_success", "scores", "force_n", "peak_force_n", "safety_violations"):
        assert key in info
    assert set(info["scores"]) == {"overall", *SCORE_NAMES}
    assert 2.0 <= info["force_n"] <= 10.0  # the start holds the target force
    # The start lies 30-80 mm and 10-40 degrees from the goal.
    start, goal = env.unwrapped.probe_in_patient, env.unwrapped.goal_in_patient
    angle = np.degrees(np.arccos((np.trace(start[:3, :3].T @ goal[:3, :3]) - 1) / 2))
    distance = np.linalg.norm(start[:3, 3] - goal[:3, 3])
    assert 10.0 - 0.1 <= angle <= 40.0 + 0.1
    assert 30.0 <= distance <= 80.0
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


@pytest.mark.slow
def test_same_seed_same_episode_bit_for_bit(env):
    actions = np.random.default_rng(7).uniform(-1, 1, (6, 5)).astype(np.float32)

    def episode(seed):
        observation, info = env.reset(seed=seed)
        trace = [observation["image"].copy(), observation["state"].copy(), info["patient"]]
        for action in actions:
            observation, reward, terminated, truncated, info = env.step(action)
            trace += [observation["image"].copy(), observation["state"].copy(), reward]
            if terminated or truncated:
                break
        return trace

    first, other, again = episode(11), episode(12), episode(11)
    assert len(first) == len(again)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=False))


def test_reset_options_pick_a_patient_or_raise(env):
    env.reset(seed=0, options={"patient_index": 1})
    assert env.unwrapped.patient_index == 1
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['zzz'\]"):
        env.reset(seed=0, options={"zzz": 1})
    with pytest.raises(ValueError, match=r"patient index must be in \[0, 2\), got 99"):
        env.reset(seed=0, options={"patient_index": 99})


@pytest.mark.slow
def test_nan_and_misshapen_actions_raise(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be finite"):
        env.step(np.array([0.0, np.nan, 0.0, 0.0, 0.0], dtype=np.float32))
    with pytest.raises(ValueError, match=r"action must have shape \(5,\)"):
        env.step(np.zeros(4, dtype=np.float32))


@pytest.mark.slow
def test_push_beyond_the_force_cap_terminates_with_the_reason():
    env = gym.make(ULTRASOUND_NAVIGATION_ID, **{**_SMALL, "n_patients": 1, "force_cap_n": 12.0})
    try:
        env.reset(seed=0)
        arm = env.unwrapped.arm
        # Something pushes the probe 10 mm into the skin (a patient breathing against it).
        arm.move(push_mm=10.0, regulate_force=False)
        assert arm.force_n() >= 12.0
        _, _, terminated, truncated, info = env.step(np.zeros(5, dtype=np.float32))
        assert terminated and not truncated
        assert info["termination_reason"] == "force_cap"
        assert info["safety_violation"] and info["safety_violations"] == 1
        assert info["peak_force_n"] >= 12.0 and not info["is_success"]
    finally:
        env.close()


@pytest.mark.slow
def test_gain_and_depth_are_drawn_per_episode_from_the_seed():
    options = {"gain_db_range": (0.0, 30.0), "depth_choices_mm": (110.0, 150.0)}
    env = gym.make(ULTRASOUND_NAVIGATION_ID, **{**_SMALL, "n_patients": 1, **options})
    try:
        drawn = [env.reset(seed=seed)[1] for seed in range(6)]
        assert {info["depth_mm"] for info in drawn} == {110.0, 150.0}
        gains = [info["gain_db"] for info in drawn]
        assert all(0.0 <= g <= 30.0 for g in gains) and len(set(gains)) == len(gains)
        again = env.reset(seed=3)[1]
        assert (again["gain_db"], again["depth_mm"]) == (gains[3], drawn[3]["depth_mm"])
    finally:
        env.close()


@pytest.mark.slow
def test_oracle_reaches_the_plane_and_beats_random(env):
    oracle, random_agent = UltrasoundOracle(), RandomAgent()
    results = {}
    for agent in (oracle, random_agent):
        successes = 0
        for seed in range(3):
            observation, info = env.reset(seed=seed)
            agent.reset(env.unwrapped, seed)
            done = False
            while not done:
                action = agent.act(observation, env.unwrapped)
                observation, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
            assert not info["safety_violations"]
            successes += info["is_success"]
        results[agent.name] = successes
    assert results["scripted"] == 3
    assert results["random"] < 3


@pytest.mark.slow
@pytest.mark.chest_ct
def test_oracle_finds_the_liver_plane_on_the_example_ct(chest_ct_path):
    env = gym.make(
        ULTRASOUND_NAVIGATION_ID,
        task="liver_long_axis",
        ct=str(chest_ct_path / "ct.nii.gz"),
        labels=str(chest_ct_path / "labels.nii.gz"),
        image_size=64,
    )
    try:
        oracle = UltrasoundOracle()
        for seed in range(2):
            observation, info = env.reset(seed=seed)
            assert info["patient"] == "ct"
            done = False
            while not done:
                action = oracle.act(observation, env.unwrapped)
                observation, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
            assert info["is_success"], info
            assert info["plane_distance_mm"] <= 5.0 and info["plane_angle_deg"] <= 5.0
        with pytest.raises(ValueError, match=r"cut by the scan.*supports: \['liver_long_axis'"):
            gym.make(
                ULTRASOUND_NAVIGATION_ID,
                task="kidney_right_long_axis",
                ct=str(chest_ct_path / "ct.nii.gz"),
                labels=str(chest_ct_path / "labels.nii.gz"),
            )
    finally:
        env.close()
