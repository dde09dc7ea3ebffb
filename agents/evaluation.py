"""Batch, headless evaluation of agents on sonoray environments.

Every episode is a job named by (env id, task, agent, episode index). Its seed
derives from (base seed, env id, task, episode index) through ``SeedSequence``,
so it is the same in any process, on any machine, in any shard, whatever the
number of workers; the seed also picks the patient. Records are appended to
``episodes.jsonl`` as episodes end, so a killed run loses at most the episodes
in flight, and ``resume`` skips those already written.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

EPISODES_FILE = "episodes.jsonl"
SUMMARY_FILE = "summary.json"
IMAGES_DIR = "images"
VIDEOS_DIR = "videos"
BUILTIN_AGENTS = ("scripted", "random")


_TASK_TABLES = {
    "sonoray/XRayPositioning-v0": "sonoray.envs.xray_tasks:XRAY_VIEWS",
    "sonoray/UltrasoundNavigation-v0": "sonoray.envs.us_tasks:US_TASKS",
}


def task_names(env_id: str) -> tuple[str, ...]:
    """Names of the tasks an env id offers."""
    import importlib

    if env_id not in _TASK_TABLES:
        raise ValueError(f"unknown env id {env_id!r}; allowed: {list(_TASK_TABLES)}")
    module, table = _TASK_TABLES[env_id].split(":")
    return tuple(getattr(importlib.import_module(module), table))


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def episode_seed(base_seed: int, env_id: str, task: str, index: int) -> int:
    """Seed of one episode, the same in every process (never Python's ``hash()``)."""
    seq = np.random.SeedSequence([base_seed, _stable_int(env_id), _stable_int(task), index])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


@dataclass(frozen=True)
class EpisodeJob:
    """One episode to run."""

    env_id: str
    task: str
    agent: str
    index: int
    seed: int
    record_video: bool = False

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.env_id, self.task, self.agent, self.index


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how.

    Attributes:
        env_ids: Environment ids to run.
        tasks: Per env id, the task names to run.
        agents: ``"scripted"``, ``"random"`` or paths of saved policies.
        episodes: Episodes per (env id, task, agent).
        seed: Base seed of the episode seeds.
        env_kwargs: Extra keyword arguments for every ``gymnasium.make``.
        env_overrides: Per env id, keyword arguments on top of ``env_kwargs`` (a named
            preset such as ``easy``).
        agent_targets: Per agent, the env id (and task, or None for any) it runs on; a
            policy trained on one env cannot act in another. Agents not named run on all.
        n_envs: Worker processes (1 = run in this process); changes speed only.
        shard: (i, N): run the episodes whose index is i modulo N.
        video: Record this many episodes per (env id, task, agent) as MP4.
        trusted: Allow policies whose loading unpickles code.
    """

    env_ids: tuple[str, ...]
    tasks: dict[str, tuple[str, ...]]
    agents: tuple[str, ...]
    episodes: int = 4
    seed: int = 0
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    env_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent_targets: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    n_envs: int = 1
    shard: tuple[int, int] = (0, 1)
    video: int = 0
    trusted: bool = False


def plan_jobs(config: EvalConfig) -> list[EpisodeJob]:
    """All jobs of this shard, in a fixed order."""
    i, n = config.shard
    jobs = []
    for env_id in config.env_ids:
        for task in config.tasks[env_id]:
            for agent in config.agents:
                target_env, target_task = config.agent_targets.get(agent, (env_id, None))
                if target_env != env_id or target_task not in (None, task):
                    continue
                for index in range(config.episodes):
                    if index % n != i:
                        continue
                    seed = episode_seed(config.seed, env_id, task, index)
                    jobs.append(EpisodeJob(env_id, task, agent, index, seed, index < config.video))
    return jobs


def read_records(path: Path) -> list[dict]:
    """Records of an ``episodes.jsonl``; a torn last line (a killed run) is dropped."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                logger.warning("dropping a torn last line of %s", path)
                continue
            raise ValueError(f"{path}: line {n + 1} is not JSON") from None
    return records


def record_key(record: dict) -> tuple[str, str, str, int]:
    return record["env_id"], record["task"], record["agent"], int(record["episode"])


# ----- running ----------------------------------------------------------------------------------

_ENV_CACHE: dict[tuple, Any] = {}
_AGENT_CACHE: dict[tuple, Any] = {}


@atexit.register
def close_cached_envs() -> None:
    """Close the envs this process built (their PyBullet clients) before shutdown."""
    for env in _ENV_CACHE.values():
        env.close()
    _ENV_CACHE.clear()
    _AGENT_CACHE.clear()


def _get_env(env_id: str, task: str, env_kwargs: dict, render: bool):
    import gymnasium as gym

    import sonoray.envs  # noqa: F401  (registers the ids)

    key = (env_id, task, json.dumps(env_kwargs, sort_keys=True, default=str), render)
    if key not in _ENV_CACHE:
        close_cached_envs()  # jobs come grouped by env and task: hold one env at a time
        kwargs = dict(env_kwargs, task=task)
        if render:
            kwargs["render_mode"] = "rgb_array"
        _ENV_CACHE[key] = gym.make(env_id, **kwargs)
    return _ENV_CACHE[key]


def _get_agent(name: str, env_id: str, env, trusted: bool):
    key = (name, env_id)
    if key not in _AGENT_CACHE:
        from sonoray.agents.registry import make_agent

        _AGENT_CACHE[key] = make_agent(name, env_id, env, trusted=trusted)
    return _AGENT_CACHE[key]


def _info_number(info: dict, *keys: str) -> float | None:
    for k in keys:
        value = info.get(k)
        if isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value):
            return float(value)
    return None


