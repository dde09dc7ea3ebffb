"""The agent interface shared by scripted, random and learned policies.

An agent sees what a policy sees (the observation) plus, for scripted oracles,
the unwrapped environment, whose task knowledge (the goal) they may read.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np


@runtime_checkable
class Agent(Protocol):
    """A policy that chooses one action per step."""

    name: str

    def reset(self, env: gym.Env, seed: int | None = None) -> None:
        """Prepare for a new episode of ``env`` (already reset)."""

    def act(self, observation: Any, env: gym.Env) -> np.ndarray:
        """Return the action for ``observation``."""
