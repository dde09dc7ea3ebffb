"""Robotic ultrasound navigation: find an organ's standard plane with a force-controlled probe.

A KUKA iiwa holds a convex (or linear) probe on the skin of a patient lying on the
table; the agent slides, rotates and tilts the probe in its own frame while an
admittance controller holds the contact force, until the B-mode image shows the
task's standard plane (:mod:`sonoray.envs.us_tasks`). Physics, contact and force come
from :mod:`sonoray.envs.scene` and :mod:`sonoray.envs.probe_arm`; images from
:mod:`sonoray.sensors.ultrasound`; image quality from :mod:`sonoray.sensors.us_quality`.

Main reference for the task: robotic standard-plane navigation as in Li et al.,
"Autonomous navigation of an ultrasound probe towards standard scan planes with deep
reinforcement learning" (ICRA 2021), whose success thresholds (about 5 mm and 5
degrees) are the defaults here.

Limitations: the patient is rigid (the tissue spring gives force, not deformation, so
pressing harder does not change the image). The arm follows each step from its current
joint configuration; a pose it cannot reach from there leaves the probe where it was
(``info["reachable"]`` is False) even where another configuration would reach it. The
force cap is a monitor on the measured force: the controller itself holds the target and
never presses beyond its hard limit (20 N), so the cap trips on transient peaks or an
outside push, not in steady contact. One env renders one image per step. The start pose
is sampled around the goal, not taken from a clinical scanning protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from scipy.spatial.transform import Rotation

from sonoray.envs import frames
from sonoray.envs.env_config import (
    check_int,
    check_number,
    config_from_kwargs,
    is_finite_number,
)
from sonoray.envs.force_control import FORCE_DEFAULTS
from sonoray.envs.patient_pool import PatientPool
from sonoray.envs.scene import Scene, SceneConfig
from sonoray.envs.us_tasks import (
    US_TASKS,
    StandardPlane,
    UltrasoundTask,
    UnsupportedTaskError,
    skin_crossing_mm,
    skin_normal_mm,
    standard_plane,
    supported_tasks,
)
from sonoray.sensors import us_quality
from sonoray.sensors.probes import PRESETS
from sonoray.sensors.ultrasound import BModeSettings, BModeSimulator

logger = logging.getLogger(__name__)

#: Order of the action components; each is scaled by its step limit.
ACTION_NAMES = ("slide_x", "slide_y", "rotate", "tilt_x", "tilt_y")

#: Layout of ``observation["state"]``: force over the cap, probe position relative to the
#: start (in the start probe frame) over 100 mm, rotation relative to the start as a rotation
#: vector over 90 degrees, then the last action.
STATE_NAMES = (
    "force",
    "dx",
    "dy",
    "dz",
    "rx",
    "ry",
    "rz",
    *(f"last_{a}" for a in ACTION_NAMES),
)
_POSITION_SCALE_MM = 100.0
_ROTATION_SCALE_DEG = 90.0
#: Bounds of ``observation["state"]`` (values are clipped to them): force up to four caps,
#: position within 2 m, rotation vectors up to 180 degrees, actions in [-1, 1].
_STATE_HIGH = np.array([4.0, *[20.0] * 3, *[2.0] * 3, *[1.0] * 5], dtype=np.float32)
_STATE_LOW = np.array([0.0, *(-_STATE_HIGH[1:])], dtype=np.float32)

#: Attempts at sampling a start pose before giving up.
_START_ATTEMPTS = 64
#: Largest angle between a start beam and the inward skin normal (deg): beyond it a convex
#: face rolls off the skin.
_START_MAX_SKIN_ANGLE_DEG = 30.0
#: The force controller's allowed targets and the cap it never presses beyond (N).
_TARGET_FORCE_RANGE_N = (
    FORCE_DEFAULTS["min_target_force_n"][0],
    FORCE_DEFAULTS["max_target_force_n"][0],
)
_HARD_FORCE_CAP_N = FORCE_DEFAULTS["force_cap_n"][0]
#: The contact the probe makes by design, as ``Scene.collisions`` names it.
_PROBE_ON_SKIN = {("patient", "skin"), ("probe_arm", "probe")}
#: Height of each panel of the rendered frame (pixels).
_RENDER_SIZE_PX = 256


@dataclass(frozen=True)
class UltrasoundEnvConfig:
    """Configuration of :class:`UltrasoundNavigationEnv`; every field is a ``gym.make`` keyword.

    Attributes:
        task: Key of ``us_tasks.US_TASKS``.
        preset: Probe preset (``"convex"`` or ``"linear"``).
        image_size: Side of the square B-mode observation (pixels).
        n_patients: Procedural phantoms in the pool (ignored with ``ct``).
        patient_seed: Phantom ``k`` of the pool has seed ``patient_seed + k``.
        ct: Path of a CT (file or folder) to use instead of the phantom pool.
        labels: Label volume of ``ct`` in TotalSegmentator naming, if not beside it.
        ct_spacing_mm: Resample the CT to this isotropic voxel size; ``None`` keeps its own.
        slide_mm: Slide along probe x and y per step at action 1.
        rotate_deg: Rotation about the probe axis per step at action 1.
        tilt_deg: Tilt about probe x and y per step at action 1.
        target_force_n: Contact force the controller holds (within the controller's 2-10 N).
        comfort_force_n: (low, high) force range without penalty; success needs it too.
        force_cap_n: Force at which the episode ends as a safety violation: a monitor on the
            measured force, at most the force controller's own hard limit (20 N), beyond
            which it never presses.
        plane_tolerance_mm: Success distance of the organ's centroid from the image plane;
            ``None`` takes the task's (5 mm).
        angle_tolerance_deg: Success angle between image plane and standard plane; ``None``
            takes the task's (5 degrees).
        max_steps: Steps before truncation.
        start_distance_mm: (low, high) distance of the start from the goal on the skin.
        start_angle_deg: (low, high) rotation angle of the start from the goal orientation.
        patient_offset_mm: Largest shift of the patient on the table along x and y.
        patient_yaw_deg: Largest rotation of the patient about the vertical.
        gain_db_range: (low, high) B-mode gain (dB) drawn per episode; ``None`` keeps the
            simulator's default gain.
        depth_choices_mm: Imaging depths drawn per episode; empty keeps the preset's.
            Each extra depth holds one more copy of the volumes on ``device``.
        success_bonus: Reward on success.
        force_penalty_per_n: Reward lost per newton outside ``comfort_force_n`` per step.
        device: Torch device of the B-mode simulator (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    task: str = "liver_long_axis"
    preset: str = "convex"
    image_size: int = 128
    n_patients: int = 4
    patient_seed: int = 0
    ct: str | None = None
    labels: str | None = None
    ct_spacing_mm: float | None = None
    slide_mm: float = 5.0
    rotate_deg: float = 5.0
    tilt_deg: float = 5.0
    target_force_n: float = 5.0
    comfort_force_n: tuple[float, float] = (2.0, 10.0)
    force_cap_n: float = 20.0
    plane_tolerance_mm: float | None = None
    angle_tolerance_deg: float | None = None
    max_steps: int = 100
    start_distance_mm: tuple[float, float] = (30.0, 80.0)
    start_angle_deg: tuple[float, float] = (10.0, 40.0)
    patient_offset_mm: float = 20.0
    patient_yaw_deg: float = 3.0
    gain_db_range: tuple[float, float] | None = None
    depth_choices_mm: tuple[float, ...] = ()
    success_bonus: float = 5.0
    force_penalty_per_n: float = 0.1
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check_choice("task", self.task, sorted(US_TASKS))
        _check_choice("preset", self.preset, sorted(PRESETS))
        check_int("image_size", self.image_size, 16)
        check_int("n_patients", self.n_patients, 1)
        check_int("patient_seed", self.patient_seed, 0)
        check_int("max_steps", self.max_steps, 1)
        for name in ("ct", "labels"):
            value = getattr(self, name)
            if (
                value is not None
                and not isinstance(value, (str, bytes))
                and not hasattr(value, "__fspath__")
            ):
                raise ValueError(f"{name} must be a path or None, got {value!r}")
        if self.labels is not None and self.ct is None:
            raise ValueError(f"labels={self.labels!r} given without ct; set ct to the CT's path")
        for name in ("ct_spacing_mm", "plane_tolerance_mm", "angle_tolerance_deg"):
            check_number(name, getattr(self, name), 0.0, optional=True)
        for name in ("slide_mm", "rotate_deg", "tilt_deg", "force_cap_n"):
            check_number(name, getattr(self, name), 0.0)
        low, high = _check_range("comfort_force_n", self.comfort_force_n, 0.0)
        _check_range("start_distance_mm", self.start_distance_mm, 0.0)
        _check_range("start_angle_deg", self.start_angle_deg, 0.0, 90.0)
        if self.gain_db_range is not None:
            _check_range("gain_db_range", self.gain_db_range, -math.inf)
        target_low, target_high = _TARGET_FORCE_RANGE_N
        force = self.target_force_n
        if not (is_finite_number(force) and target_low <= force <= target_high):
            raise ValueError(
                f"target_force_n must lie in [{target_low}, {target_high}] N, "
                f"got {self.target_force_n!r}"
            )
        if not low <= self.target_force_n <= high:
            raise ValueError(
                f"target_force_n must lie in comfort_force_n {self.comfort_force_n}, "
                f"got {self.target_force_n!r}"
            )
        if not high < self.force_cap_n <= _HARD_FORCE_CAP_N:
            raise ValueError(
                f"force_cap_n must exceed comfort_force_n's upper end {high} N and be at most "
                f"the controller's hard limit {_HARD_FORCE_CAP_N} N, got {self.force_cap_n!r}"
            )
        for name in ("patient_offset_mm", "patient_yaw_deg", "force_penalty_per_n"):
            check_number(name, getattr(self, name), 0.0, low_open=False)
        if not is_finite_number(self.success_bonus):
            raise ValueError(f"success_bonus must be a finite number, got {self.success_bonus!r}")
        for depth in self.depth_choices_mm:
            check_number("depth_choices_mm", depth, 0.0)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}"
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} asked for, but CUDA is not available; use 'cpu'"
            )

    @classmethod
    def from_kwargs(
        cls, config: UltrasoundEnvConfig | None = None, **kwargs: Any
    ) -> UltrasoundEnvConfig:
        """``config`` (or the defaults) overridden by ``kwargs``; an unknown name raises
        ``ValueError`` listing the allowed ones."""
        return config_from_kwargs(cls, "UltrasoundNavigation", config, **kwargs)


