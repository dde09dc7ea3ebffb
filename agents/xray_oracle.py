"""Scripted oracle for X-ray positioning: drive the C-arm straight to the view's joints.

The oracle knows what a policy must find out from images: the centring target's
centroid in the patient, the patient's pose on the table and the view's beam
direction. From them the env computes the goal joints
(:meth:`~sonoray.envs.xray_env.XRayPositioningEnv.goal_joints`: isocentre on the
target, orbital and angular giving the view's direction for the patient's yaw); the
oracle moves every joint towards its goal value as far as the step limits allow, so
it arrives in ``ceil(max_j |goal_j - q_j| / step_j)`` steps. It is the upper bound
and regression canary of the env: success itself is judged from the rendered
geometry, not from the joints, so an error in the kinematics, the view conventions
or the success test shows as oracle failures.

Limitations: the path is a straight line in joint space; the oracle does not plan
around obstacles and fails (by collision) where that line passes through the table
or the patient.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class XRayOracle:
    """Moves the C-arm to the task's goal joints within the per-step limits."""

    name = "scripted"

    def reset(self, env: gym.Env, seed: int | None = None) -> None:
        """Nothing to prepare: the goal is read from the env at every step."""

    def act(self, observation: Any, env: gym.Env) -> np.ndarray:
        """Action ``(5,)`` in [-1, 1] towards the goal joints (clipped per joint)."""
        xray_env = env.unwrapped
        remaining = xray_env.goal_joints() - xray_env.joints()
        action = np.clip(remaining / xray_env.step_limits, -1.0, 1.0)
        return action.astype(np.float32)
