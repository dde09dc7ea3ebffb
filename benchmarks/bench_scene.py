"""Scene build and reset times, against bare PyBullet peers measured in the same run.

Run: ``python benchmarks/bench_scene.py [--patients 4] [--resets 2000]``. Prints absolute
times and ratios, and writes ``benchmarks/results/bench_scene.json`` (with the machine).

Measured: the skin mesh of a procedural phantom (marching cubes and decimation, once per
patient per process), loading that mesh into PyBullet (collision, visual, body), building
a scene with 1 and N patients, a reset (``set_active_patient`` with a random offset and
yaw plus ``CArm.reset``), a C-arm command, the X-ray geometry and ``collisions()`` (clear,
and with the detector pressed into the skin).
Peers: a bare ``resetBasePositionAndOrientation`` call, a bare ``resetJointState`` call,
and connecting plus disconnecting a fresh DIRECT client. Aim: a reset under 5 ms.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pybullet
from machine_info import describe_machine
from pybullet_utils.bullet_client import BulletClient
from timing import call_times_s, summary_ms

from sonoray.assets.phantom import make_phantom
from sonoray.envs.frames import MM_PER_M
from sonoray.envs.scene import Scene, SceneConfig

RESULTS = Path(__file__).parent / "results" / "bench_scene.json"


def _load_mesh_once(client: BulletClient, patient) -> None:
    mesh = patient.skin_mesh
    vertices_m = (np.asarray(mesh.vertices) / MM_PER_M).tolist()
    indices = np.asarray(mesh.faces).ravel().tolist()
    col = client.createCollisionShape(client.GEOM_MESH, vertices=vertices_m, indices=indices)
    vis = client.createVisualShape(
        client.GEOM_MESH,
        vertices=vertices_m,
        indices=indices,
        normals=np.asarray(mesh.vertex_normals).tolist(),
    )
    client.createMultiBody(0, col, vis)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--resets", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results: dict = {"machine": describe_machine(), "patients": args.patients}

    phantoms, mesh_s = [], []
    for seed in range(args.patients):
        p = make_phantom(seed)
        start = time.perf_counter()
        faces = len(p.skin_mesh.faces)
        mesh_s.append(time.perf_counter() - start)
        phantoms.append(p)
        print(f"phantom {seed}: skin mesh {faces} faces in {mesh_s[-1]:.2f} s")
    results["skin_mesh"] = summary_ms(mesh_s)

    # Peers: a fresh client, and the mesh load alone into it.
    results["peer_fresh_client"] = summary_ms(
        call_times_s(lambda: BulletClient(connection_mode=pybullet.DIRECT).disconnect(), 20)
    )
    client = BulletClient(connection_mode=pybullet.DIRECT)
    load_s = [call_times_s(lambda p=p: _load_mesh_once(client, p), 1)[0] for p in phantoms]
    results["mesh_load_into_pybullet"] = summary_ms(load_s)
    bare_body = client.createMultiBody(0, client.createCollisionShape(client.GEOM_SPHERE))
    results["peer_reset_base_pose"] = summary_ms(
        call_times_s(
            lambda: client.resetBasePositionAndOrientation(bare_body, (0, 0, 1), (0, 0, 0, 1)),
            args.resets,
        )
    )
    client.disconnect()

    for n in sorted({1, args.patients}):
        build = call_times_s(lambda n=n: Scene(phantoms[:n], SceneConfig()).close(), 3)
        results[f"scene_build_{n}_patients"] = summary_ms(build)

    with Scene(phantoms, SceneConfig()) as scene:
        carm = scene.carm
        results["peer_reset_joint_state"] = summary_ms(
            call_times_s(lambda: scene.client.resetJointState(carm.body_id, 0, 0.0), args.resets)
        )
        draws = [
            (int(rng.integers(len(phantoms))), rng.uniform(-0.03, 0.03, 2), rng.uniform(-5, 5))
            for _ in range(args.resets)
        ]
        it = iter(draws)

        def reset() -> None:
            index, offset, yaw = next(it)
            scene.set_active_patient(index, offset, yaw)
            carm.reset()

        results["scene_reset"] = summary_ms(call_times_s(reset, args.resets))
        commands = rng.uniform(-20, 20, (args.resets, 5))
        it_cmd = iter(commands)
        results["carm_command"] = summary_ms(
            call_times_s(lambda: carm.command(next(it_cmd)), args.resets)
        )
        patient_in_world = scene.patient_in_world
        results["xray_geometry"] = summary_ms(
            call_times_s(lambda: carm.xray_geometry_in_patient(patient_in_world), args.resets)
        )
        carm.reset()
        results["collisions"] = summary_ms(call_times_s(scene.collisions, 200))
        # Detector pressed into the skin: the concave-mesh narrow phase runs.
        scene.set_active_patient(0)
        scene.set_table_height(1.10)
        carm.command({"lift": -215.0}, relative=False)
        results["collisions_in_contact"] = summary_ms(call_times_s(scene.collisions, 200))

    peer = results["peer_reset_base_pose"]["median_ms"]
    reset_ms = results["scene_reset"]["median_ms"]
    results["ratios"] = {
        "scene_reset_over_bare_base_reset": reset_ms / peer,
        "scene_build_1_over_fresh_client": results["scene_build_1_patients"]["median_ms"]
        / results["peer_fresh_client"]["median_ms"],
    }
    results["aim_reset_under_5_ms"] = reset_ms < 5.0

    print(f"machine: {results['machine']['description']} ({results['machine']['cpu']})")
    for key, value in results.items():
        if isinstance(value, dict) and "median_ms" in value:
            print(
                f"{key:32s} median {value['median_ms']:10.3f} ms   p95 {value['p95_ms']:10.3f} ms"
            )
    for key, value in results["ratios"].items():
        print(f"{key:32s} {value:10.1f} x")
    print(f"reset under 5 ms: {results['aim_reset_under_5_ms']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