def _score(info: dict) -> float | None:
    scores = info.get("scores")
    if isinstance(scores, dict) and "overall" in scores:
        return float(scores["overall"])
    return _info_number(info, "score", "score_overall")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else None
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def run_episode(job: EpisodeJob, env_kwargs: dict, out_dir: str, trusted: bool = False) -> dict:
    """Run one episode and return its record (writes its final image, and video if asked)."""
    import torch

    started = time.perf_counter()
    if job.agent not in BUILTIN_AGENTS:  # render what the policy was trained to see
        from sonoray.agents.policy_io import observation_kwargs

        env_kwargs = {**env_kwargs, **observation_kwargs(job.agent)}
    env = _get_env(job.env_id, job.task, env_kwargs, job.record_video)
    agent = _get_agent(job.agent, job.env_id, env.unwrapped, trusted)
    obs, info = env.reset(seed=job.seed)
    agent.reset(env.unwrapped, seed=job.seed)
    frames = [env.render()] if job.record_video else []
    scores = [_score(info)]
    total, steps, peak_force = 0.0, 0, _info_number(info, "force_n")
    terminated = truncated = False
    with torch.inference_mode():
        while not (terminated or truncated):
            action = agent.act(obs, env.unwrapped)
            obs, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            steps += 1
            scores.append(_score(info))
            force = _info_number(info, "force_n")
            if force is not None:
                peak_force = force if peak_force is None else max(peak_force, force)
            if job.record_video:
                frames.append(env.render())

    name = f"{_slug(job.env_id)}__{job.task}__{_slug(job.agent)}__{job.index:05d}"
    image_path = Path(out_dir) / IMAGES_DIR / f"{name}.png"
    _save_observation_png(obs, image_path)
    video_path = None
    if frames:
        video_path = Path(out_dir) / VIDEOS_DIR / f"{name}.mp4"
        _save_mp4(frames, video_path)

    final_scores = info.get("scores") if isinstance(info.get("scores"), dict) else {}
    peak_force = _info_number(info, "peak_force_n") or peak_force
    return {
        "env_id": job.env_id,
        "task": job.task,
        "agent": job.agent,
        "episode": job.index,
        "seed": job.seed,
        "patient": str(info.get("patient", getattr(env.unwrapped, "patient_name", ""))),
        "success": bool(info.get("is_success", False)),
        "return": total,
        "steps": steps,
        "final_score": scores[-1],
        "score_trace": scores,
        "final_scores": _jsonable(final_scores),
        "dose_dap_mgy_cm2": _info_number(info, "dose_total_mgy_cm2", "cumulative_dose_dap"),
        "peak_force_n": peak_force,
        "safety_violation": bool(info.get("safety_violation", False)),
        "termination_reason": str(info.get("termination_reason") or ""),
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        "image": str(image_path.relative_to(out_dir)),
        "video": str(video_path.relative_to(out_dir)) if video_path else None,
        "wall_s": time.perf_counter() - started,
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _save_observation_png(obs: Any, path: Path) -> None:
    import cv2

    image = obs["image"] if isinstance(obs, dict) else obs
    image = np.asarray(image)
    if image.ndim == 3:  # (C, H, W) -> (H, W) or (H, W, C)
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image.astype(np.uint8))


def _save_mp4(frames: Sequence[np.ndarray], path: Path, fps: int = 4) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(np.ascontiguousarray(frame[..., :3]), cv2.COLOR_RGB2BGR))
    writer.release()


def _worker_init(n_threads: int) -> None:
    import torch

    torch.set_num_threads(n_threads)


def _run_job(args: tuple) -> dict:
    return run_episode(*args)


def run_jobs(
    jobs: Sequence[EpisodeJob],
    config: EvalConfig,
    out_dir: Path,
    on_record: Callable[[dict], None],
) -> None:
    """Run ``jobs`` (in ``config.n_envs`` worker processes) and hand each record over."""
    args = [
        (
            job,
            {**config.env_kwargs, **config.env_overrides.get(job.env_id, {})},
            str(out_dir),
            config.trusted,
        )
        for job in jobs
    ]
    if config.n_envs <= 1 or len(jobs) <= 1:
        _worker_init(1)
        for a in args:
            on_record(_run_job(a))
        return
    import multiprocessing

    threads = 1  # one torch thread per env process: threads of several processes contend
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        config.n_envs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    ) as pool:
        for record in pool.map(_run_job, args):
            on_record(record)


def append_record(path: Path, record: dict) -> None:
    """Append one record as a JSON line and make it durable before returning."""
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pending_jobs(jobs: Iterable[EpisodeJob], done: Iterable[dict]) -> Iterator[EpisodeJob]:
    """Jobs whose records are not among ``done``."""
    done_keys = {record_key(r) for r in done}
    return (j for j in jobs if j.key not in done_keys)
