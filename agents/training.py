"""Training positioning policies with stable-baselines3 (PPO by default, SAC by flag).

Hyperparameters per env id live in ``hyperparams.yaml`` beside this module (or a
file the user names); the resolved configuration is saved beside the model.
Policies are saved as data (:mod:`sonoray.agents.policy_io`), so a run resumes
from its own checkpoint without unpickling anything; the optimiser state starts
afresh on resume, the step count and the weights continue.

Images stay uint8 in the observation and are scaled to [0, 1] by the policy's
feature extractor; nothing normalises them with running statistics.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import yaml

from sonoray.agents.policy_io import ALGORITHMS, read_policy_config, save_policy

logger = logging.getLogger(__name__)

DEFAULT_HYPERPARAMS = Path(__file__).with_name("hyperparams.yaml")
EVAL_SEED_OFFSET = 1_000_003  # evaluation episodes use seeds no training episode uses
_ALGO_KEYS = {
    "ppo": {
        "learning_rate",
        "n_steps",
        "batch_size",
        "n_epochs",
        "gamma",
        "gae_lambda",
        "clip_range",
        "ent_coef",
        "vf_coef",
        "max_grad_norm",
    },
    "sac": {
        "learning_rate",
        "buffer_size",
        "learning_starts",
        "batch_size",
        "tau",
        "gamma",
        "train_freq",
        "gradient_steps",
        "ent_coef",
    },
}
_TOP_KEYS = {
    "ppo",
    "sac",
    "policy_kwargs",
    "env_kwargs",
    "eval_env_kwargs",
    "presets",
    "n_envs",
    "eval_freq",
    "eval_episodes",
    "checkpoint_freq",
}


@dataclass(frozen=True)
class TrainConfig:
    """A resolved training run."""

    env_id: str
    task: str
    algo: str
    timesteps: int
    seed: int
    n_envs: int
    device: str
    out: str
    preset: str | None
    algo_kwargs: dict
    policy_kwargs: dict
    env_kwargs: dict
    eval_env_kwargs: dict
    eval_freq: int
    eval_episodes: int
    checkpoint_freq: int
    bc_episodes: int = 0


def load_hyperparams(path: str | Path, env_id: str, algo: str, preset: str | None) -> dict:
    """Hyperparameters of one env id and algorithm from a YAML file.

    Raises:
        ValueError: for an unreadable or malformed file, an unknown algorithm, env id,
            preset or key; the message names it and what is allowed.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; allowed: {list(ALGORITHMS)}")
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"hyperparameter file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"hyperparameter file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"hyperparameter file {str(path)!r} must map env ids to settings")
    if env_id not in data:
        raise ValueError(f"{str(path)!r} has no entry for {env_id!r}; it has {sorted(data)}")
    entry = data[env_id]
    if not isinstance(entry, dict):
        raise ValueError(f"{str(path)!r}: entry {env_id!r} must be a mapping, got {entry!r}")
    unknown = set(entry) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{env_id}: unknown keys {sorted(unknown)}; allowed {sorted(_TOP_KEYS)}")
    algo_kwargs = dict(entry.get(algo) or {})
    bad = set(algo_kwargs) - _ALGO_KEYS[algo]
    if bad:
        raise ValueError(
            f"{env_id}.{algo}: unknown keys {sorted(bad)}; allowed {sorted(_ALGO_KEYS[algo])}"
        )
    env_kwargs = dict(entry.get("env_kwargs") or {})
    presets = entry.get("presets") or {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r} for {env_id}; allowed: {sorted(presets)}")
        env_kwargs.update(presets[preset])
    return {
        "algo_kwargs": algo_kwargs,
        "policy_kwargs": dict(entry.get("policy_kwargs") or {}),
        "env_kwargs": env_kwargs,
        "eval_env_kwargs": {**env_kwargs, **(entry.get("eval_env_kwargs") or {})},
        "n_envs": int(entry.get("n_envs", 2)),
        "eval_freq": int(entry.get("eval_freq", 5000)),
        "eval_episodes": int(entry.get("eval_episodes", 10)),
        "checkpoint_freq": int(entry.get("checkpoint_freq", 10000)),
    }


def _make_env(env_id: str, task: str, env_kwargs: dict, seed: int, rank: int):
    def thunk():
        import torch
        from stable_baselines3.common.monitor import Monitor

        import sonoray.envs  # noqa: F401  (registers the ids)

        torch.set_num_threads(1)  # the sensor threads of several env processes contend
        env = gym.make(env_id, task=task, **env_kwargs)
        env = Monitor(env, info_keywords=("is_success",))
        env.reset(seed=seed + rank)
        env.action_space.seed(seed + rank)
        return env

    return thunk


