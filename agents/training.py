"""Training positioning policies with stable-baselines3 (PPO by default, SAC by flag).

Hyperparameters per env id live in ``hyperparams.yaml`` beside this module (or a
file the user names); the resolved configuration is saved beside the model.
Policies are saved as data (:mod:`sonoray.agents.policy_io`), so a run resumes
from its own checkpoint without unpickling anything; the optimiser state starts
afresh on resume, the step count and the weights continue.

Images stay uint8 in the observation and are scaled to [0, 1] by the policy's
feature extractor; nothing normalises them with running statistics.

An optional warm start imitates the scripted oracle with DAgger
(:func:`imitation_warm_start`) before reinforcement learning; its rollout steps are not
counted in the run's step count. Limitation: the imitation data is kept in memory
(64 x 64 images: about 4 kB per visited state) and not added to SAC's replay buffer.
"""

from __future__ import annotations

import copy
import json
import logging
import time
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
        "target_kl",
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
    bc_rounds: int = 1
    bc_noise: float = 0.2
    bc_epochs: int = 5
    bc_learning_rate: float = 1e-3


def _read_entry(path: str | Path, env_id: str) -> dict:
    """The checked entry of one env id in a hyperparameter file."""
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
    presets = entry.get("presets") or {}
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise ValueError(f"{env_id}.presets must map names to env settings, got {presets!r}")
    return entry


def load_presets(path: str | Path, env_id: str) -> dict[str, dict]:
    """The named env presets (``gym.make`` keyword sets) of one env id.

    Raises:
        ValueError: for an unreadable or malformed file or a missing env id.
    """
    return dict(_read_entry(path, env_id).get("presets") or {})


