"""UltrasoundNavigation: env steps per second, and scripted / random success rates.

Run: ``python benchmarks/bench_us_env.py [--steps 300] [--episodes 50] [--random-episodes 20]
[--ct DIR]``
(``--ct`` defaults to ``$SONORAY_CHEST_CT``; ``--skip-success`` / ``--skip-speed`` run one
part). Prints absolute figures and ratios, and writes ``benchmarks/results/bench_us_env.json``
after every part, each part with the machine, its load and the command; a part not run
keeps its last record.

Speed on 2 cores: the default env (``liver_long_axis``, convex probe, 128 x 128 images, a
pool of 4 phantoms) with random actions. The headline is two envs stepping at once in two
processes with one torch thread each (how a vectorised env uses 2 cores; resets
included). Peers in the same run: one env in this process with 1 and with 2 torch threads
and at 64 x 64 (resets excluded), and on the same env and poses the B-mode render alone,
the arm's move (IK, force control, coupling rays, full-range random commands) alone, the
quality scores alone and the collision check alone, so the step's cost splits into its
parts. On a shared machine two torch threads contend with other work; one thread per env
is the robust setting.

Success: every task on the phantom pool and the example CT's liver and spleen (its
kidneys are cut by the scan), ``--episodes`` scripted and ``--random-episodes`` random
episodes per task (a random episode runs all 100 steps, the cost), with the episode
seeds of ``evaluate.py`` (:func:`sonoray.agents.evaluation.episode_seed`), so the numbers
match an ``evaluate.py`` run with the same base seed. Reported: success rate with its 95%
Wilson interval, median steps, largest peak force and force-cap violations.

Aims: at least 30 env steps per second on 2 cores; the oracle at least 90% successful on
every task without a force-cap violation.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from sonoray.envs import ULTRASOUND_NAVIGATION_ID
from sonoray.envs.us_tasks import US_TASKS
from sonoray.sensors import us_quality

RESULTS = Path(__file__).resolve().parent / "results" / "bench_us_env.json"
TARGET_STEPS_PER_S = 30.0
TARGET_ORACLE_SUCCESS = 0.9
CT_TASKS = ("liver_long_axis", "spleen_long_axis")
THREADS = 2
PEERS = ("peer_bmode_render", "peer_arm_move", "peer_quality_scores", "peer_collision_check")


def measure_speed(steps: int, image_size: int, threads: int) -> dict:
    """Step times of the default env in this process, and of its parts on the same poses."""
    torch.set_num_threads(threads)
    env = gym.make(ULTRASOUND_NAVIGATION_ID, image_size=image_size)
    inner = env.unwrapped
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    step_s, reset_s = env_step_times_s(env, steps, rng)

    # Peers on the env's final state: the same calls a step makes, one at a time.
    pose = inner.probe_in_patient
    coupling = inner.arm.coupling()
    ids = inner._target_ids[inner.patient_index]

    def render():
        return inner._simulator.render(
            pose[None], coupling[None], target_ids=ids, volume_index=[inner.patient_index]
        )

    frame = render()
    render_s = call_times_s(render, steps)
    quality_s = call_times_s(
        lambda: us_quality.ultrasound_quality(
            frame, pose, inner.plane.centroid_mm, inner.plane.normal, coupling[None]
        ),
        steps,
    )
    collisions_s = call_times_s(inner.scene.collisions, steps)
    scale = inner._action_scale
    move_s = call_times_s(lambda: inner.arm.move(*(rng.uniform(-1.0, 1.0, 5) * scale)), steps)
    env.close()

    peers = dict(zip(PEERS, (render_s, move_s, quality_s, collisions_s), strict=True))
    result = {
        "setup": f"1 env, {threads} torch thread(s), {image_size} px",
        **step_report(step_s, reset_s, peers),
    }
    return result


def _worker(barrier, queue, steps: int, image_size: int, seed: int) -> None:
    torch.set_num_threads(1)
    env = gym.make(ULTRASOUND_NAVIGATION_ID, image_size=image_size)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    barrier.wait()
    start = time.perf_counter()
    for episode in range(steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1.0, 1.0, 5).astype(np.float32))
        if terminated or truncated:
            env.reset(seed=seed + episode + 1)
    queue.put((steps, time.perf_counter() - start))
    env.close()


def measure_parallel(steps: int, image_size: int, processes: int) -> dict:
    """Steps per second of ``processes`` envs stepping at once, one process and one torch
    thread each (resets included): the throughput of a vectorised env on as many cores."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(barrier, queue, steps, image_size, i))
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    done = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    total_steps = sum(n for n, _ in done)
    return {
        "setup": f"{processes} envs in {processes} processes, 1 torch thread each, {image_size} px",
        "steps_per_s": round(total_steps / max(t for _, t in done), 2),
        "per_env_steps_per_s": [round(n / t, 2) for n, t in done],
    }