def make_vec_env(env_id: str, task: str, n_envs: int, seed: int, env_kwargs: dict):
    """``n_envs`` copies of the env (subprocesses when more than one)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    fns = [_make_env(env_id, task, env_kwargs, seed, i) for i in range(n_envs)]
    return SubprocVecEnv(fns, start_method="spawn") if n_envs > 1 else DummyVecEnv(fns)


def _progress_callback(total: int):
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    class Progress(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = tqdm(
                total=total, initial=self.model.num_timesteps, unit="step", desc="train"
            )

        def _on_step(self) -> bool:
            self.bar.n = self.model.num_timesteps
            self.bar.refresh()
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return Progress()


def _checkpoint_callback(config: TrainConfig, out: Path):
    from stable_baselines3.common.callbacks import BaseCallback

    class SavePolicy(BaseCallback):
        def _on_step(self) -> bool:
            if self.n_calls % max(1, config.checkpoint_freq // config.n_envs) == 0:
                path = out / "checkpoints" / f"policy_{self.model.num_timesteps}.zip"
                save_policy(
                    self.model,
                    path,
                    env_id=config.env_id,
                    task=config.task,
                    extra={"num_timesteps": int(self.model.num_timesteps)},
                )
            return True

    return SavePolicy()


def behaviour_cloning(model: Any, config: TrainConfig, epochs: int = 20) -> dict:
    """Warm start: fit the policy's mean action to the scripted oracle's actions.

    Runs ``config.bc_episodes`` oracle episodes on training seeds and regresses the
    deterministic action on them (mean squared error). Returns the final loss.
    """
    import torch

    from sonoray.agents.registry import make_agent

    env = gym.make(config.env_id, task=config.task, **config.env_kwargs)
    oracle = make_agent("scripted", config.env_id, env.unwrapped)
    obs_list, act_list = [], []
    for ep in range(config.bc_episodes):
        obs, _ = env.reset(seed=config.seed + 10_000 + ep)
        oracle.reset(env.unwrapped, seed=config.seed + ep)
        done = False
        while not done:
            action = oracle.act(obs, env.unwrapped)
            obs_list.append(obs)
            act_list.append(np.clip(action, -1, 1))
            obs, _, term, trunc, _ = env.step(action)
            done = term or trunc
    env.close()
    policy = model.policy
    obs_t = {
        k: torch.as_tensor(np.stack([o[k] for o in obs_list]), device=policy.device)
        for k in obs_list[0]
    }
    act_t = torch.as_tensor(np.stack(act_list), dtype=torch.float32, device=policy.device)
    optim = torch.optim.Adam(policy.parameters(), lr=1e-3)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        perm = torch.randperm(len(act_t))
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            batch = {k: v[idx] for k, v in obs_t.items()}
            if config.algo == "sac":
                pred = policy.actor(batch, deterministic=True)
            else:
                pred = policy.get_distribution(batch).mode()
            loss = torch.nn.functional.mse_loss(torch.clamp(pred, -1, 1), act_t[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
    return {"bc_samples": len(act_t), "bc_loss": float(loss)}


def train(config: TrainConfig, resume: str | None = None) -> Path:
    """Train, checkpoint and evaluate; return the path of the final policy file."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import CallbackList, EvalCallback

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(config.env_id, config.task, config.n_envs, config.seed, config.env_kwargs)
    eval_env = make_vec_env(
        config.env_id, config.task, 1, config.seed + EVAL_SEED_OFFSET, config.env_kwargs
    )
    algo_cls = {"ppo": PPO, "sac": SAC}[config.algo]
    kwargs = copy.deepcopy(config.algo_kwargs)
    model = algo_cls(
        "MultiInputPolicy",
        env,
        seed=config.seed,
        device=config.device,
        tensorboard_log=str(out / "tb"),
        policy_kwargs=config.policy_kwargs,
        verbose=0,
        **kwargs,
    )
    notes: dict[str, Any] = {}
    if resume:
        notes["resumed_from"] = resume
        prior = read_policy_config(resume)
        if prior["algo"] != config.algo:
            raise ValueError(f"cannot resume a {prior['algo']} policy with --algo {config.algo}")
        from sonoray.agents.policy_io import load_policy

        loaded = load_policy(resume, env, device=config.device)
        model.policy.load_state_dict(loaded.policy.state_dict())
        model.num_timesteps = int(prior.get("extra", {}).get("num_timesteps", 0))
    elif config.bc_episodes > 0:
        notes.update(behaviour_cloning(model, config))

    resolved = {**config.__dict__, "notes": notes}
    (out / "config.yaml").write_text(
        yaml.safe_dump(json.loads(json.dumps(resolved)), sort_keys=False)
    )
    callbacks = [
        _progress_callback(config.timesteps),
        _checkpoint_callback(config, out),
        EvalCallback(
            eval_env,
            n_eval_episodes=config.eval_episodes,
            eval_freq=max(1, config.eval_freq // config.n_envs),
            log_path=str(out / "eval"),
            deterministic=True,
            verbose=0,
        ),
    ]
    model.learn(
        total_timesteps=config.timesteps,
        callback=CallbackList(callbacks),
        reset_num_timesteps=not resume,
        tb_log_name=config.algo,
    )
    final = out / "policy.zip"
    save_policy(
        model,
        final,
        env_id=config.env_id,
        task=config.task,
        extra={"num_timesteps": int(model.num_timesteps), **notes},
    )
    env.close()
    eval_env.close()
    return final
