"""XRayPositioning: env steps per second, and scripted / random success rates.

Run: ``python benchmarks/bench_xray_env.py [--steps 200] [--episodes 50] [--ct DIR]``
(``--ct`` defaults to ``$SONORAY_CHEST_CT``; ``--skip-success`` measures speed only,
``--skip-speed`` success only). Prints absolute figures and ratios, and writes
``benchmarks/results/bench_xray_env.json`` (with the machine) after every part, so an
interrupted run keeps what it measured.

Speed: the default env (``chest_ap``, a pool of 4 phantoms) at 128 x 128 and 64 x 64,
``torch`` on 2 threads, random actions after ``WARM_UP_STEPS`` untimed ones (the sensor
builds a plane stack the first time rays run along a voxel axis), resets excluded; steps
per second from the total time and from the median step (a shared machine's bursts of
load inflate the mean). Peers in the same run, on the
same env and poses: the DRR render alone, the target's label projection alone, the quality
scores alone and the C-arm move with its swept collision checks alone, so the step's cost
splits into its parts.

Success: every task on the phantom pool and the example CT's chest AP, thoracic spine
lateral and cardiac oblique, ``--episodes`` episodes per task for the oracle and
``--random-episodes`` for the random agent, with the episode seeds of ``evaluate.py``
(:func:`sonoray.agents.evaluation.episode_seed`), so the numbers match an ``evaluate.py``
run with the same base seed. Success is geometric (angle, centring, target in field), so
these runs use ``--success-image-size`` (64) images to save time. Reported: success rate
with its 95% Wilson interval, median steps and mean dose-area product.

Aims: at least 15 env steps per second at 128 x 128 on 2 cores; the oracle at least 95%
successful on every task with a median of at most 8 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from machine_info import describe_machine
from timing import call_times_s, env_step_times_s, step_report

import sonoray.envs  # noqa: F401  (registers the ids)
from sonoray.agents import evaluation
from sonoray.agents.statistics import summarize
from sonoray.envs import XRAY_POSITIONING_ID
from sonoray.envs.xray_tasks import XRAY_VIEWS
from sonoray.sensors import xray_quality

RESULTS = Path(__file__).resolve().parent / "results" / "bench_xray_env.json"
TARGET_STEPS_PER_S = 15.0
TARGET_ORACLE_SUCCESS = 0.95
TARGET_ORACLE_MEDIAN_STEPS = 8
CT_TASKS = ("chest_ap", "thoracic_spine_lateral", "cardiac_oblique")
THREADS = 2
WARM_UP_STEPS = 20


def measure_speed(steps: int, image_size: int) -> dict:
    """Step times of the default env, and of its parts on the same poses."""
    env = gym.make(XRAY_POSITIONING_ID, image_size=image_size)
    inner = env.unwrapped
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    for _ in range(WARM_UP_STEPS):  # first rays along each voxel axis build plane stacks
        if any(env.step(rng.uniform(-1.0, 1.0, 5).astype(np.float32))[2:4]):
            env.reset(seed=1000)
    step_s, reset_s = env_step_times_s(env, steps, rng)

    # Peers on the env's final pose: the calls a step makes, one at a time.
    geometry = inner._geometry()
    index = [inner.scene.active_index]
    target = inner._targets[inner.scene.active_index]

    def render():
        return inner.sensor.render(
            geometry, kvp=inner._kvp, mas=inner._mas, noise_seeds=[1], volume_index=index
        )

    def project():
        return inner.sensor.project_labels(geometry, [inner.view.target], volume_index=index)

    shot, footprint = render(), project()
    view = xray_quality.XRayViewTarget(target.centroid, inner._view_direction, target.points_mm)
    render_s = call_times_s(render, steps)
    project_s = call_times_s(project, steps)
    quality_s = call_times_s(
        lambda: xray_quality.xray_image_quality(geometry, shot, footprint, view), steps
    )
    home = inner.joints()
    scale = inner.step_limits

    def move():
        inner.carm.reset(home)
        inner._move(rng.uniform(-1.0, 1.0, 5) * scale)

    move_s = call_times_s(move, steps)
    env.close()

    peers = {
        "peer_drr_render": render_s,
        "peer_label_projection": project_s,
        "peer_quality_scores": quality_s,
        "peer_carm_move_swept_collisions": move_s,
    }
    result = {"image_size": image_size, **step_report(step_s, reset_s, peers)}
    result["steps_per_s_at_median_step"] = round(1e3 / result["env_step"]["median_ms"], 2)
    return result


def _run(pool: str, kwargs: dict, tasks: tuple, agent: str, episodes: int, seed: int, out: str):
    config = evaluation.EvalConfig(
        env_ids=(XRAY_POSITIONING_ID,),
        tasks={XRAY_POSITIONING_ID: tasks},
        agents=(agent,),
        episodes=episodes,
        seed=seed,
        env_kwargs=kwargs,
    )
    records = []
    evaluation.run_jobs(evaluation.plan_jobs(config), config, Path(out), records.append)
    rows = []
    for row in summarize(records):
        row = {"pool": pool, **row}
        rows.append(row)
        print(
            f"  {pool:13s} {row['task']:24s} {row['agent']:9s} "
            f"{row['successes']:3d}/{row['episodes']:<3d} = {row['success_rate']:.0%} "
            f"(95% CI {row['success_ci95'][0]:.0%}-{row['success_ci95'][1]:.0%}), "
            f"median steps {row['median_steps']}, collisions {row['safety_violations']}",
            flush=True,
        )
    return rows


def measure_success(
    episodes: int, random_episodes: int, ct: Path | None, seed: int, image_size: int
) -> list[dict]:
    """Success of the scripted and random agents per (pool, task)."""
    runs = [("phantom pool", {"image_size": image_size}, tuple(XRAY_VIEWS))]
    if ct is not None:
        runs.append(("example CT", {"image_size": image_size, "ct": str(ct)}, CT_TASKS))
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for pool, kwargs, tasks in runs:
            started = time.perf_counter()
            for task in tasks:
                for agent, n in (("scripted", episodes), ("random", random_episodes)):
                    if n > 0:
                        results += _run(pool, kwargs, (task,), agent, n, seed, out_dir)
                # One task's env (and its X-ray volumes) at a time keeps memory bounded.
                evaluation.close_cached_envs()
            print(f"  ({pool}: {time.perf_counter() - started:.0f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed env steps per size")
    parser.add_argument("--episodes", type=int, default=50, help="oracle episodes per task")
    parser.add_argument("--random-episodes", type=int, default=50, help="random episodes/task")
    parser.add_argument("--success-image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="base seed of the episode seeds")
    parser.add_argument("--ct", type=Path, default=os.environ.get("SONORAY_CHEST_CT"))
    parser.add_argument("--skip-success", action="store_true", help="measure speed only")
    parser.add_argument("--skip-speed", action="store_true", help="measure success only")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    # Each part keeps its own machine state and command; a run that skips a part keeps
    # the part last recorded.
    report = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    run = {
        "machine": describe_machine(),
        "command": "python benchmarks/bench_xray_env.py " + " ".join(sys.argv[1:]),
    }

    def save():
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    print(f"machine: {run['machine']}", flush=True)
    if not args.skip_speed:
        report["speed_run"] = run
        report["speed"] = [measure_speed(args.steps, size) for size in (128, 64)]
        for row in report["speed"]:
            print(
                f"{row['image_size']:3d} px: {row['steps_per_s']:.1f} env steps/s "
                f"({row['steps_per_s_at_median_step']:.1f} at the median step; aim >= "
                f"{TARGET_STEPS_PER_S:.0f}); step median "
                f"{row['env_step']['median_ms']:.1f} ms = "
                + ", ".join(
                    f"{row[k]['step_over_this']:.1f} x {k[5:]} ({row[k]['median_ms']:.1f} ms)"
                    for k in row
                    if k.startswith("peer_")
                ),
                flush=True,
            )
        save()

    if not args.skip_success:
        ct = args.ct if args.ct is not None and (args.ct / "ct.nii.gz").is_file() else None
        if ct is None:
            print("example CT not found (--ct or SONORAY_CHEST_CT): phantom pool only")
        report["success_run"] = run
        report["success"] = measure_success(
            args.episodes, args.random_episodes, ct, args.seed, args.success_image_size
        )
        report["success_settings"] = {
            "oracle_episodes_per_task": args.episodes,
            "random_episodes_per_task": args.random_episodes,
            "image_size": args.success_image_size,
            "base_seed": args.seed,
            "aims": {
                "oracle_success": TARGET_ORACLE_SUCCESS,
                "oracle_median_steps": TARGET_ORACLE_MEDIAN_STEPS,
            },
        }
        save()
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
