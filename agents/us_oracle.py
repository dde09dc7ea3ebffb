"""Scripted ultrasound oracle: drives the probe straight to the task's goal pose.

It reads the goal probe pose that the environment computed from the organ's labels
(:mod:`sonoray.envs.us_tasks`), so it is an upper bound and a regression canary, not a
policy that sees only the image. Each step it commands the pose error expressed in the
current probe frame (slide x and y, rotation about the beam, tilts about x and y, the
rotation error as a rotation vector), clipped to the env's per-step limits; the force
controller takes care of the axis along the beam.

Limitations: no path planning: it neither avoids rib shadows on the way nor keeps the
coupling while it tilts, and it trusts the goal pose to be reachable.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from scipy.spatial.transform import Rotation


class UltrasoundOracle:
    """Proportional controller on the goal probe pose of ``UltrasoundNavigation``.

    Args:
        gain: Fraction of the remaining pose error commanded per step (before clipping
            to the step limits); below 1 damps overshoot on curved skin.
    """

    name = "scripted"

    def __init__(self, gain: float = 1.0) -> None:
        if not (np.isfinite(gain) and 0.0 < gain <= 1.0):
            raise ValueError(f"gain must lie in (0, 1], got {gain!r}")
        self.gain = float(gain)

    def reset(self, env: gym.Env, seed: int | None = None) -> None:
        """Nothing to prepare: the oracle is stateless."""

    def act(self, observation: Any, env: gym.Env) -> np.ndarray:
        """Action that moves the probe towards the goal pose by at most one step."""
        env = env.unwrapped
        current, goal = env.probe_in_patient, env.goal_in_patient
        rotation = current[:3, :3]
        offset_mm = rotation.T @ (goal[:3, 3] - current[:3, 3])
        turn_deg = np.degrees(Rotation.from_matrix(rotation.T @ goal[:3, :3]).as_rotvec())
        cfg = env.config
        command = np.array(
            [
                offset_mm[0] / cfg.slide_mm,
                offset_mm[1] / cfg.slide_mm,
                turn_deg[2] / cfg.rotate_deg,
                turn_deg[0] / cfg.tilt_deg,
                turn_deg[1] / cfg.tilt_deg,
            ]
        )
        return np.clip(self.gain * command, -1.0, 1.0).astype(np.float32)
