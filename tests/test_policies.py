"""The shipped policies: data-only files that load for their env and act."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import sonoray.agents
import sonoray.envs
from sonoray.agents.policy_io import load_policy, observation_kwargs, read_policy_config

POLICIES = sorted((Path(sonoray.agents.__file__).parent / "policies").glob("*.zip"))


def test_a_policy_is_shipped_for_every_env():
    assert {read_policy_config(p)["env_id"] for p in POLICIES} == set(sonoray.envs.ENV_IDS)


@pytest.mark.parametrize("path", POLICIES, ids=[p.stem for p in POLICIES])
def test_shipped_policy_is_small_data_that_loads_and_acts(path):
    assert path.stat().st_size < 3_000_000
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == {"config.json", "weights.npz"}
    config = read_policy_config(path)
    trained = config["extra"]["env_kwargs"]
    env = gym.make(
        config["env_id"],
        task=config["task"],
        image_size=trained["image_size"],
        n_patients=1,
        patient_seed=2000,
        **observation_kwargs(path),
    )
    try:
        agent = load_policy(path, env.unwrapped)
        obs, _ = env.reset(seed=0)
        action = agent.act(obs, env.unwrapped)
        assert action.shape == env.action_space.shape
        assert np.all(np.isfinite(action))
        assert np.array_equal(action, agent.act(obs, env.unwrapped))  # deterministic
    finally:
        env.close()
