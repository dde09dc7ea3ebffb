"""Agents by name: ``scripted`` (the env's oracle), ``random``, or a saved policy path."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym

from sonoray.agents.random_agent import RandomAgent

_ORACLES = {
    "sonoray/XRayPositioning-v0": "sonoray.agents.xray_oracle:XRayOracle",
    "sonoray/UltrasoundNavigation-v0": "sonoray.agents.us_oracle:UltrasoundOracle",
}


def make_agent(name: str, env_id: str, env: gym.Env, *, trusted: bool = False):
    """Create the agent called ``name`` for ``env_id``.

    Args:
        name: ``"scripted"``, ``"random"`` or the path of a saved policy.
        env_id: The environment id (picks the oracle).
        env: The unwrapped environment (a policy is checked against its spaces).
        trusted: Allow policy files whose loading unpickles code.
    """
    if name == "random":
        return RandomAgent()
    if name == "scripted":
        if env_id not in _ORACLES:
            raise ValueError(f"no scripted agent for {env_id!r}; envs with one: {list(_ORACLES)}")
        module, cls = _ORACLES[env_id].split(":")
        import importlib

        return getattr(importlib.import_module(module), cls)()
    if not Path(name).is_file():
        raise ValueError(
            f"agent {name!r} is neither 'scripted', 'random' nor an existing policy file"
        )
    from sonoray.agents.policy_io import load_policy

    return load_policy(name, env, trusted=trusted)
