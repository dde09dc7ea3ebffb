"""Uniformly random actions: the lower bound every other agent must beat."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class RandomAgent:
    """Samples actions uniformly from the action space with its own seeded generator."""

    name = "random"

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)

    def reset(self, env: gym.Env, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(np.random.SeedSequence([0 if seed is None else seed, 1]))

    def act(self, observation: Any, env: gym.Env) -> np.ndarray:
        space = env.action_space
        return self._rng.uniform(space.low, space.high).astype(space.dtype)
