"""Scripted oracle for X-ray positioning: plan the view's joints, then drive there.

The oracle knows what a policy must find out from images: the centring target, the
patient's pose on the table and the view's beam direction. Its plan:

1. Goal: the env's view joints
   (:meth:`~sonoray.envs.xray_env.XRayPositioningEnv.goal_joints`: isocentre on the
   target's centroid, orbital and angular giving the view's direction for the patient's
   yaw).
2. Field fit: a target nearly as large as the field and lopsided about its centroid
   (a real heart in an oblique view, the phantom's sacrum) may stick out of the field
   when centred on its centroid. The oracle projects the target's hull at the goal and,
   if it does not fit, shifts the isocentre across the beam (within the centring
   tolerance) and, if need be, backs the C-arm away along the beam to lower the
   magnification (:func:`fit_target_in_field`).
3. Drive: every joint moves towards its goal as far as the step limits allow. Before a
   step it asks the env whether the swept motion would collide
   (:meth:`~sonoray.envs.xray_env.XRayPositioningEnv.collisions_between`); if so it tries,
   in turn, the same step while lowering or raising the C-arm (a detour), the
   translations alone, the rotations alone, each joint alone, and lowering or raising
   alone.

It is the upper bound and regression canary of the env: success is judged from the
rendered geometry, not from the joints, so an error in the kinematics, the view
conventions or the success test shows as oracle failures.

Limitations: the fall-back moves are a fixed list, not a planner, so a start pose boxed
in by the table can still end in a collision; the field fit cannot help a target whose
projection is larger than the field or needs a shift beyond the centring tolerance.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

#: Largest field-fit shift of the isocentre, as a fraction of the centring tolerance.
SHIFT_FRACTION = 0.9

#: Margin kept between the target's projection and the field's edge (mm on the detector).
FIELD_MARGIN_MM = 2.0

#: Largest back-off of the C-arm along the beam to shrink the target's image, and its
#: increment per fit iteration (mm).
MAX_BACK_OFF_MM = 150.0
BACK_OFF_STEP_MM = 15.0

#: Fixed-point iterations of the field fit (magnification differs across the target).
FIT_ITERATIONS = 16

#: Joint distance to the goal below which a joint counts as there (mm or degrees).
_SETTLED = 1e-6

_LIFT = 2
_TRANSLATIONS = np.array([1, 1, 1, 0, 0], dtype=float)
_ROTATIONS = np.array([0, 0, 0, 1, 1], dtype=float)


def _candidates(direct: np.ndarray) -> list[np.ndarray]:
    """Steps to try, best first: the direct step; the same while lowering or raising the
    C-arm a full step (a detour that clears the tube from the table or the detector from
    the patient); the translations alone, the rotations alone; each joint alone; lowering
    or raising alone."""
    out = [direct]
    for detour in (-1.0, 1.0):
        moved = direct.copy()
        moved[_LIFT] = detour
        out.append(moved)
    out += [direct * _TRANSLATIONS, direct * _ROTATIONS]
    out += [direct * np.eye(len(direct))[j] for j in range(len(direct))]
    for detour in (-1.0, 1.0):
        out.append(detour * np.eye(len(direct))[_LIFT])
    return [a for a in out if np.any(a)]


class XRayOracle:
    """Moves the C-arm to the task's view, fitted to the field, avoiding collisions it sees."""

    name = "scripted"

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._goal = np.zeros(5)

    def reset(self, env: gym.Env, seed: int | None = None) -> None:
        """Forget the previous episode's plan (the next action plans anew)."""
        self._key = None

    def act(self, observation: Any, env: gym.Env) -> np.ndarray:
        """Action ``(5,)`` in [-1, 1] towards the planned goal joints."""
        xray_env = env.unwrapped
        goal = self._plan(xray_env)
        joints, step = xray_env.joints(), xray_env.step_limits
        direct = np.clip((goal - joints) / step, -1.0, 1.0)
        direct[np.abs(goal - joints) < _SETTLED] = 0.0
        for action in _candidates(direct):
            if not xray_env.collisions_between(joints, joints + action * step):
                return action.astype(np.float32)
        return direct.astype(np.float32)

    def _plan(self, xray_env) -> np.ndarray:
        """The goal joints, fitted to the field; planned once per patient placement."""
        goal = xray_env.goal_joints()
        key = (id(xray_env), tuple(goal))
        if key != self._key:
            self._key, self._goal = key, fit_target_in_field(xray_env, goal)
        return self._goal


def fit_target_in_field(xray_env, goal: np.ndarray) -> np.ndarray:
    """Move the goal so that the target's hull projects inside the field.

    Two moves, as a radiographer would: shift the isocentre across the beam (by at most
    ``SHIFT_FRACTION`` x the centring tolerance, which bounds the centring error), and, if
    that is not enough, back the C-arm away along the beam by up to ``MAX_BACK_OFF_MM``,
    lowering the magnification of the target (its image shrinks by ``z / (z + b)`` for a
    back-off ``b`` at a distance ``z`` from the source). Moving the C-arm by ``s`` across
    the beam moves the image of a point at distance ``z`` by ``-s x SID / z``. Both are
    found by fixed-point steps over the hull's projected extremes; a fitted pose outside
    the joint limits or in collision is given up for the plain goal.
    """
    g = xray_env.exposure_geometry_at(goal)
    hull = xray_env.target_hull_mm()  # (N, 3)
    beam = g.beam_direction
    axes = np.stack([g.col_dir, g.row_dir])  # (2, 3) detector u, v in patient axes
    half = np.array(g.detector_size_mm[::-1]) / 2 - FIELD_MARGIN_MM  # (u, v) half widths
    limit = SHIFT_FRACTION * xray_env.centring_tolerance_mm
    sid = g.source_to_detector_mm

    shift, back = np.zeros(2), 0.0  # across the beam along u, v; along the beam (mm)
    for _ in range(FIT_ITERATIONS):
        rel = hull - (g.source_mm + shift @ axes - back * beam)  # (N, 3) from the source
        depth = rel @ beam
        image = (rel @ axes.T) * (sid / depth)[:, None]  # (N, 2) detector mm
        low, high = image.min(0), image.max(0)
        over = np.maximum(high - half, 0.0) - np.maximum(-half - low, 0.0)
        if not np.any(over):
            break
        shift = shift + over / (sid / float(np.median(depth)))
        norm = np.linalg.norm(shift)
        if norm > limit:
            shift *= limit / norm
            back = min(back + BACK_OFF_STEP_MM, MAX_BACK_OFF_MM)
    if not np.any(shift) and back == 0.0:
        return goal

    move_patient = shift @ axes - back * beam  # mm, patient axes
    move_world = xray_env.scene.patient_in_world[:3, :3] @ move_patient
    fitted = goal.copy()
    fitted[:3] += xray_env.carm.base_in_world[:3, :3].T @ move_world
    low_limit, high_limit = xray_env.joint_limits
    if np.any(fitted < low_limit) or np.any(fitted > high_limit):
        return goal
    if xray_env.collisions_between(fitted, fitted):
        return goal
    return fitted
