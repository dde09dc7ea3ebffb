"""Train a positioning policy on a sonoray environment with stable-baselines3.

    python train.py --env sonoray/XRayPositioning-v0 --task chest_ap --timesteps 200000
    python train.py --env sonoray/UltrasoundNavigation-v0 --task liver_long_axis --algo sac
    python train.py ... --resume runs/xray/checkpoints/policy_50000.zip

Writes TensorBoard logs (including the success rate), periodic checkpoints,
evaluations on held-out seeds and validation patients (``eval/evaluations.jsonl``),
the resolved configuration, ``best_policy.zip`` (best validation) and ``policy.zip``
(last): policy files that ``evaluate.py --agent`` loads without unpickling anything.
``--bc-episodes N --bc-rounds R`` warm-starts with DAgger imitation of the scripted
oracle, e.g. (13 minutes on two CPU cores, 100% on validation):

    python train.py --task chest_ap --preset easy --n-envs 1 --timesteps 30000 \
        --bc-episodes 1000 --bc-rounds 5 --out runs/xray_easy

GPU users: install a CUDA build of torch first; ``--device auto`` then uses it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sonoray.agents.training import DEFAULT_HYPERPARAMS, TrainConfig, load_hyperparams, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a positioning policy with stable-baselines3.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--env", default="sonoray/XRayPositioning-v0", help="environment id")
    p.add_argument("--task", default=None, help="task name; None: the env's first task")
    p.add_argument("--algo", default="ppo", help="ppo or sac")
    p.add_argument(
        "--timesteps",
        type=int,
        default=100_000,
        help="environment steps of reinforcement learning (PPO rounds up to whole rollouts "
        "of n_steps x n-envs); on --resume, steps on top of the policy's",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of training envs and the model")
    p.add_argument(
        "--n-envs",
        type=int,
        default=None,
        help="parallel envs; None: the hyperparameter file's",
    )
    p.add_argument("--device", default="auto", help="torch device of the policy: auto, cpu, cuda")
    p.add_argument("--out", default="runs/train", help="output folder")
    p.add_argument(
        "--hyperparams", default=str(DEFAULT_HYPERPARAMS), help="YAML of hyperparameters per env id"
    )
    p.add_argument(
        "--preset", default=None, help="named env preset from the hyperparameter file (e.g. easy)"
    )
    p.add_argument(
        "--bc-episodes",
        type=int,
        default=0,
        help="warm start: imitate the scripted oracle over this many episodes (DAgger)",
    )
    p.add_argument(
        "--bc-rounds",
        type=int,
        default=1,
        help="DAgger rounds the --bc-episodes are split into; round 0 follows the oracle, "
        "later rounds the policy being trained",
    )
    p.add_argument(
        "--bc-noise", type=float, default=0.2, help="std of the action noise in imitation rollouts"
    )
    p.add_argument(
        "--bc-epochs", type=int, default=5, help="passes over the pooled data per DAgger round"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a policy file written by a previous run",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        import sonoray.envs
        from sonoray.agents.evaluation import task_names

        if args.env not in sonoray.envs.ENV_IDS:
            raise ValueError(f"unknown env id {args.env!r}; allowed: {list(sonoray.envs.ENV_IDS)}")
        tasks = task_names(args.env)
        task = args.task or tasks[0]
        if task not in tasks:
            raise ValueError(f"unknown task {task!r} for {args.env}; allowed: {list(tasks)}")
        for name, low in (("timesteps", 1), ("bc_episodes", 0), ("bc_rounds", 1), ("bc_epochs", 1)):
            if getattr(args, name) < low:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be at least {low}, got {getattr(args, name)}")
        if not 0.0 <= args.bc_noise <= 2.0:
            raise ValueError(f"--bc-noise must lie in [0, 2], got {args.bc_noise}")
        if args.resume and not Path(args.resume).is_file():
            raise ValueError(f"--resume {args.resume!r} does not exist")
        hp = load_hyperparams(args.hyperparams, args.env, args.algo, args.preset)
        config = TrainConfig(
            env_id=args.env,
            task=task,
            algo=args.algo,
            timesteps=args.timesteps,
            seed=args.seed,
            n_envs=args.n_envs or hp["n_envs"],
            device=args.device,
            out=args.out,
            preset=args.preset,
            algo_kwargs=hp["algo_kwargs"],
            policy_kwargs=hp["policy_kwargs"],
            env_kwargs=hp["env_kwargs"],
            eval_env_kwargs=hp["eval_env_kwargs"],
            eval_freq=hp["eval_freq"],
            eval_episodes=hp["eval_episodes"],
            checkpoint_freq=hp["checkpoint_freq"],
            bc_episodes=args.bc_episodes,
            bc_rounds=args.bc_rounds,
            bc_noise=args.bc_noise,
            bc_epochs=args.bc_epochs,
        )
        final = train(config, resume=args.resume)
    except ValueError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"policy: {final}")
    print(f"best policy on the validation patients: {final.with_name('best_policy.zip')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
