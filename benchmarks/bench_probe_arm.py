"""One ultrasound-arm step (IK + force regulation + coupling rays) against bare PyBullet peers.

Run: ``python benchmarks/bench_probe_arm.py [--steps 500]``. Prints absolute times and
ratios, and writes ``benchmarks/results/bench_probe_arm.json`` (with the machine).

World: a static concave ellipsoid "torso" (icosphere, 20480 triangles, semi-axes 300 x 170 x
110 mm) and the iiwa with the convex probe, placed on the skin at 5 N. Measured:
``ProbeArm.move`` with a small random slide / rotate / tilt and force regulation (what an
env step asks of the arm), and its parts: the damped-least-squares IK, one ray batch (128
rays), the admittance loop. Peers in the same run: one ``calculateInverseKinematics`` call
(PyBullet's default single pass), a bare ``stepSimulation`` and a bare ``rayTestBatch`` of
the same rays. Accuracy: the forward-kinematics residual of our IK and of that single-pass
call on the same targets.

Aim: the whole env step, B-mode render (about 10 ms) included, at 30 steps per second or
more on 2 cores, so the arm's step should stay well under 20 ms.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pybullet
import trimesh
from machine_info import describe_machine
from pybullet_utils.bullet_client import BulletClient
from timing import call_times_s, summary_ms

from sonoray.envs import frames
from sonoray.envs.probe_arm import ProbeArm

RESULTS = Path(__file__).parent / "results" / "bench_probe_arm.json"
TORSO_SEMI_AXES_M = (0.30, 0.17, 0.11)
TORSO_CENTRE_M = (0.0, 0.0, 0.15)
ARM_BASE = ((0.0, -0.6, 0.0), pybullet.getQuaternionFromEuler((0.0, 0.0, math.pi / 2)))
STEP_BUDGET_MS = 1000.0 / 30.0
RENDER_MS = 10.0


def _world():
    client = BulletClient(connection_mode=pybullet.DIRECT)
    torso = trimesh.creation.icosphere(subdivisions=5)
    torso.apply_scale(TORSO_SEMI_AXES_M)
    shape = client.createCollisionShape(
        pybullet.GEOM_MESH,
        vertices=torso.vertices.tolist(),
        indices=torso.faces.ravel().tolist(),
        flags=pybullet.GEOM_FORCE_CONCAVE_TRIMESH,
    )
    client.createMultiBody(0, shape, basePosition=TORSO_CENTRE_M)
    arm = ProbeArm(client, ARM_BASE, "convex")
    top = np.array(TORSO_CENTRE_M) + (0.0, 0.0, TORSO_SEMI_AXES_M[2])
    result = arm.place_on_skin(top, (0.0, 0.0, 1.0))
    if not result.reachable:
        raise RuntimeError(f"benchmark start pose unreachable: {result}")
    return client, arm, len(torso.faces)


def _ik_targets(arm: ProbeArm, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Probe poses a few mm / degrees from the current one (what one env step asks)."""
    start = arm.probe_in_world()
    targets = []
    for _ in range(count):
        delta = np.eye(4)
        delta[:3, 3] = rng.uniform(-10.0, 10.0, 3) / frames.MM_PER_M
        delta[:3, :3] = frames.rotation_about_axis(rng.normal(size=3), rng.uniform(-5.0, 5.0))
        targets.append(start @ delta)
    return targets


def _pybullet_single_ik(client, arm: ProbeArm, target: np.ndarray) -> list[float]:
    position, quat = frames.matrix_to_pose(target)
    return client.calculateInverseKinematics(
        arm.body_id, arm.probe_link, position.tolist(), quat.tolist()
    )