def measure_success(episodes: dict[str, int], ct: Path | None, seed: int) -> list[dict]:
    """Success of the scripted and random agents (episodes per agent) per (pool, task)."""
    runs = [("phantom pool", {}, tuple(US_TASKS))]
    if ct is not None:
        ct_kwargs = {"ct": str(ct / "ct.nii.gz"), "labels": str(ct / "labels.nii.gz")}
        runs.append(("example CT", ct_kwargs, CT_TASKS))
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for pool, kwargs, tasks in runs:
            records = []
            started = time.perf_counter()
            for agent, n in episodes.items():
                config = evaluation.EvalConfig(
                    env_ids=(ULTRASOUND_NAVIGATION_ID,),
                    tasks={ULTRASOUND_NAVIGATION_ID: tasks},
                    agents=(agent,),
                    episodes=n,
                    seed=seed,
                    env_kwargs=kwargs,
                )
                jobs = evaluation.plan_jobs(config)
                evaluation.run_jobs(jobs, config, Path(out_dir), records.append)
            for row in summarize(records):
                row = {"pool": pool, **{k: v for k, v in row.items() if "dose" not in k}}
                results.append(row)
                print(
                    f"  {pool:13s} {row['task']:24s} {row['agent']:9s} "
                    f"{row['successes']:3d}/{row['episodes']:<3d} = {row['success_rate']:.0%} "
                    f"(95% CI {row['success_ci95'][0]:.0%}-{row['success_ci95'][1]:.0%}), "
                    f"median steps {row['median_steps']}, peak force "
                    f"{row['max_peak_force_n']:.1f} N, cap violations {row['safety_violations']}"
                )
            print(f"  ({pool}: {time.perf_counter() - started:.0f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed env steps")
    parser.add_argument("--episodes", type=int, default=50, help="scripted episodes per task")
    parser.add_argument(
        "--random-episodes", type=int, default=20, help="random-agent episodes per task"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed of the episode seeds")
    parser.add_argument("--ct", type=Path, default=os.environ.get("SONORAY_CHEST_CT"))
    parser.add_argument("--skip-speed", action="store_true", help="measure success only")
    parser.add_argument("--skip-success", action="store_true", help="measure speed only")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_us_env.py " + " ".join(sys.argv[1:])
    print(f"machine: {describe_machine()}")

    # Each part keeps its machine state and command; a run that skips a part keeps the
    # part last recorded.
    report = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}

    def save(part: str, rows: list[dict], load_at_start: float, **extra) -> None:
        machine = {
            **describe_machine(),
            "load_average_1min_at_start": load_at_start,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        }
        report[part] = {"machine": machine, "command": command, **extra, "rows": rows}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    if not args.skip_speed:
        load_at_start = os.getloadavg()[0]
        rows = [
            measure_speed(args.steps, 128, 1),
            measure_speed(args.steps, 128, THREADS),
            measure_speed(args.steps, 64, 1),
        ]
        for row in rows:
            parts = ", ".join(
                f"{row[p]['step_over_this']:.1f} x {p[5:]} ({row[p]['median_ms']:.1f} ms)"
                for p in PEERS
            )
            print(
                f"{row['setup']}: {row['steps_per_s']:.1f} steps/s; step median "
                f"{row['env_step']['median_ms']:.1f} ms = {parts}"
            )
        rows.append(measure_parallel(args.steps, 128, THREADS))
        print(
            f"{rows[-1]['setup']}: {rows[-1]['steps_per_s']:.1f} steps/s in all "
            f"(aim >= {TARGET_STEPS_PER_S:.0f} on {THREADS} cores)"
        )
        save("speed", rows, round(load_at_start, 2))

    if not args.skip_success:
        ct = args.ct if args.ct is not None and (args.ct / "ct.nii.gz").is_file() else None
        if ct is None:
            print("example CT not found (--ct or SONORAY_CHEST_CT): phantom pool only")
        episodes = {"scripted": args.episodes, "random": args.random_episodes}
        load_at_start = os.getloadavg()[0]
        rows = measure_success(episodes, ct, args.seed)
        save("success", rows, round(load_at_start, 2), episodes_per_task=episodes)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