class UltrasoundNavigationEnv(gym.Env):
    """Slide, rotate and tilt a probe on the skin until the image shows a standard plane.

    Description:
        A patient from the env's pool lies on the table; the arm's base stands on the
        side of the task's acoustic window. The probe starts in contact near the goal
        and each step moves it in its own frame (origin at the face centre, +z the beam,
        +x the array with the marker at -x) while the force controller holds
        ``target_force_n`` along the beam.

    Action:
        ``Box(-1, 1, (5,))``: slide x, slide y (times ``slide_mm``), rotate about the beam
        (times ``rotate_deg``), tilt about x and y through the face centre (times
        ``tilt_deg``). NaN raises ``ValueError``; values outside [-1, 1] are clipped.

    Observation:
        ``Dict(image=uint8 (1, H, W), state=float32 (12,))``: the B-mode image (row 0 at the
        face, column 0 on the marker side) and ``STATE_NAMES``.

    Randomisations (all from ``self.np_random``): the patient (by the episode's seed), its
    placement on the table (``patient_offset_mm``, ``patient_yaw_deg``), the start pose
    (on the skin ``start_distance_mm`` from the goal, rotated ``start_angle_deg`` from it),
    gain (``gain_db_range``) and imaging depth (``depth_choices_mm``).

    Reward:
        Change of the overall image score (``us_quality``) since the last step, minus
        ``force_penalty_per_n`` per newton outside ``comfort_force_n``, plus
        ``success_bonus`` on success.

    Success (terminates):
        The organ's centroid within ``plane_tolerance_mm`` (default 5 mm) of the image
        plane, the image plane within ``angle_tolerance_deg`` (default 5 degrees) of the
        standard plane, the marker on the standard side (array within 90 degrees of the
        goal's), target visibility at least the task's ``min_visibility``, and the contact
        force within ``comfort_force_n`` (default 2-10 N).

    Other ends: a force at or above ``force_cap_n`` terminates as a safety violation
    (``info["termination_reason"] == "force_cap"``); ``max_steps`` truncates.

    Info:
        ``is_success``, ``scores`` (``overall`` and the scores it combines, see
        ``us_quality``), ``score_parts`` (their physical values: coupled fraction, target
        area, gCNR, confidence, plane distance and angles), ``plane_distance_mm``,
        ``plane_angle_deg``, ``force_n``, ``peak_force_n`` (episode), ``safety_violation``
        (this step), ``safety_violations`` (episode count), ``termination_reason``
        (``"success"``, ``"force_cap"``, ``"max_steps"`` or ``None``), ``reachable`` (last
        move), ``collisions`` (touching bodies other than the probe on the skin, e.g. the
        arm against the table; reported, not terminal), ``patient``, ``task``,
        ``gain_db``, ``depth_mm``.

    Args:
        render_mode: ``"rgb_array"`` or ``None``.
        config: A full configuration; keyword arguments override its fields.
        **kwargs: Fields of :class:`UltrasoundEnvConfig`.

    Raises:
        ValueError: for an unknown option or a bad value (naming the allowed values), or
            a task the patients cannot support (listing the tasks they support).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        render_mode: str | None = None,
        config: UltrasoundEnvConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, "
                f"got {render_mode!r}"
            )
        self.config = config = UltrasoundEnvConfig.from_kwargs(config, **kwargs)
        self.render_mode = render_mode
        self.task: UltrasoundTask = US_TASKS[config.task]
        self.preset = PRESETS[config.preset]

        if config.ct is not None:
            self.pool = PatientPool.from_ct(config.ct, config.labels, config.ct_spacing_mm)
        else:
            self.pool = PatientPool(config.n_patients, config.patient_seed)
        depths_mm = config.depth_choices_mm or (self.preset.depth_mm,)
        self.planes: tuple[StandardPlane, ...] = self._standard_planes(min(depths_mm))
        self._target_ids = tuple(p.structure_ids(self.task.organ) for p in self.pool.patients)
        self._plane_areas_mm2 = tuple(
            us_quality.target_area_on_plane_mm2(
                patient.labels, patient.affine, ids, plane.centroid_mm, plane.normal
            )
            for patient, ids, plane in zip(
                self.pool.patients, self._target_ids, self.planes, strict=True
            )
        )
        self._tolerance_mm = config.plane_tolerance_mm or self.task.plane_tolerance_mm
        self._tolerance_deg = config.angle_tolerance_deg or self.task.angle_tolerance_deg

        self.scene = Scene(
            self.pool.patients,
            SceneConfig(
                carm=False,
                probe_arm=True,
                probe_arm_side=self.task.acoustic_window.arm_side,
                probe_preset=config.preset,
                probe_arm_gap_m=self.task.acoustic_window.arm_gap_m,
            ),
        )
        self.arm = self.scene.probe_arm
        self.arm.target_force_n = config.target_force_n
        self._check_reachable()

        size = (config.image_size, config.image_size)
        self._simulators = {
            depth: BModeSimulator(
                list(self.pool.patients),
                self.preset,
                settings=BModeSettings(image_shape=size, depth_mm=depth),
                device=config.device,
            )
            for depth in depths_mm
        }

        self.action_space = spaces.Box(-1.0, 1.0, (len(ACTION_NAMES),), np.float32)
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (1, *size), np.uint8),
                "state": spaces.Box(_STATE_LOW, _STATE_HIGH, dtype=np.float32),
            }
        )
        self._action_scale = np.array(
            [config.slide_mm, config.slide_mm, config.rotate_deg, config.tilt_deg, config.tilt_deg]
        )
        self._episode_ready = False
        logger.debug(
            "%s on %s: goal depths %s mm",
            self.task.name,
            [p.name for p in self.pool.patients],
            [round(p.depth_mm) for p in self.planes],
        )

    # ----- construction -----------------------------------------------------------------

    def _standard_planes(self, max_depth_mm: float) -> tuple[StandardPlane, ...]:
        planes = []
        for patient in self.pool.patients:
            try:
                planes.append(standard_plane(patient, self.task, max_depth_mm))
            except UnsupportedTaskError as error:
                supported = supported_tasks(patient, max_depth_mm)
                raise ValueError(
                    f"task {self.task.name!r} is not supported by patient {patient.name!r}: "
                    f"{error}; tasks it supports: {supported}"
                ) from error
        return tuple(planes)

    def _check_reachable(self) -> None:
        """Place the probe at every patient's goal pose; an IK residual above the arm's
        tolerance makes the task unsupported."""
        for index, plane in enumerate(self.planes):
            patient_in_world = self.scene.set_active_patient(index)
            result = self._place(plane.probe_in_patient, patient_in_world)
            if not result.reachable:
                raise UnsupportedTaskError(
                    f"task {self.task.name!r}: the arm cannot reach the goal pose on patient "
                    f"{self.pool[index].name!r} (IK residual {result.position_error_mm:.1f} mm, "
                    f"{result.orientation_error_deg:.1f} deg)"
                )

    def _place(self, probe_in_patient: np.ndarray, patient_in_world: np.ndarray):
        """Put the probe at a pose (patient mm) from the arm's home pose, regulating force."""
        rotation = patient_in_world[:3, :3] @ probe_in_patient[:3, :3]
        point = frames.patient_mm_to_world_m(probe_in_patient[:3, 3], patient_in_world)
        self.arm.reset_joints()
        return self.arm.place_on_skin(
            point, -rotation[:, 2], self.config.target_force_n, x_axis_world=rotation[:, 0]
        )

    # ----- gym API ----------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng, cfg = self.np_random, self.config
        index = self.pool.pick(rng, options)
        offset_m = rng.uniform(-1.0, 1.0, 2) * cfg.patient_offset_mm / frames.MM_PER_M
        yaw_deg = float(rng.uniform(-1.0, 1.0) * cfg.patient_yaw_deg)
        depths = sorted(self._simulators)
        depth_mm = depths[int(rng.integers(len(depths)))]

        self.patient_index = index
        self.plane = self.planes[index]
        self._patient_in_world = self.scene.set_active_patient(index, offset_m, yaw_deg)
        self._simulator = self._simulators[depth_mm]
        if cfg.gain_db_range is not None:
            # The simulator reads its gain at render time; geometry does not depend on it.
            gain_db = float(rng.uniform(*cfg.gain_db_range))
            self._simulator.settings = dataclasses.replace(
                self._simulator.settings, gain_db=gain_db
            )
        self._start_in_patient = self._sample_start(rng)

        self._steps = 0
        self._last_action = np.zeros(len(ACTION_NAMES))
        self._peak_force_n = self.arm.force_n()
        self._violations = 0
        self._episode_ready = True
        observation, info = self._observe(reachable=True, violation=False)
        self._last_score = info["scores"]["overall"]
        info["termination_reason"] = None
        return observation, info

    def step(self, action):
        if not self._episode_ready:
            raise RuntimeError("call reset() before step(), at the start and after an episode ends")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (len(ACTION_NAMES),):
            raise ValueError(
                f"action must have shape ({len(ACTION_NAMES)},) = {ACTION_NAMES}, "
                f"got {action.shape}"
            )
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite numbers in [-1, 1], got {action.tolist()}")
        action = np.clip(action, -1.0, 1.0)
        command = action * self._action_scale
        result = self.arm.move(*command)

        self._steps += 1
        self._last_action = action
        self._peak_force_n = max(self._peak_force_n, result.peak_force_n)
        violation = result.peak_force_n >= self.config.force_cap_n
        self._violations += int(violation)
        observation, info = self._observe(result.reachable, violation)

        score = info["scores"]["overall"]
        low, high = self.config.comfort_force_n
        force_n = info["force_n"]
        excess_n = max(0.0, force_n - high) + max(0.0, low - force_n)
        reward = score - self._last_score - self.config.force_penalty_per_n * excess_n
        reward += self.config.success_bonus * info["is_success"]
        self._last_score = score

        terminated = bool(info["is_success"] or violation)
        truncated = not terminated and self._steps >= self.config.max_steps
        reason = None
        if info["is_success"]:
            reason = "success"
        elif violation:
            reason = "force_cap"
        elif truncated:
            reason = "max_steps"
        info["termination_reason"] = reason
        self._episode_ready = not (terminated or truncated)
        return observation, float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._compose_frame()

    def close(self) -> None:
        scene = getattr(self, "scene", None)
        if scene is not None:
            scene.close()
            self.scene = None

    # ----- what the oracle and users read ------------------------------------------------

    @property
    def patient_name(self) -> str:
        return self.pool[self.patient_index].name

    @property
    def probe_in_patient(self) -> np.ndarray:
        """Current probe pose, 4 x 4, translation in patient mm."""
        return self.arm.probe_in_patient(self._patient_in_world)

    @property
    def goal_in_patient(self) -> np.ndarray:
        """Goal probe pose of this episode's standard plane, 4 x 4, translation in mm."""
        return self.plane.probe_in_patient.copy()

    def _compose_frame(self) -> np.ndarray:
        """Scene view, B-mode image with the target outlined, and figures, side by side."""
        import cv2

        side = _RENDER_SIZE_PX
        probe_in_world = self.arm.probe_in_world()
        probe_m = probe_in_world[:3, 3]
        # From above the feet and across from the arm, so that the arm hides neither probe
        # nor patient.
        across = -1.0 if self.task.acoustic_window.arm_side == "right" else 1.0
        eye_m = probe_m + np.array([-0.75, 0.35 * across, 0.75])
        scene = self.scene.camera_image(eye_m, probe_m, width=side * 4 // 3, height=side)

        image = self._frame.image[0].cpu().numpy()
        image = cv2.cvtColor(
            cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB
        )
        mask = self._frame.target_mask[0].cpu().numpy().astype(np.uint8)
        mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (60, 220, 90), 1)

        return np.concatenate([scene, image, self._figures(side)], axis=1)

    def _figures(self, side: int) -> np.ndarray:
        """Bars of the scores, force and plane errors with their thresholds."""
        import cv2

        panel = np.full((side, side, 3), 24, dtype=np.uint8)
        info = self._last_info
        low, high = self.config.comfort_force_n
        tolerance_mm, tolerance_deg = self._tolerance_mm, self._tolerance_deg
        rows = [(name, float(value), 1.0, None) for name, value in info["scores"].items()]
        rows += [
            ("force N", info["force_n"], self.config.force_cap_n, (low, high)),
            ("plane mm", info["plane_distance_mm"], 10.0 * tolerance_mm, (0.0, tolerance_mm)),
            ("angle deg", info["plane_angle_deg"], 10.0 * tolerance_deg, (0.0, tolerance_deg)),
        ]
        font = cv2.FONT_HERSHEY_SIMPLEX
        title = f"{self.task.name} | {info['patient']} | step {self._steps}"
        cv2.putText(panel, title, (4, 12), font, 0.33, (230, 230, 230), 1, cv2.LINE_AA)
        row_px = (side - 40) // max(len(rows), 1)
        bar_x0, bar_x1 = 84, side - 8
        for i, (name, value, full, band) in enumerate(rows):
            y = 24 + i * row_px
            cv2.putText(
                panel,
                f"{name} {value:.2f}",
                (4, y + 10),
                font,
                0.3,
                (210, 210, 210),
                1,
                cv2.LINE_AA,
            )
            cv2.rectangle(panel, (bar_x0, y + 2), (bar_x1, y + 12), (70, 70, 70), -1)
            if band is not None:
                b0 = bar_x0 + int((bar_x1 - bar_x0) * min(band[0] / full, 1.0))
                b1 = bar_x0 + int((bar_x1 - bar_x0) * min(band[1] / full, 1.0))
                cv2.rectangle(panel, (b0, y + 2), (b1, y + 12), (40, 110, 60), -1)
            x = bar_x0 + int((bar_x1 - bar_x0) * float(np.clip(value / full, 0.0, 1.0)))
            cv2.rectangle(panel, (bar_x0, y + 5), (max(x, bar_x0 + 1), y + 9), (90, 170, 240), -1)
        status = (
            "SUCCESS" if info["is_success"] else ("FORCE CAP" if info["safety_violation"] else "")
        )
        if status:
            cv2.putText(panel, status, (4, side - 6), font, 0.45, (80, 240, 120), 1, cv2.LINE_AA)
        return panel

    # ----- internals --------------------------------------------------------------------

    def _sample_start(self, rng: np.random.Generator) -> np.ndarray:
        """Put the probe on the skin near the goal; returns the start pose (patient mm)."""
        cfg, plane, patient = self.config, self.plane, self.pool[self.patient_index]
        goal = plane.probe_in_patient
        for _ in range(_START_ATTEMPTS):
            distance_mm = rng.uniform(*cfg.start_distance_mm)
            heading = rng.uniform(0.0, 2.0 * math.pi)
            angle_deg = rng.uniform(*cfg.start_angle_deg)
            axis = rng.normal(size=3)

            shift = distance_mm * (
                math.cos(heading) * goal[:3, 0] + math.sin(heading) * goal[:3, 1]
            )
            skin = skin_crossing_mm(patient, plane.centroid_mm + shift, -plane.beam)
            if skin is None:
                continue
            start = np.eye(4)
            start[:3, :3] = goal[:3, :3] @ frames.rotation_about_axis(axis, angle_deg)
            start[:3, 3] = skin
            inward = -skin_normal_mm(patient, skin, -plane.beam)
            if _angle_deg(start[:3, 2], inward) > _START_MAX_SKIN_ANGLE_DEG:
                continue
            result = self._place(start, self._patient_in_world)
            if not (result.reachable and result.force_converged and result.coupled_fraction > 0.5):
                continue
            start = self.probe_in_patient
            offset_mm = float(np.linalg.norm(start[:3, 3] - goal[:3, 3]))
            plane_mm, plane_deg, _ = us_quality.plane_errors(start, plane.centroid_mm, plane.normal)
            # The distance holds after the press; a start already inside twice the success
            # tolerances would leave nothing to do.
            in_range = cfg.start_distance_mm[0] <= offset_mm <= cfg.start_distance_mm[1]
            if in_range and (
                plane_mm > 2 * self._tolerance_mm or plane_deg > 2 * self._tolerance_deg
            ):
                return start
        raise RuntimeError(
            f"no start pose for task {self.task.name!r} on patient {self.patient_name!r} after "
            f"{_START_ATTEMPTS} attempts (the probe must reach the skin, hold "
            f"target_force_n={cfg.target_force_n} N below force_cap_n={cfg.force_cap_n} N and "
            "couple over half its aperture); try smaller start_distance_mm / start_angle_deg "
            "or a larger gap between target force and cap"
        )

    def _collisions(self) -> list[str]:
        """Touching body pairs other than the probe on the skin (which it indents by design),
        as ``"body:link/body:link"``."""
        return [
            f"{c.body_a}:{c.link_a}/{c.body_b}:{c.link_b}"
            for c in self.scene.collisions()
            if {(c.body_a, c.link_a), (c.body_b, c.link_b)} != _PROBE_ON_SKIN
        ]

    def _observe(self, reachable: bool, violation: bool) -> tuple[dict, dict]:
        probe_in_patient = self.probe_in_patient
        coupling = self.arm.coupling()
        frame = self._simulator.render(
            probe_in_patient[None],
            coupling[None],
            target_ids=self._target_ids[self.patient_index],
            volume_index=[self.patient_index],
        )
        self._frame = frame
        scores, parts = us_quality.ultrasound_quality(
            frame,
            probe_in_patient,
            self.plane.centroid_mm,
            self.plane.normal,
            coupling[None],
            lateral_axis=self.plane.array,
            max_target_area_mm2=self._plane_areas_mm2[self.patient_index],
        )
        scores = {name: float(value[0]) for name, value in scores.items()}
        parts = {name: float(value[0]) for name, value in parts.items()}
        force_n = self.arm.force_n()
        low, high = self.config.comfort_force_n
        success = (
            parts["distance_mm"] <= self._tolerance_mm
            and parts["plane_angle_deg"] <= self._tolerance_deg
            and parts["lateral_angle_deg"] < 90.0
            and scores["visibility"] >= self.task.min_visibility
            and low <= force_n <= high
            and not violation
        )

        state = np.zeros(len(STATE_NAMES), dtype=np.float32)
        relative = frames.invert_rigid(self._start_in_patient) @ probe_in_patient
        state[0] = force_n / self.config.force_cap_n
        state[1:4] = relative[:3, 3] / _POSITION_SCALE_MM
        state[4:7] = (
            np.degrees(Rotation.from_matrix(relative[:3, :3]).as_rotvec()) / _ROTATION_SCALE_DEG
        )
        state[7:] = self._last_action
        np.clip(state, _STATE_LOW, _STATE_HIGH, out=state)
        # The renderer's (B=1, H, W) is the observation's (C=1, H, W); copied, since a
        # renderer may reuse its output buffer.
        observation = {"image": frame.image.cpu().numpy().copy(), "state": state}
        info = {
            "is_success": bool(success),
            "scores": scores,
            "score_parts": parts,
            "plane_distance_mm": parts["distance_mm"],
            "plane_angle_deg": parts["plane_angle_deg"],
            "force_n": force_n,
            "peak_force_n": self._peak_force_n,
            "safety_violation": bool(violation),
            "safety_violations": self._violations,
            "reachable": bool(reachable),
            "patient": self.patient_name,
            "task": self.task.name,
            "collisions": self._collisions(),
            "gain_db": self._simulator.settings.gain_db,
            "depth_mm": self._simulator.depth_mm,
        }
        self._last_info = info
        return observation, info


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _check_choice(name: str, value: Any, allowed: list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _check_range(name: str, value: Any, minimum: float, maximum: float = math.inf):
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    if (
        pair is None
        or len(pair) != 2
        or not all(is_finite_number(v) for v in pair)
        or not minimum <= pair[0] <= pair[1] <= maximum
    ):
        raise ValueError(
            f"{name} must be (low, high) with {minimum} <= low <= high <= {maximum}, got {value!r}"
        )
    return pair
