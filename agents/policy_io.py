"""Policies saved as data: weights plus a JSON config, loaded without unpickling.

A sonoray policy file is a zip holding ``config.json`` (algorithm, policy keyword
arguments, the spaces it was trained on) and ``weights.npz`` (the policy's
state dict as plain arrays, read with ``allow_pickle=False``). Nothing in it can
run code when loaded.

stable-baselines3's own zips carry cloudpickled objects (spaces, schedules,
keyword arguments); unpickling them runs whatever code they name. They load only
with ``trusted=True``; otherwise :class:`UnsafeCheckpointError` is raised before
anything is unpickled.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

FORMAT = "sonoray-policy"
FORMAT_VERSION = 1
ALGORITHMS = ("ppo", "sac")
_ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "elu": torch.nn.ELU}


class UnsafeCheckpointError(ValueError):
    """A checkpoint would run pickled code on loading and was not marked trusted."""


def _describe_space(space: gym.Space) -> dict:
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {k: _describe_space(s) for k, s in space.spaces.items()}}
    if isinstance(space, gym.spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype)}
    raise ValueError(f"unsupported space {space!r}; allowed: Box and Dict of Box")


def _unique_tensors(state: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays of a state dict with each shared tensor stored once, and ``{alias: key}``
    for the rest (stable-baselines3 registers a shared feature extractor under three
    names)."""
    arrays, aliases, seen = {}, {}, {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        arrays[key] = tensor.detach().cpu().numpy()
    return arrays, aliases


def save_policy(model: Any, path: str | Path, *, env_id: str, task: str, extra: dict | None = None):
    """Save a stable-baselines3 model's policy as a sonoray policy file.

    Args:
        model: A trained ``PPO`` or ``SAC`` model.
        path: Output file (``.zip`` by convention).
        env_id: The environment id it was trained on.
        task: The task name it was trained on.
        extra: JSON-serialisable notes kept in the config (training steps, results).
    """
    algo = type(model).__name__.lower()
    if algo not in ALGORITHMS:
        raise ValueError(f"cannot save a {type(model).__name__}; allowed: {ALGORITHMS}")
    kwargs = dict(model.policy_kwargs or {})
    act = kwargs.pop("activation_fn", None)
    arrays, aliases = _unique_tensors(model.policy.state_dict())
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "algo": algo,
        "env_id": env_id,
        "task": task,
        "policy_kwargs": kwargs,
        "activation": None if act is None else act.__name__.lower(),
        "observation_space": _describe_space(model.observation_space),
        "action_space": _describe_space(model.action_space),
        "extra": extra or {},
        "aliases": aliases,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", json.dumps(config, indent=2, sort_keys=True))
        z.writestr("weights.npz", buf.getvalue())


#: Training env settings that change what the policy observes; evaluation applies them to
#: the policy's episodes (rendering voxel size, probe preset).
OBSERVATION_KWARGS = ("drr_max_voxel_mm", "preset")


def observation_kwargs(path: str | Path) -> dict:
    """The env settings a sonoray policy file was trained with that shape its observations
    (:data:`OBSERVATION_KWARGS`); empty for other files."""
    try:
        config = read_policy_config(path)
    except ValueError:
        return {}
    trained = config.get("extra", {}).get("env_kwargs", {})
    return {k: trained[k] for k in OBSERVATION_KWARGS if k in trained}


def read_policy_config(path: str | Path) -> dict:
    """The JSON config of a sonoray policy file (raises if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"policy file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise ValueError(f"{str(path)!r} is a damaged or truncated zip")
        raise UnsafeCheckpointError(
            f"{str(path)!r} is not a sonoray policy (a zip of config.json and weights.npz); "
            "other checkpoint formats may carry pickled code and are not loaded"
        )
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        if {"config.json", "weights.npz"} <= names:
            try:
                config = json.loads(z.read("config.json"))
            except (zipfile.BadZipFile, zlib.error, OSError, ValueError) as exc:
                raise ValueError(f"{str(path)!r}: config.json is damaged ({exc})") from None
            if not isinstance(config, dict) or config.get("format") != FORMAT:
                raise ValueError(f"{str(path)!r}: not a {FORMAT} config")
            return config
        if {"data", "policy.pth"} <= names:
            raise UnsafeCheckpointError(
                f"{str(path)!r} is a stable-baselines3 zip, which holds cloudpickled objects "
                "that run code when loaded; load it only if you trust its origin (--trusted)"
            )
    raise ValueError(
        f"{str(path)!r}: zip holds {sorted(names)}, expected config.json + weights.npz"
    )


def read_policy_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The weight arrays of a sonoray policy file, read without unpickling.

    Raises:
        ValueError: for a file that is not a sonoray policy or whose weights are damaged.
    """
    read_policy_config(path)
    try:
        with (
            zipfile.ZipFile(path) as z,
            np.load(io.BytesIO(z.read("weights.npz")), allow_pickle=False) as npz,
        ):
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise ValueError(
            f"{str(path)!r}: weights.npz is damaged or not plain arrays ({exc})"
        ) from None


def image_size(config: dict) -> int | None:
    """Side of the square image a policy config was trained on (None without an image)."""
    image = config.get("observation_space", {}).get("spaces", {}).get("image")
    return int(image["shape"][-1]) if image else None


def _build_policy(config: dict, env: gym.Env) -> Any:
    if config["algo"] not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {config['algo']!r}; allowed: {ALGORITHMS}")
    for which, space in (("observation", env.observation_space), ("action", env.action_space)):
        if _describe_space(space) != config[f"{which}_space"]:
            raise ValueError(
                f"policy was trained on {which} space {config[f'{which}_space']}, "
                f"but the env has {_describe_space(space)} (check image_size and the env id)"
            )
    kwargs = dict(config["policy_kwargs"])
    if config.get("activation"):
        kwargs["activation_fn"] = _ACTIVATIONS[config["activation"]]
    if config["algo"] == "ppo":
        from stable_baselines3.common.policies import MultiInputActorCriticPolicy as Policy
    else:
        from stable_baselines3.sac.policies import MultiInputPolicy as Policy
    return Policy(env.observation_space, env.action_space, lambda _: 0.0, **kwargs)


class PolicyAgent:
    """A saved policy acting deterministically."""

    def __init__(self, policy: Any, name: str) -> None:
        self.policy = policy
        self.name = name

    def reset(self, env: gym.Env, seed: int | None = None) -> None:
        pass

    def act(self, observation: Any, env: gym.Env) -> np.ndarray:
        action, _ = self.policy.predict(observation, deterministic=True)
        return action


def load_policy(path: str | Path, env: gym.Env, *, trusted: bool = False, device: str = "cpu"):
    """Load a policy as an agent for ``env``.

    Sonoray policy files load as data. stable-baselines3 zips load only with
    ``trusted=True``, because loading them unpickles code.

    Raises:
        UnsafeCheckpointError: for a file that would unpickle code, unless trusted.
        ValueError: for a missing or malformed file, or one trained on other spaces.
    """
    path = Path(path)
    try:
        config = read_policy_config(path)
    except UnsafeCheckpointError:
        if not trusted:
            raise
        return _load_trusted_sb3(path, device)
    policy = _build_policy(config, env)
    state = {k: torch.from_numpy(v) for k, v in read_policy_weights(path).items()}
    aliases = config.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(v in state for v in aliases.values()):
        raise ValueError(f"{str(path)!r}: aliases {aliases!r} name weights the file lacks")
    state.update({alias: state[key] for alias, key in aliases.items()})
    try:
        policy.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{str(path)!r}: weights do not fit the policy its config describes ({exc})"
        ) from None
    policy.set_training_mode(False)
    return PolicyAgent(policy.to(device), name=str(path))


def _load_trusted_sb3(path: Path, device: str) -> PolicyAgent:
    from stable_baselines3 import PPO, SAC

    errors = []
    for algo in (PPO, SAC):
        try:
            model = algo.load(path, device=device)
            return PolicyAgent(model.policy, name=str(path))
        except Exception as exc:  # noqa: BLE001  (report why neither algorithm loads it)
            errors.append(f"{algo.__name__}: {exc}")
    raise ValueError(f"{str(path)!r} did not load as PPO or SAC: {errors}")
