"""X-ray C-arm positioning: move a mobile C-arm to a standard view with few exposures.

The agent drives the five joints of a mobile C-arm (:mod:`sonoray.envs.carm`) beside a
patient lying on the table (:mod:`sonoray.envs.scene`); every step moves the joints and
takes one exposure, a polychromatic DRR of the patient twin (:mod:`sonoray.sensors.drr`).
The goal is a standard view (:mod:`sonoray.envs.xray_tasks`): the central ray along the
view's beam direction and through the centring target, with the target inside the field.

Success tolerances follow published C-arm view planning (Pelphix counts a view reached
within 2 degrees and near the image centre; automatic positioning on cadavers reached
about 2.7 mm and 2.7 degrees, Killeen et al. 2023): by default 3 degrees and 10 mm.

Limitations: joints move instantly; collisions are checked at sub-steps of at most
``COLLISION_SUBSTEP_MM`` and ``COLLISION_SUBSTEP_DEG`` along each step's straight joint
path, so a contact between two sub-steps is missed only for parts thinner than that; a
collision stops the C-arm where it was first detected and the exposure is still taken
there; the collimator is open (the field is the whole detector). The C-arm has no
wig-wag (rotation about the vertical), so a lateral view cannot follow the patient's
yaw: the best reachable beam misses it by about yaw x sin(45 deg) (see
:func:`reachable_beam_joints`), which is why the default yaw is at most 3 degrees
(2.1 degrees off at worst, inside the 3 degree tolerance). Success needs the whole
centring target inside the field: a target that nearly fills the field and is lopsided
about its centroid (the phantom's sacrum, a real heart in the oblique view) fits only
with the isocentre shifted within the centring tolerance or the C-arm backed off along
the beam to lower the magnification (what the scripted oracle does).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from sonoray.envs.carm import JOINT_NAMES, CArm
from sonoray.envs.env_config import check_int, check_number, config_from_kwargs
from sonoray.envs.frames import MM_PER_M, patient_mm_to_world_m
from sonoray.envs.patient_pool import PatientPool
from sonoray.envs.scene import Scene, SceneConfig
from sonoray.envs.xray_tasks import XRAY_VIEWS, XRayView, get_view, supported_views
from sonoray.sensors import xray_quality
from sonoray.sensors.xray_geometry import XRayGeometry

logger = logging.getLogger(__name__)

#: Largest joint motion between two collision checks within a step (mm, degrees).
COLLISION_SUBSTEP_MM = 10.0
COLLISION_SUBSTEP_DEG = 3.0

#: Voxel centres per view structure at which field coverage is scored.
COVERAGE_POINTS_PER_STRUCTURE = 512

#: Attempts at drawing a start pose inside the joint limits and free of collisions.
MAX_START_DRAWS = 200

#: Clinical exposure ranges for randomisation (kV, mAs) (approx., adult radiography).
CLINICAL_KVP_RANGE = (60.0, 125.0)
CLINICAL_MAS_RANGE = (0.5, 50.0)

_TRANSLATION = slice(0, 3)
_ROTATION = slice(3, 5)


@dataclass(frozen=True)
class XRayEnvConfig:
    """Configuration of :class:`XRayPositioningEnv`; ``gym.make(id, **fields)`` overrides.

    Attributes:
        task: Standard view, one of ``xray_tasks.XRAY_VIEWS``.
        image_size: Observation image side (pixels); the 300 mm detector is binned to it.
        n_patients: Procedural phantoms in the pool (ignored with ``ct``).
        patient_seed: Phantom ``k`` of the pool is ``make_phantom(patient_seed + k)``.
        ct: A CT (NIfTI file, DICOM folder, or a folder with ``ct.nii.gz``, ``labels.nii.gz``
            and ``structures.csv``) to use instead of phantoms.
        labels: Label volume of ``ct`` (TotalSegmentator naming), if not in its folder.
        ct_spacing_mm: Resample ``ct`` to this isotropic voxel size; None keeps it.
        patient_offset_mm: Largest shift of the patient on the table along world x and y.
        patient_yaw_deg: Largest rotation of the patient about the vertical.
        perturb_angle_deg: (low, high) of the start's angular distance from the view, in
            joint space (orbital and angular).
        perturb_translation_mm: (low, high) of the start's distance from the view's
            isocentre, in joint space (longitudinal, lateral, lift).
        randomize_exposure: Draw kVp and mAs per episode (uniform kVp, log-uniform mAs)
            within ``kvp_range`` and ``mas_range``.
        kvp: Tube voltage (kV); None: the task's.
        mas: Tube current-time product (mAs); None: the task's.
        kvp_range: (low, high) kVp for ``randomize_exposure``.
        mas_range: (low, high) mAs for ``randomize_exposure``.
        max_exposures: Exposures per episode (the reset image is the first); truncation.
        step_translation_mm: Joint travel of an action of 1 on a translation joint.
        step_rotation_deg: Joint rotation of an action of 1 on a rotation joint.
        angle_tolerance_deg: Success: largest angle of the central ray to the view's beam
            direction; None: the task's (3 degrees).
        centring_tolerance_mm: Success: largest distance of the target's centroid from the
            central ray; None: the task's (10 mm).
        reward_score_weight: Weight of the change of the overall image-quality score.
        reward_dose_weight: Cost of one exposure at the task's nominal technique (scales
            with its dose-area product).
        reward_collision_penalty: Subtracted when the C-arm collides.
        reward_success_bonus: Added when the view is reached.
        device: Torch device of the X-ray sensor (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        drr_max_voxel_mm: Average patient voxels up to this size for the DRR (faster; e.g.
            4.0 for 64 x 64 training images, whose pixels cover about 2.4 mm at the
            isocentre); None renders the patients' own 2 mm grid.
        render_size_px: Height of the ``rgb_array`` frame.
    """

    task: str = "chest_ap"
    image_size: int = 128
    n_patients: int = 4
    patient_seed: int = 0
    ct: str | None = None
    labels: str | None = None
    ct_spacing_mm: float | None = 2.0
    patient_offset_mm: float = 30.0
    patient_yaw_deg: float = 3.0
    perturb_angle_deg: tuple[float, float] = (5.0, 45.0)
    perturb_translation_mm: tuple[float, float] = (20.0, 100.0)
    randomize_exposure: bool = False
    kvp: float | None = None
    mas: float | None = None
    kvp_range: tuple[float, float] = CLINICAL_KVP_RANGE
    mas_range: tuple[float, float] = CLINICAL_MAS_RANGE
    max_exposures: int = 30
    step_translation_mm: float = 25.0
    step_rotation_deg: float = 10.0
    angle_tolerance_deg: float | None = None
    centring_tolerance_mm: float | None = None
    reward_score_weight: float = 1.0
    reward_dose_weight: float = 0.01
    reward_collision_penalty: float = 1.0
    reward_success_bonus: float = 1.0
    device: str = "cpu"
    drr_max_voxel_mm: float | None = None
    render_size_px: int = 320

    def __post_init__(self) -> None:
        get_view(self.task)
        for name in ("ct", "labels"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, Path)):
                    raise ValueError(f"{name} must be a path or None, got {value!r}")
                object.__setattr__(self, name, str(value))
        if self.labels is not None and self.ct is None:
            raise ValueError(f"labels={self.labels!r} needs ct= (the CT it labels)")
        check_int("image_size", self.image_size, 16, 1024)
        check_int("n_patients", self.n_patients, 1, 1000)
        check_int("patient_seed", self.patient_seed, 0, 2**31 - 1)
        check_int("max_exposures", self.max_exposures, 2, 10_000)
        check_int("render_size_px", self.render_size_px, 64, 2048)
        check_number("ct_spacing_mm", self.ct_spacing_mm, 0.0, 20.0, optional=True)
        check_number("drr_max_voxel_mm", self.drr_max_voxel_mm, 0.0, 20.0, optional=True)
        check_number("patient_offset_mm", self.patient_offset_mm, 0.0, 150.0, low_open=False)
        check_number("patient_yaw_deg", self.patient_yaw_deg, 0.0, 30.0, low_open=False)
        self._range("perturb_angle_deg", 0.0, 90.0)
        self._range("perturb_translation_mm", 0.0, 400.0)
        from sonoray.sensors.xray_physics import KVP_RANGE

        self._range("kvp_range", *KVP_RANGE)
        self._range("mas_range", 1e-3, 1000.0)
        check_number("kvp", self.kvp, *KVP_RANGE, optional=True, low_open=False)
        check_number("mas", self.mas, 0.0, 1000.0, optional=True)
        check_number("step_translation_mm", self.step_translation_mm, 0.0, 200.0)
        check_number("step_rotation_deg", self.step_rotation_deg, 0.0, 90.0)
        check_number("angle_tolerance_deg", self.angle_tolerance_deg, 0.0, 90.0, optional=True)
        check_number("centring_tolerance_mm", self.centring_tolerance_mm, 0.0, 150.0, optional=True)
        for name in (
            "reward_score_weight",
            "reward_dose_weight",
            "reward_collision_penalty",
            "reward_success_bonus",
        ):
            check_number(name, getattr(self, name), 0.0, 1e6, low_open=False)
        if not isinstance(self.randomize_exposure, (bool, np.bool_)):
            raise ValueError(
                f"randomize_exposure must be True or False, got {self.randomize_exposure!r}"
            )
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"device must name a torch device ('cpu', 'cuda', 'cuda:0' ...), got "
                f"{self.device!r}"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available; use 'cpu'")

    def _range(self, name: str, low: float, high: float) -> None:
        value = getattr(self, name)
        try:
            pair = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
            raise ValueError(f"{name} must be (low, high) numbers, got {value!r}")
        if not (low <= pair[0] <= pair[1] <= high):
            raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
        object.__setattr__(self, name, pair)

    @classmethod
    def from_kwargs(cls, config: XRayEnvConfig | None = None, **overrides: Any) -> XRayEnvConfig:
        """``config`` (or the defaults) with fields replaced by ``overrides``.

        Raises:
            ValueError: naming unknown fields and listing the allowed ones, or a bad value.
        """
        return config_from_kwargs(cls, "XRayPositioning", config, **overrides)


def carm_beam_direction(orbital_deg: float, angular_deg: float) -> np.ndarray:
    """Central-ray direction in the C-arm's base frame: ``R_y(angular) R_x(orbital) z``.

    The kinematics of :mod:`sonoray.envs.carm` (angular carries orbital; both axes through
    the isocentre; the beam points up at zero angles).
    """
    o, a = math.radians(orbital_deg), math.radians(angular_deg)
    return np.array([math.sin(a) * math.cos(o), -math.sin(o), math.cos(a) * math.cos(o)])


def reachable_beam_joints(
    beam_in_base: np.ndarray,
    orbital_range_deg: tuple[float, float],
    angular_range_deg: tuple[float, float],
) -> tuple[float, float]:
    """Orbital and angular (degrees) whose central ray is closest to ``beam_in_base``.

    Exact where a solution lies within the ranges (orbital = asin(-b_y), angular =
    atan2(b_x, b_z), or its mirror orbital = 180 - asin(-b_y)). Otherwise the optimum lies
    on the range's border, where the best value of the free joint has a closed form too:
    with angular fixed the dot product is ``A cos(o) + B sin(o)``; with orbital fixed it is
    ``cos(o) (b_x sin(a) + b_z cos(a)) - b_y sin(o)``. A lateral beam cannot follow a
    patient's yaw: the angular axis is then parallel to the beam, so the best reachable
    direction misses a yaw of psi by about psi x sin(45 deg) at the +-45 degree limit.
    """
    b = np.asarray(beam_in_base, dtype=np.float64)
    b = b / np.linalg.norm(b)
    o_lo, o_hi = orbital_range_deg
    a_lo, a_hi = angular_range_deg

    def clip(v: float, lo: float, hi: float) -> float:
        return min(max(v, lo), hi)

    def best_orbital(a: float) -> float:
        ar = math.radians(a)
        along = b[0] * math.sin(ar) + b[2] * math.cos(ar)
        return clip(math.degrees(math.atan2(-b[1], along)), o_lo, o_hi)

    def best_angular(o: float) -> float:
        sign = 1.0 if math.cos(math.radians(o)) >= 0 else -1.0
        return clip(math.degrees(math.atan2(sign * b[0], sign * b[2])), a_lo, a_hi)

    o1 = math.degrees(math.asin(clip(-b[1], -1.0, 1.0)))
    candidates = []
    for o in (o1, 180.0 - o1):
        o = clip(o, o_lo, o_hi)
        candidates.append((o, best_angular(o)))
    for a in (a_lo, a_hi):
        candidates.append((best_orbital(a), a))
    for o in (o_lo, o_hi):
        candidates.append((o, best_angular(o)))
    return max(candidates, key=lambda oa: float(carm_beam_direction(*oa) @ b))


class XRayPositioningEnv(gym.Env):
    """Drive a mobile C-arm to a standard X-ray view of a patient on the table.

    Description:
        A patient twin lies on the table; the C-arm starts near the task's standard view
        and every step moves its five joints (longitudinal, lateral, lift in mm; orbital =
        LAO/RAO and angular = cranial/caudal in degrees) by the action times the step
        limits, then takes one exposure. The reset image is the first exposure.

    Observation:
        ``image``: uint8 ``(1, H, W)`` radiograph (bone bright, display convention of
        DESIGN section 2); ``state``: float32 ``(11,)``: the joints normalised to [-1, 1]
        over their limits, the last action, and exposures taken / ``max_exposures``.

    Action:
        ``Box(-1, 1, (5,))`` in joint order; scaled by ``step_translation_mm`` and
        ``step_rotation_deg``. Values outside [-1, 1] are clipped and reported in
        ``info["action_clipped"]``; NaN or infinite values raise ``ValueError``. Joint
        targets past a limit stop at the limit and are reported in ``info["limit_hits"]``.

    Randomisation (all from ``self.np_random``):
        the patient, drawn from the pool; its offset on the table (uniform within
        +-``patient_offset_mm`` along world x and y) and yaw (+-``patient_yaw_deg``); the
        start pose: the view's goal joints plus a rotation of ``perturb_angle_deg`` (joint
        space, uniform magnitude and direction) and a translation of
        ``perturb_translation_mm`` (uniform magnitude, uniform direction), redrawn until
        inside the joint limits and free of collisions; optionally kVp and mAs; the
        quantum noise of every exposure.

    Success (``info["is_success"]``):
        the central ray within ``angle_tolerance_deg`` of the view's beam direction, the
        target's centroid within ``centring_tolerance_mm`` of the central ray, and the
        whole target (its convex hull) projected inside the collimated field.

    Reward:
        ``reward_score_weight`` x (change of the overall image-quality score)
        - ``reward_dose_weight`` x DAP / (DAP of one exposure at the task's technique)
        - ``reward_collision_penalty`` (on collision) + ``reward_success_bonus`` (on success).

    Episode end:
        terminated on success or collision (``info["termination_reason"]`` is
        ``"success"`` or ``"collision"``); truncated after ``max_exposures`` exposures
        (``"max_exposures"``).

    Args:
        render_mode: ``"rgb_array"`` or None.
        config: A full :class:`XRayEnvConfig`; keyword arguments override its fields.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        render_mode: str | None = None,
        config: XRayEnvConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, "
                f"got {render_mode!r}"
            )
        self.render_mode = render_mode
        self.config = cfg = XRayEnvConfig.from_kwargs(config, **overrides)
        self.view: XRayView = get_view(cfg.task)
        self.device = torch.device(cfg.device)

        if cfg.ct is not None:
            self.pool = PatientPool.from_ct(cfg.ct, cfg.labels, cfg.ct_spacing_mm)
        else:
            self.pool = PatientPool(cfg.n_patients, cfg.patient_seed)
        self._check_task_supported()

        self.scene = Scene(self.pool.patients, SceneConfig(carm=True))
        self.carm: CArm = self.scene.carm
        self.carm.reset()
        self._isocentre_home_world = self.carm.isocentre_world().copy()
        self._joint_low = np.array([self.carm.limits.range_of(n)[0] for n in JOINT_NAMES])
        self._joint_high = np.array([self.carm.limits.range_of(n)[1] for n in JOINT_NAMES])
        self._step_scale = np.array([cfg.step_translation_mm] * 3 + [cfg.step_rotation_deg] * 2)

        self._angle_tolerance_deg = (
            self.view.angle_tolerance_deg
            if cfg.angle_tolerance_deg is None
            else cfg.angle_tolerance_deg
        )
        self._centring_tolerance_mm = (
            self.view.centring_tolerance_mm
            if cfg.centring_tolerance_mm is None
            else cfg.centring_tolerance_mm
        )
        self._view_direction_in_patient = self.view.beam_direction_in_patient()
        self._view_direction = torch.as_tensor(
            self._view_direction_in_patient, dtype=torch.float32, device=self.device
        )
        self._targets = [_TargetShape.of(p, self.view, self.device) for p in self.pool.patients]
        self._make_sensor()

        size = cfg.image_size
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (1, size, size), np.uint8),
                "state": spaces.Box(-1.0, 1.0, (2 * len(JOINT_NAMES) + 1,), np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (len(JOINT_NAMES),), np.float32)

        self._goal = np.zeros(len(JOINT_NAMES))
        self._last_action = np.zeros(len(JOINT_NAMES), dtype=np.float32)
        self._exposures = 0
        self._dose_total = 0.0
        self._score = 0.0
        self._kvp, self._mas = self._nominal_exposure()
        self._image = np.zeros((size, size), dtype=np.uint8)
        self._info: dict[str, Any] = {}
        self._needs_reset = True

    # ----- construction helpers -------------------------------------------------------------

    def _check_task_supported(self) -> None:
        missing = {p.name: self.view.missing_structures(p) for p in self.pool.patients}
        missing = {name: m for name, m in missing.items() if m}
        if missing:
            raise ValueError(
                f"task {self.view.name!r} needs structures the patient(s) lack: {missing}; "
                f"tasks this pool supports: {supported_views(self.pool.patients)} "
                f"(all tasks: {sorted(XRAY_VIEWS)})"
            )

    def _nominal_exposure(self) -> tuple[float, float]:
        cfg = self.config
        return (
            self.view.kvp if cfg.kvp is None else float(cfg.kvp),
            self.view.mas if cfg.mas is None else float(cfg.mas),
        )

    # ----- public task knowledge (for scripted agents and analysis) -------------------------

    @property
    def patient(self):
        """The active patient twin."""
        return self.scene.active_patient

    @property
    def step_limits(self) -> np.ndarray:
        """Joint change of an action of 1, ``(5,)``, mm and degrees."""
        return self._step_scale.copy()

    def joints(self) -> np.ndarray:
        """Current joint values ``(5,)``, mm and degrees, in ``carm.JOINT_NAMES`` order."""
        return self.carm.joints_array()

    @property
    def joint_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) joint values ``(5,)`` each, mm and degrees."""
        return self._joint_low.copy(), self._joint_high.copy()

    @property
    def angle_tolerance_deg(self) -> float:
        """Success: largest angle of the central ray to the view's beam direction."""
        return self._angle_tolerance_deg

    @property
    def centring_tolerance_mm(self) -> float:
        """Success: largest distance of the target's centroid from the central ray."""
        return self._centring_tolerance_mm

    def target_hull_mm(self) -> np.ndarray:
        """``(N, 3)`` corners of the centring target's convex hull (patient mm): the target
        lies inside the field iff they all project inside it."""
        return self._targets[self.scene.active_index].hull_mm.double().cpu().numpy()

    def exposure_geometry_at(self, joints: np.ndarray):
        """Geometry (``carm.ExposureGeometry``, patient mm) of an exposure at ``joints``.

        A what-if query: the C-arm is put back where it was; no exposure is taken.
        """
        here = self.carm.joints_array()
        try:
            self.carm.reset(joints)
            return self.carm.xray_geometry_in_patient(
                self.scene.patient_in_world, pixels=self.config.image_size
            )
        finally:
            self.carm.reset(here)

    def collisions_between(self, start: np.ndarray, end: np.ndarray) -> list[str]:
        """Contacts a move from ``start`` to ``end`` would meet, swept as a step sweeps it.

        A what-if query: the C-arm is put back where it was. Joints outside the limits are
        clipped to them, as a command would be.
        """
        here = self.carm.joints_array()
        low, high = self._joint_low, self._joint_high
        try:
            return self._sweep(np.clip(start, low, high), np.clip(end, low, high))
        finally:
            self.carm.reset(here)

    def target_centroid_mm(self) -> np.ndarray:
        """Centroid of the task's centring target in the active patient (RAS mm)."""
        return self._targets[self.scene.active_index].centroid_mm.copy()

    def goal_joints(self) -> np.ndarray:
        """Joints ``(5,)`` of the task's view for the patient as it lies now (mm, degrees).

        The isocentre sits on the target's centroid; orbital and angular give the view's
        beam direction turned with the patient's yaw, or, where the joint limits or the
        kinematics do not reach it, the reachable direction closest to it (see
        :func:`reachable_beam_joints`).
        """
        patient_in_world = self.scene.patient_in_world
        target_world = patient_mm_to_world_m(self.target_centroid_mm(), patient_in_world)
        base_rotation = self.carm.base_in_world[:3, :3]
        beam = base_rotation.T @ patient_in_world[:3, :3] @ self._view_direction_in_patient
        orbital, angular = reachable_beam_joints(
            beam, self.carm.limits.orbital_deg, self.carm.limits.angular_deg
        )
        travel_mm = base_rotation.T @ (target_world - self._isocentre_home_world) * MM_PER_M
        return np.array([*travel_mm, orbital, angular])

    def view_errors(self) -> dict[str, Any]:
        """Angle to the view, centring distance and target-in-field of the current pose."""
        return self._view_errors(self._geometry())

    # ----- gymnasium API --------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode: draw the patient, its placement, the start pose and exposure.

        Args:
            seed: Seeds ``self.np_random`` (same seed, same episode).
            options: ``{"patient_index": i}`` picks pool patient ``i`` instead of drawing.
        """
        super().reset(seed=seed)
        self._needs_reset = True  # until this reset completes
        cfg, rng = self.config, self.np_random
        index = self.pool.pick(rng, options)
        offset_m = rng.uniform(-1.0, 1.0, 2) * cfg.patient_offset_mm / MM_PER_M
        yaw_deg = float(rng.uniform(-1.0, 1.0) * cfg.patient_yaw_deg)
        self.scene.set_active_patient(index, offset_m, yaw_deg)

        self._goal = self.goal_joints()
        outside = [
            n
            for n, g, lo, hi in zip(
                JOINT_NAMES, self._goal, self._joint_low, self._joint_high, strict=True
            )
            if not lo <= g <= hi
        ]
        if outside:
            raise RuntimeError(
                f"the {self.view.name!r} view of {self.patient.name!r} needs joints "
                f"{_by_joint(np.round(self._goal, 1))} outside the "
                f"limits of {outside}"
            )
        self.carm.reset(self._start_joints(rng))

        self._kvp, self._mas = self._nominal_exposure()
        if cfg.randomize_exposure:
            self._kvp = float(rng.uniform(*cfg.kvp_range))
            self._mas = float(np.exp(rng.uniform(*np.log(cfg.mas_range))))
        self._last_action = np.zeros(len(JOINT_NAMES), dtype=np.float32)
        self._exposures = 0
        self._dose_total = 0.0
        self._needs_reset = False

        exposure = self._expose()
        self._score = exposure["scores"]["overall"]
        info = self._make_info(exposure, limit_hits=[], collisions=[], reason=None)
        info["action_clipped"] = False
        self._info = info
        return self._observation(), info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and after an episode ends)")
        raw = np.asarray(action, dtype=np.float64)
        if raw.shape != self.action_space.shape:
            raise ValueError(
                f"action must have shape {self.action_space.shape} (joints {list(JOINT_NAMES)}), "
                f"got {raw.shape}"
            )
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"action must be finite, got {raw.tolist()}")
        clipped = np.clip(raw, -1.0, 1.0)
        self._last_action = clipped.astype(np.float32)

        report, collisions = self._move(clipped * self._step_scale)
        exposure = self._expose()
        cfg = self.config
        score = exposure["scores"]["overall"]
        success = exposure["is_success"] and not collisions
        reward = (
            cfg.reward_score_weight * (score - self._score)
            - cfg.reward_dose_weight * exposure["dose_dap"] / self._nominal_dap
            - cfg.reward_collision_penalty * bool(collisions)
            + cfg.reward_success_bonus * success
        )
        self._score = score

        terminated = bool(success or collisions)
        truncated = not terminated and self._exposures >= cfg.max_exposures
        reason = (
            "collision"
            if collisions
            else "success"
            if success
            else "max_exposures"
            if truncated
            else None
        )
        info = self._make_info(exposure, list(report.limited), collisions, reason)
        info["is_success"] = bool(success)
        info["action_clipped"] = bool(np.any(clipped != raw))
        info["command"] = report.as_info()
        self._info = info
        self._needs_reset = terminated or truncated
        return self._observation(), float(reward), terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """``rgb_array``: scene camera, X-ray image and key figures side by side, uint8."""
        if self.render_mode is None:
            return None
        return self._frame()

    def close(self) -> None:
        """Disconnect the physics and let go of the X-ray volumes (shared ones stay while
        another env holds them)."""
        scene = getattr(self, "scene", None)
        if scene is not None:
            scene.close()
            self.scene = None
        self.sensor = None

    # ----- motion ---------------------------------------------------------------------------

    def _start_joints(self, rng: np.random.Generator) -> np.ndarray:
        """Goal joints plus a random perturbation inside the limits and free of collisions."""
        cfg = self.config
        for _ in range(MAX_START_DRAWS):
            angle_deg = rng.uniform(*cfg.perturb_angle_deg)
            heading = rng.uniform(0.0, 2.0 * math.pi)
            distance_mm = rng.uniform(*cfg.perturb_translation_mm)
            direction = rng.normal(size=3)
            direction /= max(np.linalg.norm(direction), 1e-12)
            start = self._goal.copy()
            start[_TRANSLATION] += distance_mm * direction
            start[_ROTATION] += angle_deg * np.array([math.cos(heading), math.sin(heading)])
            if np.any(start < self._joint_low) or np.any(start > self._joint_high):
                continue
            self.carm.reset(start)
            if not self._carm_collisions():
                return start
        raise RuntimeError(
            f"no collision-free start pose inside the joint limits in {MAX_START_DRAWS} draws "
            f"for task {self.view.name!r} on {self.patient.name!r}; narrow "
            f"perturb_angle_deg={cfg.perturb_angle_deg} or "
            f"perturb_translation_mm={cfg.perturb_translation_mm}"
        )

    def _move(self, delta: np.ndarray):
        """Command a relative joint change; sweep it in sub-steps checking collisions.

        Returns:
            The C-arm's command report (requested, applied, limited joints) and the
            collisions found (empty if none), the C-arm stopped at the first colliding
            sub-step.
        """
        start = self.carm.joints_array()
        report = self.carm.command(delta, relative=True)
        return report, self._sweep(start, self.carm.joints_array())

    def _sweep(self, start: np.ndarray, end: np.ndarray) -> list[str]:
        """Move from ``start`` to ``end`` (within limits) in sub-steps, stopping at the first
        collision; return its contacts (empty if the path is free)."""
        change = np.abs(end - start)
        substeps = max(
            1,
            math.ceil(change[_TRANSLATION].max() / COLLISION_SUBSTEP_MM),
            math.ceil(change[_ROTATION].max() / COLLISION_SUBSTEP_DEG),
        )
        for k in range(1, substeps + 1):
            self.carm.reset(end if k == substeps else start + (end - start) * (k / substeps))
            collisions = self._carm_collisions()
            if collisions:
                return collisions
        return []

    def _carm_collisions(self) -> list[str]:
        """``"carm/<link> - <body>/<link>"`` for every contact of the C-arm."""
        found = []
        for c in self.scene.collisions():
            if "carm" not in (c.body_a, c.body_b):
                continue
            found.append(f"{c.body_a}/{c.link_a} - {c.body_b}/{c.link_b}")
        return found

    # ----- observation and info -------------------------------------------------------------

    def _observation(self) -> dict[str, np.ndarray]:
        joints = self.carm.joints_array()
        normalised = 2.0 * (joints - self._joint_low) / (self._joint_high - self._joint_low) - 1.0
        state = np.concatenate(
            [
                np.clip(normalised, -1.0, 1.0),
                self._last_action,
                [self._exposures / self.config.max_exposures],
            ]
        ).astype(np.float32)
        return {"image": self._image[None].copy(), "state": state}

    def _make_info(
        self,
        exposure: dict[str, Any],
        limit_hits: list[str],
        collisions: list[str],
        reason: str | None,
    ) -> dict[str, Any]:
        return {
            "is_success": bool(exposure["is_success"]),
            "scores": exposure["scores"],
            "view_angle_error_deg": exposure["view_angle_error_deg"],
            "centring_error_mm": exposure["centring_error_mm"],
            "target_in_field": exposure["target_in_field"],
            "dose_dap": exposure["dose_dap"],
            "cumulative_dose_dap": self._dose_total,
            "exposures": self._exposures,
            "kvp": self._kvp,
            "mas": self._mas,
            "collisions": collisions,
            "safety_violation": bool(collisions),
            "termination_reason": reason,
            "limit_hits": limit_hits,
            "joints": _by_joint(self.carm.joints_array()),
            "goal_joints": _by_joint(self._goal),
            "patient": self.patient.name,
            "task": self.view.name,
        }

    # ----- exposure -------------------------------------------------------------------------

    def _make_sensor(self) -> None:
        """The X-ray sensor over every pool patient (volumes on the device, built once).

        Envs of one process with the same pool and device share one sensor (its volumes
        are read-only), so vectorised copies cost no extra memory.
        """
        from sonoray.sensors import dose

        self.sensor = _shared_sensor(self.pool.patients, self.device, self.config.drr_max_voxel_mm)
        self.carm.reset()
        kvp, mas = self._nominal_exposure()
        self._nominal_dap = float(dose.exposure_dap_mgy_cm2(self._geometry(), kvp, mas)[0])

    def _geometry(self) -> XRayGeometry:
        """The current exposure's cone-beam geometry in the active patient's frame."""
        g = self.carm.xray_geometry_in_patient(
            self.scene.patient_in_world, pixels=self.config.image_size
        )
        return XRayGeometry.from_carm(**g.sensor_kwargs(), device=self.device)

    def _view_errors(self, geometry: XRayGeometry) -> dict[str, Any]:
        """Angle to the view's beam, centring distance and whether the target is in field."""
        target = self._targets[self.scene.active_index]
        angle = xray_quality.view_angle_error_deg(geometry, self._view_direction)
        centring = xray_quality.centring_error_mm(geometry, target.centroid)
        # A convex target projects inside the (convex) field iff its hull's corners do.
        in_field = xray_quality.coverage_fraction(geometry, target.hull_mm)
        return {
            "view_angle_error_deg": float(angle[0]),
            "centring_error_mm": float(centring[0]),
            "target_in_field": bool(in_field[0] == 1.0),
        }

    def _expose(self) -> dict[str, Any]:
        """Take one exposure at the current pose: image, dose, view errors and scores."""
        geometry = self._geometry()
        seed = int(self.np_random.integers(2**31))
        index = self.scene.active_index
        shot = self.sensor.render(
            geometry, kvp=self._kvp, mas=self._mas, noise_seeds=[seed], volume_index=[index]
        )
        self._image = shot.image[0, 0].cpu().numpy()
        self._exposures += 1
        dap = float(shot.dap_mgy_cm2[0])
        self._dose_total += dap

        errors = self._view_errors(geometry)
        success = (
            errors["view_angle_error_deg"] <= self._angle_tolerance_deg
            and errors["centring_error_mm"] <= self._centring_tolerance_mm
            and errors["target_in_field"]
        )
        footprint = self.sensor.project_labels(geometry, [self.view.target], volume_index=[index])
        target = self._targets[index]
        quality = xray_quality.xray_image_quality(
            geometry,
            shot,
            footprint,
            xray_quality.XRayViewTarget(target.centroid, self._view_direction, target.points_mm),
        )
        scores = {name: float(value[0]) for name, value in quality.as_dict().items()}
        return {**errors, "is_success": bool(success), "dose_dap": dap, "scores": scores}

    # ----- rendering ------------------------------------------------------------------------

    def _frame(self) -> np.ndarray:
        """Scene camera | X-ray image | figures, uint8 ``(H, W, 3)``."""
        import cv2

        h = self.config.render_size_px
        look_at = self.carm.isocentre_world()
        eye = look_at + np.array(_CAMERA_OFFSET_M)
        scene = self.scene.camera_image(eye, look_at, width=h * 4 // 3, height=h, fov_deg=55.0)
        xray = cv2.resize(self._image, (h, h), interpolation=cv2.INTER_NEAREST)
        xray = np.repeat(xray[:, :, None], 3, axis=2)

        panel = np.full((h, h, 3), 24, dtype=np.uint8)
        info = self._info
        scores = info.get("scores", {})
        lines = [
            f"task {self.view.name}",
            f"patient {self.patient.name}",
            f"exposure {self._exposures}/{self.config.max_exposures}",
            f"angle err {info.get('view_angle_error_deg', float('nan')):.1f} deg",
            f"centring {info.get('centring_error_mm', float('nan')):.1f} mm",
            f"target in field {info.get('target_in_field', False)}",
            f"score {scores.get('overall', float('nan')):.3f}",
            f"DAP {info.get('cumulative_dose_dap', 0.0):.0f} mGy cm2",
            f"{self._kvp:.0f} kVp {self._mas:.1f} mAs",
            f"success {info.get('is_success', False)}",
        ]
        if info.get("termination_reason"):
            lines.append(f"end: {info['termination_reason']}")
        scale = h / 640.0
        for i, line in enumerate(lines):
            y = int((i + 1.3) * h / (len(lines) + 1.5))
            cv2.putText(
                panel,
                line,
                (int(10 * scale) + 4, y),
                cv2.FONT_HERSHEY_SIMPLEX,
                max(0.35, 1.1 * scale),
                (235, 235, 235),
                1,
                cv2.LINE_AA,
            )
        return np.ascontiguousarray(np.concatenate([scene, xray, panel], axis=1))


_SENSORS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _shared_sensor(patients, device: torch.device, max_voxel_mm: float | None):
    """One ``XRaySensor`` per (patients, device, voxel size) in this process while an env
    holds it."""
    from sonoray.sensors.drr import XRaySensor

    key = (tuple(id(p) for p in patients), str(device), max_voxel_mm)
    sensor = _SENSORS.get(key)
    if sensor is None:
        sensor = XRaySensor.from_patients(list(patients), device=device, max_voxel_mm=max_voxel_mm)
        _SENSORS[key] = sensor
    return sensor


def _by_joint(values: np.ndarray) -> dict[str, float]:
    return dict(zip(JOINT_NAMES, np.asarray(values, dtype=float).tolist(), strict=True))


#: Scene camera position relative to the isocentre (world m): the patient's right, foot end.
_CAMERA_OFFSET_M = (-0.95, 1.25, 0.75)


@dataclass(frozen=True)
class _TargetShape:
    """What the success test and the scores need of one patient's view structures.

    Attributes:
        centroid_mm: Centring target's centroid, float64 ``(3,)``.
        centroid: The same as a float32 tensor on the sensor's device.
        hull_mm: ``(N, 3)`` corners of the target's voxels on its convex hull (device).
        points_mm: ``(S * n, 3)`` voxel centres, ``n`` per structure of the view (target
            and what it shows), so coverage weighs every structure alike (device).
    """

    centroid_mm: np.ndarray
    centroid: torch.Tensor
    hull_mm: torch.Tensor
    points_mm: torch.Tensor

    @classmethod
    def of(cls, patient, view: XRayView, device: torch.device) -> _TargetShape:
        from scipy.spatial import ConvexHull

        voxels = np.argwhere(patient.mask(view.target)).astype(np.float64)  # (V, 3)
        centroid = patient.voxel_to_patient(voxels.mean(0))
        if len(voxels) >= 4 and np.linalg.matrix_rank(voxels - voxels.mean(0)) == 3:
            voxels = voxels[ConvexHull(voxels).vertices]
        # Every voxel fills its cell: the hull of the hull voxels' corners.
        corners = np.array(np.meshgrid(*[[-0.5, 0.5]] * 3, indexing="ij")).reshape(3, -1).T
        hull = patient.voxel_to_patient((voxels[:, None, :] + corners[None]).reshape(-1, 3))

        points = []
        for name in view.structures:
            inside = np.argwhere(patient.mask(name))
            pick = np.linspace(0, len(inside) - 1, COVERAGE_POINTS_PER_STRUCTURE).round()
            points.append(patient.voxel_to_patient(inside[pick.astype(int)]))

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32, device=device)

        return cls(centroid, tensor(centroid), tensor(hull), tensor(np.concatenate(points)))