def load_hyperparams(path: str | Path, env_id: str, algo: str, preset: str | None) -> dict:
    """Hyperparameters of one env id and algorithm from a YAML file.

    Raises:
        ValueError: for an unreadable or malformed file, an unknown algorithm, env id,
            preset or key; the message names it and what is allowed.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; allowed: {list(ALGORITHMS)}")
    entry = _read_entry(path, env_id)
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
            # on resume stable-baselines3 adds the steps already taken to the total
            self.bar = tqdm(
                total=getattr(self.model, "_total_timesteps", total),
                initial=self.model.num_timesteps,
                unit="step",
                desc="train",
            )

        def _on_step(self) -> bool:
            if self.model.num_timesteps > self.bar.total:  # PPO finishes its last rollout
                self.bar.total = self.model.num_timesteps
            self.bar.update(self.model.num_timesteps - self.bar.n)
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return Progress()


def _save(model: Any, path: Path, config: TrainConfig, extra: dict | None = None) -> None:
    """Save the policy with what evaluation needs to render the same observations."""
    save_policy(
        model,
        path,
        env_id=config.env_id,
        task=config.task,
        extra={
            "num_timesteps": int(model.num_timesteps),
            "env_kwargs": config.env_kwargs,
            "preset": config.preset,
            **(extra or {}),
        },
    )


def _checkpoint_callback(config: TrainConfig, out: Path):
    from stable_baselines3.common.callbacks import BaseCallback

    class SavePolicy(BaseCallback):
        def _on_step(self) -> bool:
            if self.n_calls % max(1, config.checkpoint_freq // config.n_envs) == 0:
                path = out / "checkpoints" / f"policy_{self.model.num_timesteps}.zip"
                _save(self.model, path, config)
            return True

    return SavePolicy()


def _evaluation_callback(config: TrainConfig, eval_env: Any, out: Path, started: float):
    """Evaluate on held-out seeds and patients at the start, every ``eval_freq`` steps and
    at the end; log ``eval/success_rate`` and ``eval/mean_reward``; append each result to
    ``eval/evaluations.jsonl``; keep the best policy (success rate, then return) as
    ``best_policy.zip``."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    class HeldOutEvaluation(BaseCallback):
        def _on_training_start(self) -> None:
            self.best: tuple[float, float] | None = None
            self.last = -1
            self._evaluate()

        def _on_step(self) -> bool:
            if self.n_calls % max(1, config.eval_freq // config.n_envs) == 0:
                self._evaluate()
            return True

        def _on_training_end(self) -> None:
            self._evaluate()

        def _evaluate(self) -> None:
            if self.model.num_timesteps == self.last:
                return
            self.last = self.model.num_timesteps
            successes: list[bool] = []

            def on_step(local: dict, _globals: dict) -> None:
                if local["done"]:
                    successes.append(bool(local["info"].get("is_success", False)))

            eval_env.seed(config.seed + EVAL_SEED_OFFSET + self.model.num_timesteps)
            rewards, lengths = evaluate_policy(
                self.model,
                eval_env,
                n_eval_episodes=config.eval_episodes,
                deterministic=True,
                return_episode_rewards=True,
                callback=on_step,
            )
            result = {
                "timesteps": int(self.model.num_timesteps),
                "success_rate": float(np.mean(successes)) if successes else 0.0,
                "mean_reward": float(np.mean(rewards)),
                "mean_length": float(np.mean(lengths)),
                "episodes": len(rewards),
                "wall_s": round(time.perf_counter() - started, 1),
            }
            self.logger.record("eval/success_rate", result["success_rate"])
            self.logger.record("eval/mean_reward", result["mean_reward"])
            self.logger.record("eval/mean_length", result["mean_length"])
            self.logger.dump(self.model.num_timesteps)
            path = out / "eval" / "evaluations.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            key = (result["success_rate"], result["mean_reward"])
            if self.best is None or key > self.best:
                self.best = key
                _save(self.model, out / "best_policy.zip", config, {"held_out_eval": result})

    return HeldOutEvaluation()


def _returns_to_go(rewards: list[float], gamma: float) -> list[float]:
    out, running = [], 0.0
    for r in reversed(rewards):
        running = r + gamma * running
        out.append(running)
    return out[::-1]


def imitation_warm_start(model: Any, config: TrainConfig, log: Any = None) -> dict:
    """Warm start: imitate the scripted oracle with DAgger (Ross et al., AISTATS 2011).

    Round 0 rolls out the oracle with Gaussian action noise (``config.bc_noise``, as in
    DART, Laskey et al. 2017), so that the data covers states off its path; each later
    round rolls out the current policy (deterministic, plus the same noise). Every visited
    state is labelled with the action the oracle would take there, the data of all rounds
    is pooled, and the policy's deterministic action is regressed on it (mean squared
    error, ``config.bc_epochs`` passes per round). For PPO the value head is fitted to the
    discounted returns of the rollouts at the same time, so that reinforcement learning
    starts with a critic that matches the actor. The oracle uses privileged state (the
    goal pose); the policy sees only the observation.

    Episodes use training seeds and the training patients. Returns the per-round success
    rates of the rolled-out behaviour, sample counts and the final losses.
    """
    import torch

    from sonoray.agents.registry import make_agent

    rounds = max(1, config.bc_rounds)
    per_round = max(1, -(-config.bc_episodes // rounds))
    gamma = float(config.algo_kwargs.get("gamma", 0.99))
    rng = np.random.default_rng(config.seed)
    env = gym.make(config.env_id, task=config.task, **config.env_kwargs)
    oracle = make_agent("scripted", config.env_id, env.unwrapped)
    policy = model.policy
    observations: dict[str, list] = {}
    labels: list[np.ndarray] = []
    returns: list[float] = []
    history: list[dict] = []
    losses = {"bc_action_loss": float("nan"), "bc_value_loss": float("nan")}
    for r in range(rounds):
        successes = steps = 0
        for ep in range(per_round):
            obs, _ = env.reset(seed=config.seed + 10_000 + r * per_round + ep)
            oracle.reset(env.unwrapped, seed=config.seed + r * per_round + ep)
            rewards, done, info = [], False, {}
            while not done:
                label = np.clip(np.asarray(oracle.act(obs, env.unwrapped), np.float32), -1, 1)
                if r == 0:
                    action = label
                else:
                    with torch.no_grad():
                        action, _ = policy.predict(obs, deterministic=True)
                noise = rng.normal(0.0, config.bc_noise, size=label.shape)
                action = np.clip(action + noise, -1.0, 1.0).astype(np.float32)
                for key, value in obs.items():
                    observations.setdefault(key, []).append(value)
                labels.append(label)
                obs, reward, term, trunc, info = env.step(action)
                rewards.append(float(reward))
                done = term or trunc
            returns.extend(_returns_to_go(rewards, gamma))
            successes += bool(info.get("is_success", False))
            steps += len(rewards)
        round_info = {
            "round": r,
            "behaviour": "oracle + noise" if r == 0 else "policy + noise",
            "episodes": per_round,
            "success_rate": successes / per_round,
            "mean_steps": steps / per_round,
            "samples": len(labels),
        }
        losses = _fit_imitation(model, config, observations, labels, returns)
        round_info.update(losses)
        history.append(round_info)
        logger.info("imitation round %s", round_info)
        if log is not None:
            log(round_info)
    env.close()
    return {"imitation_rounds": history, "imitation_samples": len(labels), **losses}


def _fit_imitation(
    model: Any, config: TrainConfig, observations: dict, labels: list, returns: list
) -> dict:
    """``config.bc_epochs`` passes of action (and, for PPO, value) regression."""
    import torch

    policy = model.policy
    policy.set_training_mode(True)
    obs_np = {k: np.stack(v) for k, v in observations.items()}
    act_t = torch.as_tensor(np.stack(labels), dtype=torch.float32, device=policy.device)
    ret_t = torch.as_tensor(np.asarray(returns), dtype=torch.float32, device=policy.device)
    optim = torch.optim.Adam(policy.parameters(), lr=config.bc_learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    action_loss = value_loss = torch.tensor(float("nan"))
    for _ in range(config.bc_epochs):
        perm = torch.randperm(len(act_t), generator=generator)
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            batch = {
                k: torch.as_tensor(v[idx.numpy()], device=policy.device) for k, v in obs_np.items()
            }
            if config.algo == "sac":
                pred = policy.actor(batch, deterministic=True)
                loss = action_loss = torch.nn.functional.mse_loss(pred, act_t[idx])
            else:
                pred = policy.get_distribution(batch).mode()
                action_loss = torch.nn.functional.mse_loss(torch.clamp(pred, -1, 1), act_t[idx])
                value_loss = torch.nn.functional.mse_loss(
                    policy.predict_values(batch).squeeze(-1), ret_t[idx]
                )
                loss = action_loss + 0.5 * value_loss
            optim.zero_grad()
            loss.backward()
            optim.step()
    policy.set_training_mode(False)
    return {"bc_action_loss": action_loss.item(), "bc_value_loss": value_loss.item()}


def _print_round(info: dict) -> None:
    print(
        f"imitation round {info['round']}: {info['behaviour']}, success "
        f"{100 * info['success_rate']:.0f}% over {info['episodes']} episodes, "
        f"{info['samples']} samples, action loss {info['bc_action_loss']:.4f}",
        flush=True,
    )


def check_run(config: TrainConfig, resume: str | None = None) -> dict | None:
    """Refuse, before anything is built or written, an output folder that holds files
    (a second run would mix its logs and evaluations into them) and a ``resume`` policy
    that is damaged or was trained on another env id, algorithm or image size. Returns
    the resumed policy's config (None without ``resume``)."""
    from sonoray.agents.policy_io import image_size, read_policy_weights

    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(
            f"--out {config.out!r} exists and is not empty: choose another folder (a run "
            "continues from a policy file with --resume into a new one)"
        )
    if resume is None:
        return None
    prior = read_policy_config(resume)
    read_policy_weights(resume)
    if prior["env_id"] != config.env_id:
        raise ValueError(
            f"--resume {resume!r} was trained on {prior['env_id']}, not {config.env_id}"
        )
    if prior["algo"] != config.algo:
        raise ValueError(
            f"--resume {resume!r} is a {prior['algo']} policy, not --algo {config.algo}"
        )
    trained, size = image_size(prior), config.env_kwargs.get("image_size")
    if trained is not None and size is not None and trained != size:
        raise ValueError(
            f"--resume {resume!r} was trained on {trained} x {trained} images, the "
            f"hyperparameters give {size} x {size}"
        )
    if prior["task"] != config.task:
        logger.warning("continuing a %s policy on task %s", prior["task"], config.task)
    return prior


def train(config: TrainConfig, resume: str | None = None) -> Path:
    """Train, checkpoint and evaluate; return the path of the final policy file.

    The run folder gets ``config.yaml`` (the resolved configuration), ``tb/``
    (TensorBoard), ``checkpoints/``, ``eval/evaluations.jsonl`` (held-out evaluations),
    ``best_policy.zip`` (the best held-out evaluation) and ``policy.zip`` (the last).
    Each evaluation records the wall time since the start of the run (``wall_s``).
    """
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.callbacks import CallbackList

    started = time.perf_counter()
    prior = check_run(config, resume)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_vec_env(config.env_id, config.task, config.n_envs, config.seed, config.env_kwargs)
    eval_env = make_vec_env(
        config.env_id, config.task, 1, config.seed + EVAL_SEED_OFFSET, config.eval_env_kwargs
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
    if prior is not None:
        notes["resumed_from"] = resume
        from sonoray.agents.policy_io import load_policy

        loaded = load_policy(resume, env, device=str(model.device))
        model.policy.load_state_dict(loaded.policy.state_dict())
        model.num_timesteps = int(prior.get("extra", {}).get("num_timesteps", 0))
    if config.bc_episodes > 0:
        notes.update(imitation_warm_start(model, config, log=_print_round))

    resolved = {**config.__dict__, "notes": notes}
    (out / "config.yaml").write_text(
        yaml.safe_dump(json.loads(json.dumps(resolved)), sort_keys=False)
    )
    callbacks = [
        _progress_callback(config.timesteps),
        _checkpoint_callback(config, out),
        _evaluation_callback(config, eval_env, out, started),
    ]
    model.learn(
        total_timesteps=config.timesteps,
        callback=CallbackList(callbacks),
        reset_num_timesteps=not resume,
        tb_log_name=config.algo,
    )
    final = out / "policy.zip"
    _save(model, final, config, {"notes": notes})
    env.close()
    eval_env.close()
    return final