def _residual(arm: ProbeArm, q, target: np.ndarray) -> tuple[float, float]:
    pose = arm._forward(np.asarray(q))
    arm._forward(arm.joint_positions())
    position_mm = float(np.linalg.norm(pose[:3, 3] - target[:3, 3])) * frames.MM_PER_M
    cos = 0.5 * (np.trace(pose[:3, :3].T @ target[:3, :3]) - 1.0)
    return position_mm, math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="timed calls per measurement")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    client, arm, n_triangles = _world()
    home = arm.joint_positions()

    # Accuracy on the same targets: ours against PyBullet's single-pass call.
    targets = _ik_targets(arm, rng, 50)
    ours = [arm._solve_ik(t, (home,))[2:] for t in targets]
    single = [_residual(arm, _pybullet_single_ik(client, arm, t), t) for t in targets]
    accuracy = {
        "ours_position_mm_max": max(o[0] for o in ours),
        "ours_orientation_deg_max": max(o[1] for o in ours),
        "pybullet_single_position_mm_median": float(np.median([s[0] for s in single])),
        "pybullet_single_position_mm_max": max(s[0] for s in single),
        "pybullet_single_orientation_deg_median": float(np.median([s[1] for s in single])),
    }

    # Timings. The env step: small random probe-frame moves under force control; the
    # probe wanders, so it is brought back to the start every 20 steps (not timed).
    commands = rng.uniform(-1.0, 1.0, (args.steps, 5)) * (4.0, 4.0, 3.0, 2.0, 2.0)
    step_s = np.empty(args.steps)
    results = []
    for i, command in enumerate(commands):
        if i % 20 == 0:
            arm.reset_joints(home)
        start = time.perf_counter()
        results.append(arm.move(*command))
        step_s[i] = time.perf_counter() - start
    arm.reset_joints(home)
    pose = arm.probe_in_world()
    indentation = arm.element_indentation_mm()
    elements = arm._elements_m @ pose[:3, :3].T + pose[:3, 3]
    ray_from = (elements - 0.08 * pose[:3, 2]).tolist()
    ray_to = (elements + 0.05 * pose[:3, 2]).tolist()
    cycle = iter(range(10**9))

    timings = {
        "probe step (ProbeArm.move, force control on)": step_s,
        "  IK (damped least squares, to < 0.01 mm)": call_times_s(
            lambda: arm._solve_ik(targets[next(cycle) % len(targets)], (home,)), args.steps
        ),
        "  contact rays (128, one batch, with numpy)": call_times_s(
            lambda: arm._cast(pose), args.steps
        ),
        "  admittance loop (from 3 mm off target)": call_times_s(
            lambda: arm.controller.regulate(indentation - 3.0, indentation, arm.spring, 30.0),
            args.steps,
        ),
        "peer: calculateInverseKinematics (single call)": call_times_s(
            lambda: _pybullet_single_ik(client, arm, targets[next(cycle) % len(targets)]),
            args.steps,
        ),
        "peer: stepSimulation": call_times_s(client.stepSimulation, args.steps),
        "peer: rayTestBatch (128 rays)": call_times_s(
            lambda: client.rayTestBatch(ray_from, ray_to), args.steps
        ),
    }
    summary = {name: summary_ms(t) for name, t in timings.items()}
    step_median = summary["probe step (ProbeArm.move, force control on)"]["median_ms"]
    for row in summary.values():
        row["step_over_this"] = round(step_median / max(row["median_ms"], 1e-9), 2)
    quality = {
        "reachable_fraction": float(np.mean([r.reachable for r in results])),
        "force_converged_fraction": float(np.mean([r.force_converged for r in results])),
        "force_error_n_max": float(max(abs(r.force_n - 5.0) for r in results if r.reachable)),
        "control_periods_max": int(max(r.force_iterations for r in results)),
        "safety_violations": int(sum(r.safety_violation for r in results)),
    }
    budget = {
        "env_step_budget_ms (30 steps/s)": round(STEP_BUDGET_MS, 2),
        "render_ms (assumed)": RENDER_MS,
        "probe_step_share_of_budget": round(step_median / STEP_BUDGET_MS, 3),
        "env_steps_per_s_with_render": round(1000.0 / (step_median + RENDER_MS), 1),
    }

    print(f"machine: {describe_machine()}")
    print(f"torso mesh: {n_triangles} triangles; probe: convex, 128 elements")
    print(f"{'measurement':50s} {'median ms':>10s} {'p95 ms':>9s} {'step/this':>10s}")
    for name, row in summary.items():
        median, p95, ratio = row["median_ms"], row["p95_ms"], row["step_over_this"]
        print(f"{name:50s} {median:10.4f} {p95:9.4f} {ratio:10.2f}")
    print("IK accuracy on 50 targets:", {k: round(v, 4) for k, v in accuracy.items()})
    print("force control over the timed steps:", quality)
    print("budget:", budget)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": describe_machine(),
                "command": "python benchmarks/bench_probe_arm.py",
                "torso_triangles": n_triangles,
                "timings": summary,
                "ik_accuracy": accuracy,
                "force_control": quality,
                "budget": budget,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
