"""Evaluate agents on sonoray environments, headless and in batch.

    python evaluate.py                       # every env, scripted and random agents
    python evaluate.py --env sonoray/XRayPositioning-v0 --task chest_ap --episodes 50
    python evaluate.py --shard 0/4 --out run/0   # ... shards 1-3 elsewhere, then:
    python evaluate.py --merge run/0 run/1 run/2 run/3 --out run/all
    python evaluate.py --baseline benchmarks/baseline_scripted.yaml   # exit 1 on regression
    python evaluate.py --agent agents/policies/xray_chest_ap.zip random --patient-seed 2000

A policy file runs on the env id and task it was trained on (only on its env id when
``--env``/``--task`` are named), rendering its observations as in training.

Writes ``episodes.jsonl`` (one record per episode, appended as each ends),
``summary.json`` (provenance and per env/task/agent results) and ``report.html``.
Exit status: 0 ok, 1 a success rate fell below the baseline, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from sonoray.agents import evaluation as ev
from sonoray.agents.report import text_table, write_report
from sonoray.agents.statistics import check_baseline, load_baseline, summarize

DEFAULT_EPISODES = 2
DEFAULT_IMAGE_SIZE = 64
DEFAULT_OUT = "eval_out"

logger = logging.getLogger("evaluate")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Batch, headless evaluation of agents on sonoray environments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--env",
        nargs="+",
        default=None,
        metavar="ID",
        help="environment ids, or 'all' for every registered one (default: the env of the "
        "policy files among --agent, else all)",
    )
    p.add_argument(
        "--task",
        nargs="+",
        default=None,
        metavar="NAME",
        help="task names (default: the tasks of the policy files among --agent when --env is "
        "not given, else every task of each env)",
    )
    p.add_argument(
        "--agent",
        nargs="+",
        default=["scripted", "random"],
        metavar="AGENT",
        help="'scripted' (the env's oracle), 'random', or a saved policy file",
    )
    p.add_argument(
        "--episodes", type=int, default=DEFAULT_EPISODES, help="episodes per (env, task, agent)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; each episode's seed derives from it, the env, task and index",
    )
    p.add_argument(
        "--ct",
        default=None,
        metavar="PATH",
        help="a real CT (NIfTI file or DICOM folder) instead of the phantom pool",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="PATH",
        help="label volume for --ct (TotalSegmentator naming)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="named env preset of the hyperparameter file (e.g. easy: small start "
        "perturbations), applied to every env id",
    )
    p.add_argument(
        "--hyperparams",
        default=None,
        metavar="FILE",
        help="YAML of hyperparameters and presets per env id (default: the package's)",
    )
    p.add_argument(
        "--patient-seed",
        type=int,
        default=None,
        help="seed of the first phantom of the pool (phantom k has seed patient-seed + k); "
        "choose one whose phantoms a policy never saw in training (default: the env's, 0)",
    )
    p.add_argument(
        "--n-patients",
        type=int,
        default=None,
        help="phantoms in the pool (default: the env's)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=DEFAULT_IMAGE_SIZE,
        help="observation image height and width (pixels)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="torch device of the sensors; auto = cuda when available",
    )
    p.add_argument(
        "--n-envs", type=int, default=1, help="worker processes; changes speed, never results"
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder")
    p.add_argument(
        "--video",
        type=int,
        default=0,
        metavar="N",
        help="record the first N episodes of each (env, task, agent) as MP4",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="FILE",
        help="YAML/JSON of minimum success rates; exit 1 when one is not met",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="i/N",
        help="run only the episodes whose index is i modulo N",
    )
    p.add_argument(
        "--resume", action="store_true", help="skip episodes already recorded in the output folder"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="merge the episodes of these output folders into --out (no episodes run)",
    )
    p.add_argument(
        "--trusted",
        action="store_true",
        help="allow policy files whose loading unpickles code (stable-baselines3 zips)",
    )
    return p


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/N with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


def _resolve_envs(names: list[str]) -> tuple[str, ...]:
    from sonoray.envs import ENV_IDS

    if names == ["all"]:
        return ENV_IDS
    unknown = [n for n in names if n not in ENV_IDS]
    if unknown:
        raise UsageError(f"unknown env id(s) {unknown}; allowed: {list(ENV_IDS)} or 'all'")
    return tuple(names)


def _resolve_tasks(env_ids: tuple[str, ...], tasks: list[str] | None) -> dict[str, tuple]:
    out = {}
    for env_id in env_ids:
        known = ev.task_names(env_id)
        if tasks is None:
            out[env_id] = known
            continue
        chosen = tuple(t for t in tasks if t in known)
        if not chosen:
            raise UsageError(f"none of the tasks {tasks} belongs to {env_id}; its tasks: {known}")
        out[env_id] = chosen
    unused = set(tasks or ()) - {t for ts in out.values() for t in ts}
    if unused:
        raise UsageError(
            f"unknown task(s) {sorted(unused)}; tasks per env: "
            f"{ {e: list(ev.task_names(e)) for e in env_ids} }"
        )
    return out


def _check_agents(agents: list[str]) -> tuple[str, ...]:
    for a in agents:
        if a not in ev.BUILTIN_AGENTS and not Path(a).is_file():
            raise UsageError(
                f"agent {a!r} is neither one of {ev.BUILTIN_AGENTS} nor an existing policy file"
            )
    return tuple(agents)


def _policy_configs(agents: tuple[str, ...], trusted: bool, env_named: bool) -> dict[str, dict]:
    """Per sonoray policy file among ``agents``, its config, after checking that its
    weights read; a damaged file is a usage error before any env is built."""
    from sonoray.agents.policy_io import (
        UnsafeCheckpointError,
        read_policy_config,
        read_policy_weights,
    )

    configs = {}
    for agent in agents:
        if agent in ev.BUILTIN_AGENTS:
            continue
        try:
            configs[agent] = read_policy_config(agent)
            read_policy_weights(agent)
        except UnsafeCheckpointError as exc:
            if not trusted:
                raise UsageError(f"--agent {agent!r}: {exc}") from None
            if not env_named:
                raise UsageError(
                    f"--agent {agent!r} is not a sonoray policy file and does not say what it "
                    "was trained on: name its --env and --task"
                ) from None
        except ValueError as exc:
            raise UsageError(f"--agent {agent!r}: {exc}") from None
    return configs


def _check_policy_settings(configs: dict[str, dict], args: argparse.Namespace, overrides: dict):
    """Refuse an image size a policy cannot see; warn when its episodes would use its
    training patients or another start distribution than its training preset."""
    from sonoray.agents.policy_io import image_size

    for agent, config in configs.items():
        size = overrides.get(config["env_id"], {}).get("image_size", args.image_size)
        trained = image_size(config)
        if trained is not None and trained != size:
            raise UsageError(
                f"--agent {agent!r} was trained on {trained} x {trained} images, the env would "
                f"render {size} x {size}: pass --image-size {trained}"
            )
        env_kwargs = config.get("extra", {}).get("env_kwargs", {})
        if args.ct is None and args.patient_seed is None and "patient_seed" in env_kwargs:
            logger.warning(
                "%s was trained on phantoms from seed %s; these episodes use the env's default "
                "pool (seed 0): pass --patient-seed to test it on patients it never saw",
                agent,
                env_kwargs["patient_seed"],
            )
        preset = config.get("extra", {}).get("preset")
        if preset and args.preset != preset:
            logger.warning(
                "%s was trained with --preset %s; these episodes use %s",
                agent,
                preset,
                f"--preset {args.preset}" if args.preset else "the env's defaults",
            )


def _presets(env_ids: tuple[str, ...], preset: str | None, path: str | None) -> dict:
    """Per env id, the env settings of the named preset (none without ``preset``)."""
    if preset is None:
        if path is not None:
            raise UsageError("--hyperparams is read only for --preset; name a --preset")
        return {}
    from sonoray.agents.training import DEFAULT_HYPERPARAMS, load_presets

    try:
        return {e: load_presets(path or DEFAULT_HYPERPARAMS, e)[preset] for e in env_ids}
    except KeyError:
        allowed = {e: sorted(load_presets(path or DEFAULT_HYPERPARAMS, e)) for e in env_ids}
        raise UsageError(f"unknown --preset {preset!r}; presets per env: {allowed}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_ct(ct: str, labels: str | None) -> None:
    """Load the CT once up front, so that a bad file is a usage error before any episode."""
    if not Path(ct).exists():
        raise UsageError(f"--ct {ct!r} does not exist")
    if labels and not Path(labels).exists():
        raise UsageError(f"--labels {labels!r} does not exist")
    from sonoray.envs.patient_pool import PatientPool

    try:
        PatientPool.from_ct(ct, labels)
    except Exception as exc:  # noqa: BLE001  (any reader error means the file is unusable)
        raise UsageError(f"--ct {ct!r} cannot be loaded: {exc}") from None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA device is available (install a CUDA build of "
            "torch, or use --device cpu)"
        )
    return name


def provenance(argv: list[str], device: str) -> dict:
    """Where and how a run was made: versions, device, commit, command line, start time."""
    versions = {}
    for pkg in ("sonoray", "torch", "numpy", "pybullet", "gymnasium", "stable-baselines3"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "git_commit": commit,
        "command_line": " ".join(["evaluate.py", *argv]),
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish(out_dir: Path, records: list[dict], prov: dict, baseline: str | None) -> int:
    """Write summary and report, print the table and paths, apply the baseline gate."""
    records = sorted(records, key=ev.record_key)
    results = summarize(records)
    summary = {"provenance": prov, "results": results}
    (out_dir / ev.SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    report = write_report(out_dir, records, results, prov)
    print(text_table(results))
    print(f"episodes: {out_dir / ev.EPISODES_FILE}")
    print(f"summary:  {out_dir / ev.SUMMARY_FILE}")
    print(f"report:   {report}")
    if baseline is None:
        return 0
    regressions = check_baseline(results, load_baseline(baseline))
    for message in regressions:
        print(f"REGRESSION {message}", file=sys.stderr)
    return 1 if regressions else 0


def merge(dirs: list[str], out_dir: Path, argv: list[str], baseline: str | None) -> int:
    """Merge the episodes of several output folders (e.g. shards) into ``out_dir``."""
    by_key: dict = {}
    for d in dirs:
        path = Path(d) / ev.EPISODES_FILE
        if not path.is_file():
            raise UsageError(f"--merge: {d!r} has no {ev.EPISODES_FILE}")
        for r in ev.read_records(path):
            by_key.setdefault(ev.record_key(r), r)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = sorted(by_key.values(), key=ev.record_key)
    with (out_dir / ev.EPISODES_FILE).open("w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    for d in dirs:  # bring the images along so the report can show them
        for r in records:
            src = Path(d) / r["image"]
            dst = out_dir / r["image"]
            if src.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    return finish(out_dir, records, provenance(argv, "n/a (merge)"), baseline)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    shard = _parse_shard(args.shard)
    for name in ("episodes", "n_envs", "image_size"):
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.video < 0:
        raise UsageError(f"--video must be >= 0, got {args.video}")
    if args.labels and not args.ct:
        raise UsageError("--labels needs --ct")
    if args.ct:
        _check_ct(args.ct, args.labels)
    if args.baseline:
        try:
            load_baseline(args.baseline)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    agents = _check_agents(args.agent)
    configs = _policy_configs(agents, args.trusted, env_named=args.env is not None)
    targets = {a: (c["env_id"], c["task"]) for a, c in configs.items()}
    env_names, task_names = args.env, args.task
    if env_names is None and targets:  # the policies' own envs and tasks
        env_names = sorted({env for env, _ in targets.values()})
        task_names = task_names or sorted({task for _, task in targets.values()})
    own_task = args.env is None and args.task is None
    env_ids = _resolve_envs(env_names or ["all"])
    tasks = _resolve_tasks(env_ids, task_names)
    for agent, (env, _) in targets.items():
        if env not in env_ids:
            raise UsageError(
                f"--agent {agent!r} was trained on {env}, which is not among --env {list(env_ids)}"
            )
    overrides = _presets(env_ids, args.preset, args.hyperparams)
    _check_policy_settings(configs, args, overrides)
    device = _device(args.device)

    env_kwargs = {"image_size": args.image_size, "device": device}
    for name in ("patient_seed", "n_patients"):
        value = getattr(args, name)
        if value is not None:
            low = 0 if name == "patient_seed" else 1
            if value < low:
                flag = name.replace("_", "-")
                raise UsageError(f"--{flag} must be at least {low}, got {value}")
            env_kwargs[name] = value
    if args.ct:
        env_kwargs["ct"] = args.ct
        if args.labels:
            env_kwargs["labels"] = args.labels
    config = ev.EvalConfig(
        env_ids=env_ids,
        tasks=tasks,
        agents=agents,
        episodes=args.episodes,
        seed=args.seed,
        env_kwargs=env_kwargs,
        env_overrides=overrides,
        agent_targets={a: (env, task if own_task else None) for a, (env, task) in targets.items()},
        n_envs=args.n_envs,
        shard=shard,
        video=args.video,
        trusted=args.trusted,
    )
    out_dir = Path(args.out)
    episodes_path = out_dir / ev.EPISODES_FILE
    if episodes_path.exists() and not args.resume:
        raise UsageError(
            f"{str(episodes_path)!r} exists: pass --resume to continue that run, "
            "or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        done = ev.read_records(episodes_path)
    except ValueError as exc:
        raise UsageError(f"cannot resume: {exc}") from None
    if done:  # rewrite without a torn last line before appending
        episodes_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in done))
    jobs = ev.plan_jobs(config)
    todo = list(ev.pending_jobs(jobs, done))
    records = [r for r in done if ev.record_key(r) in {j.key for j in jobs}]

    from tqdm import tqdm

    with tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        unit="episode",
        desc="evaluate",
        file=sys.stderr,
    ) as bar:

        def on_record(record: dict) -> None:
            ev.append_record(episodes_path, record)
            records.append(record)
            bar.update(1)

        ev.run_jobs(todo, config, out_dir, on_record)
    return finish(out_dir, records, provenance(argv, device), args.baseline)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.merge:
            return merge(args.merge, Path(args.out), argv, args.baseline)
        return run(args, argv)
    except UsageError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
