"""evaluate.py mechanics on a small stand-in env: files, seeds, resume, shards, gate, errors.

The stand-in env has the observation, action and info layout of sonoray's envs, so
these tests run in seconds; the real envs are evaluated end to end in
``test_evaluate_real.py``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import evaluate
from sonoray.agents import evaluation as ev
from sonoray.agents import registry
from sonoray.agents.policy_io import (
    UnsafeCheckpointError,
    load_policy,
    read_policy_config,
    save_policy,
)
from sonoray.agents.statistics import check_baseline, load_baseline, wilson_interval

TOY_ID = "sonoray-test/Toy-v0"


class ToyEnv(gym.Env):
    """Reach a seeded goal in the unit square; the image is a blob at the position."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task="near", image_size=8, device="cpu", render_mode=None):
        self.task, self.size, self.render_mode = task, image_size, render_mode
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (1, image_size, image_size), np.uint8),
                "state": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def _obs(self):
        img = np.zeros((1, self.size, self.size), np.uint8)
        i, j = (np.clip(self.pos, 0, 0.999) * self.size).astype(int)
        img[0, i, j] = 255
        return {"image": img, "state": self.pos.astype(np.float32)}

    def _info(self):
        d = float(np.linalg.norm(self.pos - self.goal))
        return {
            "is_success": d < 0.1,
            "scores": {"overall": max(0.0, 1 - d)},
            "patient": f"toy-{self.patient}",
        }

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(0, 1, 2)
        self.goal = self.np_random.uniform(0, 1, 2)
        self.patient = int(self.np_random.integers(4))
        self.t = 0
        return self._obs(), self._info()

    def step(self, action):
        self.pos = self.pos + 0.2 * np.asarray(action, dtype=float)
        self.t += 1
        info = self._info()
        return self._obs(), info["scores"]["overall"], info["is_success"], self.t >= 15, info

    def render(self):
        return np.repeat(np.repeat(self._obs()["image"][0], 8, 0), 8, 1)[..., None].repeat(3, -1)


class ToyOracle:
    name = "scripted"

    def reset(self, env, seed=None):
        pass

    def act(self, observation, env):
        return np.clip((env.goal - env.pos) / 0.2, -1, 1).astype(np.float32)


@pytest.fixture(autouse=True)
def toy_env(monkeypatch):
    if TOY_ID not in gym.registry:
        gym.register(TOY_ID, entry_point=ToyEnv, disable_env_checker=True)
    import sonoray.envs

    monkeypatch.setattr(sonoray.envs, "ENV_IDS", (TOY_ID,))
    monkeypatch.setattr(ev, "task_names", lambda env_id: ("near", "far"))
    monkeypatch.setitem(registry._ORACLES, TOY_ID, f"{__name__}:ToyOracle")
    ev._ENV_CACHE.clear()
    ev._AGENT_CACHE.clear()


def _run(*args: str) -> int:
    return evaluate.main(["--env", TOY_ID, "--image-size", "8", *args])


def _records(out: Path) -> list[dict]:
    recs = ev.read_records(out / ev.EPISODES_FILE)
    for r in recs:
        r.pop("wall_s")
    return sorted(recs, key=ev.record_key)


def test_tiny_run_writes_records_summary_and_report(tmp_path, capsys):
    assert _run("--episodes", "3", "--out", str(tmp_path)) == 0
    recs = ev.read_records(tmp_path / ev.EPISODES_FILE)
    assert len(recs) == 2 * 2 * 3  # tasks x agents x episodes
    for key in (
        "env_id",
        "task",
        "agent",
        "episode",
        "seed",
        "patient",
        "success",
        "return",
        "steps",
        "final_scores",
        "final_score",
        "wall_s",
    ):
        assert key in recs[0]
    summary = json.loads((tmp_path / ev.SUMMARY_FILE).read_text())
    assert {"versions", "device", "git_commit", "command_line", "start_time"} <= set(
        summary["provenance"]
    )
    res = summary["results"]
    assert len(res) == 4
    for r in res:
        assert {
            "env_id",
            "task",
            "agent",
            "episodes",
            "success_rate",
            "success_ci95",
            "mean_score",
            "median_steps",
        } <= set(r)
        assert r["success_ci95"][0] <= r["success_rate"] <= r["success_ci95"][1]
    scripted = [r for r in res if r["agent"] == "scripted"]
    assert all(r["success_rate"] == 1.0 for r in scripted)
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in page
    out = capsys.readouterr().out
    assert "success" in out and str(tmp_path / "report.html") in out


def test_report_escapes_strings(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "task_names", lambda env_id: ("<script>x</script>",))
    assert _run("--episodes", "1", "--agent", "scripted", "--out", str(tmp_path)) == 0
    page = (tmp_path / "report.html").read_text()
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page


def test_baseline_gate_exit_status(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(f"{TOY_ID}:\n  near:\n    scripted: {{min_success_rate: 0.9}}\n")
    assert (
        _run(
            "--episodes",
            "2",
            "--task",
            "near",
            "--out",
            str(tmp_path / "a"),
            "--baseline",
            str(good),
        )
        == 0
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({TOY_ID: {"near": {"random": {"min_success_rate": 1.0}}}}))
    assert (
        _run(
            "--episodes",
            "2",
            "--task",
            "near",
            "--out",
            str(tmp_path / "b"),
            "--baseline",
            str(bad),
        )
        == 1
    )
    assert "REGRESSION" in capsys.readouterr().err


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run("--episodes", "4", "--out", str(full)) == 0
    lines = (full / ev.EPISODES_FILE).read_text().splitlines()
    cut.mkdir()
    # A run killed while writing: 5 whole records and half of the sixth.
    (cut / ev.EPISODES_FILE).write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    assert _run("--episodes", "4", "--out", str(cut), "--resume") == 0
    assert _records(cut) == _records(full)
    assert len(_records(cut)) == len(lines)


def test_existing_output_needs_resume(tmp_path, capsys):
    assert _run("--episodes", "1", "--out", str(tmp_path)) == 0
    assert _run("--episodes", "1", "--out", str(tmp_path)) == 2
    assert "--resume" in capsys.readouterr().err


def test_four_shards_merge_into_the_unsharded_run(tmp_path):
    assert _run("--episodes", "5", "--out", str(tmp_path / "all")) == 0
    for i in range(4):
        assert _run("--episodes", "5", "--shard", f"{i}/4", "--out", str(tmp_path / f"s{i}")) == 0
    dirs = [str(tmp_path / f"s{i}") for i in range(4)]
    assert evaluate.main(["--merge", *dirs, "--out", str(tmp_path / "merged")]) == 0
    assert _records(tmp_path / "merged") == _records(tmp_path / "all")
    a = json.loads((tmp_path / "all" / ev.SUMMARY_FILE).read_text())["results"]
    m = json.loads((tmp_path / "merged" / ev.SUMMARY_FILE).read_text())["results"]
    assert a == m


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "sonoray/Nope-v0"], "unknown env id"),
        (["--task", "nope"], "nope"),
        (["--agent", "missing_policy.zip"], "missing_policy.zip"),
        (["--shard", "5/4"], "5/4"),
        (["--shard", "x"], "i/N"),
        (["--episodes", "0"], "--episodes"),
        (["--patient-seed", "-1"], "--patient-seed must be at least 0, got -1"),
        (["--n-patients", "0"], "--n-patients must be at least 1, got 0"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(tmp_path, capsys, args, message):
    argv = ["--env", TOY_ID, "--out", str(tmp_path), *args]
    if args[0] == "--env":
        argv = ["--out", str(tmp_path), *args]
    assert evaluate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unreadable_ct_and_corrupt_records_exit_2(tmp_path, capsys):
    text = tmp_path / "not_a_ct.nii.gz"
    text.write_text("hello")
    assert _run("--out", str(tmp_path / "o"), "--ct", str(text)) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / ev.EPISODES_FILE).write_text("{not json\n{}\n")
    assert _run("--out", str(out), "--resume") == 2
    assert "cannot resume" in capsys.readouterr().err


def test_malformed_baseline_exits_2(tmp_path, capsys):
    bad = tmp_path / "baseline.yaml"
    bad.write_text(f"{TOY_ID}:\n  near:\n    scripted: {{min_success_rate: 1.5}}\n")
    assert _run("--out", str(tmp_path / "o"), "--baseline", str(bad)) == 2
    assert "min_success_rate" in capsys.readouterr().err
    bad.write_text("{not: [valid")
    with pytest.raises(ValueError, match="not valid"):
        load_baseline(bad)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_check_baseline_respects_tolerance(tmp_path):
    results = [
        {
            "env_id": "e",
            "task": "t",
            "agent": "a",
            "success_rate": 0.85,
            "successes": 17,
            "episodes": 20,
        }
    ]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"e": {"t": {"a": {"min_success_rate": 0.9}}}}))
    assert check_baseline(results, load_baseline(path))
    path.write_text(json.dumps({"e": {"t": {"a": {"min_success_rate": 0.9, "tolerance": 0.05}}}}))
    assert not check_baseline(results, load_baseline(path))


def test_episode_seeds_are_the_same_in_another_process():
    here = ev.episode_seed(7, TOY_ID, "near", 3)
    code = (
        "from sonoray.agents.evaluation import episode_seed;"
        f"print(episode_seed(7, {TOY_ID!r}, 'near', 3))"
    )
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONHASHSEED="123"),
    )
    assert int(there.stdout) == here
    assert ev.episode_seed(7, TOY_ID, "near", 4) != here


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_sb3_zip(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A stable-baselines3-shaped zip whose pickle would create ``marker`` when loaded."""
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    payload = pickle.dumps(_Evil())
    sb3_zip = tmp_path / "model.zip"
    with zipfile.ZipFile(sb3_zip, "w") as z:
        z.writestr("data", json.dumps({"policy_class": {":serialized:": payload.hex()}}))
        z.writestr("policy.pth", payload)
    return sb3_zip, marker, payload


def test_checkpoint_with_a_malicious_pickle_is_refused_without_running(tmp_path):
    sb3_zip, marker, payload = _malicious_sb3_zip(tmp_path)
    env = ToyEnv()
    with pytest.raises(UnsafeCheckpointError, match="--trusted"):
        load_policy(sb3_zip, env)
    raw = tmp_path / "weights.pt"
    raw.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError):
        load_policy(raw, env)
    assert not marker.exists()


def test_trusted_sb3_zip_needs_env_and_task_named(tmp_path, capsys):
    sb3_zip, marker, _ = _malicious_sb3_zip(tmp_path)
    argv = ["--agent", str(sb3_zip), "--out", str(tmp_path / "o"), "--trusted"]
    assert evaluate.main(argv) == 2
    assert "name its --env and --task" in capsys.readouterr().err
    assert evaluate.main(argv[:-1]) == 2
    assert "--trusted" in capsys.readouterr().err
    assert not marker.exists()


def test_policy_weights_with_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    path = tmp_path / "policy.zip"
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil()
    import io

    buf = io.BytesIO()
    np.savez(buf, w=arr)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "config.json",
            json.dumps(
                {
                    "format": "sonoray-policy",
                    "version": 1,
                    "algo": "ppo",
                    "policy_kwargs": {},
                    "observation_space": None,
                    "action_space": None,
                }
            ),
        )
        z.writestr("weights.npz", buf.getvalue())
    with pytest.raises(ValueError):
        load_policy(path, ToyEnv())
    assert not marker.exists()


def test_saved_policy_round_trips_as_data(tmp_path):
    from stable_baselines3 import PPO

    env = ToyEnv(image_size=40)  # the default CNN needs at least 36 pixels
    model = PPO(
        "MultiInputPolicy",
        env,
        n_steps=16,
        batch_size=16,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [16]},
    )
    path = tmp_path / "toy_policy.zip"
    save_policy(model, path, env_id=TOY_ID, task="near", extra={"env_kwargs": {"image_size": 40}})
    agent = load_policy(path, env)
    obs, _ = env.reset(seed=1)
    expected, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(agent.act(obs, env), expected, rtol=1e-6)
    # the feature extractor the actor and critic share is stored once
    aliases = read_policy_config(path)["aliases"]
    assert aliases and all(k.startswith(("pi_features", "vf_features")) for k in aliases)
    with zipfile.ZipFile(path) as z, np.load(io.BytesIO(z.read("weights.npz"))) as npz:
        assert not set(aliases) & set(npz.files)
        config = json.loads(z.read("config.json"))
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("config.json", json.dumps({**config, "aliases": {"a": "missing"}}))
        with zipfile.ZipFile(path) as src:
            z.writestr("weights.npz", src.read("weights.npz"))
    with pytest.raises(ValueError, match="aliases"):
        load_policy(broken, env)
    # without --env and --task, evaluate.py runs the policy on what it was trained on
    out = tmp_path / "o"
    argv = ["--image-size", "40", "--episodes", "1", "--agent", str(path), "--out", str(out)]
    assert evaluate.main(argv) == 0
    assert {(r["env_id"], r["task"]) for r in _records(out)} == {(TOY_ID, "near")}

    from sonoray.agents.policy_io import observation_kwargs

    assert observation_kwargs(path) == {}
    trained = {"image_size": 64, "drr_max_voxel_mm": 4.0, "preset": "linear", "n_patients": 8}
    other = tmp_path / "rendered.zip"
    save_policy(model, other, env_id=TOY_ID, task="near", extra={"env_kwargs": trained})
    assert observation_kwargs(other) == {"drr_max_voxel_mm": 4.0, "preset": "linear"}


_KILLABLE_RUN = """
import os, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import gymnasium as gym
import numpy as np
import evaluate
import sonoray.envs
import test_evaluate as t
from sonoray.agents import evaluation as ev, registry

class SlowToy(t.ToyEnv):
    def step(self, action):
        time.sleep(0.02)
        return super().step(action)

gym.register(t.TOY_ID, entry_point=SlowToy, disable_env_checker=True)
sonoray.envs.ENV_IDS = (t.TOY_ID,)
ev.task_names = lambda env_id: ("near", "far")
registry._ORACLES[t.TOY_ID] = "test_evaluate:ToyOracle"
sys.exit(evaluate.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    import signal
    import time

    script = tmp_path / "run_eval.py"
    here = Path(__file__).parent
    script.write_text(_KILLABLE_RUN.format(tests=str(here), root=str(here.parent)))
    args = ["--env", TOY_ID, "--image-size", "8", "--episodes", "6", "--agent", "random"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(
        [sys.executable, str(script), *args, "--out", str(full)], check=True, capture_output=True
    )

    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--out", str(cut)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    episodes = cut / ev.EPISODES_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if episodes.is_file() and len(episodes.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(ev.read_records(episodes))
    assert 4 <= written < 12, "the run was not killed halfway"

    subprocess.run(
        [sys.executable, str(script), *args, "--out", str(cut), "--resume"],
        check=True,
        capture_output=True,
    )
    assert _records(cut) == _records(full)


def test_named_preset_applies_to_the_env_and_bad_ones_exit_2(tmp_path, capsys):
    import yaml

    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({TOY_ID: {"presets": {"big": {"image_size": 12}}}}))
    out = tmp_path / "o"
    assert (
        _run(
            "--task",
            "near",
            "--agent",
            "scripted",
            "--episodes",
            "1",
            "--out",
            str(out),
            "--preset",
            "big",
            "--hyperparams",
            str(hp),
        )
        == 0
    )
    import cv2

    image = cv2.imread(str(out / _records(out)[0]["image"]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (12, 12)  # the preset's image size, not --image-size 8
    assert _run("--out", str(tmp_path / "p"), "--preset", "nope", "--hyperparams", str(hp)) == 2
    assert "unknown --preset 'nope'" in capsys.readouterr().err
    assert _run("--out", str(tmp_path / "q"), "--hyperparams", str(hp)) == 2
    assert "name a --preset" in capsys.readouterr().err


def test_policies_run_only_on_the_env_and_task_they_target():
    config = ev.EvalConfig(
        env_ids=("env-a", "env-b"),
        tasks={"env-a": ("t1", "t2"), "env-b": ("t3",)},
        agents=("random", "pa.zip", "pb.zip"),
        episodes=2,
        agent_targets={"pa.zip": ("env-a", "t2"), "pb.zip": ("env-b", None)},
    )
    pairs = {(j.env_id, j.task, j.agent) for j in ev.plan_jobs(config)}
    assert pairs == {
        ("env-a", "t1", "random"),
        ("env-a", "t2", "random"),
        ("env-b", "t3", "random"),
        ("env-a", "t2", "pa.zip"),
        ("env-b", "t3", "pb.zip"),
    }


def test_policy_of_another_env_exits_2(tmp_path, capsys):
    from stable_baselines3 import PPO

    env = ToyEnv(image_size=40)
    model = PPO("MultiInputPolicy", env, n_steps=16, batch_size=16, device="cpu")
    path = tmp_path / "other.zip"
    save_policy(model, path, env_id="sonoray/XRayPositioning-v0", task="chest_ap")
    assert _run("--agent", str(path), "--out", str(tmp_path / "o")) == 2
    assert "was trained on sonoray/XRayPositioning-v0" in capsys.readouterr().err


def _toy_policy(tmp_path: Path, **extra) -> Path:
    from stable_baselines3 import PPO

    model = PPO("MultiInputPolicy", ToyEnv(image_size=40), n_steps=16, batch_size=16, device="cpu")
    path = tmp_path / "toy_policy.zip"
    save_policy(model, path, env_id=TOY_ID, task="near", extra=extra)
    return path


def test_damaged_policy_files_exit_2_before_any_episode(tmp_path, capsys):
    path = _toy_policy(tmp_path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        start = z.getinfo("weights.npz").header_offset + 100
    data[start : start + 200] = bytes(200)  # damage the compressed weights (bad CRC)
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    for bad, message in ((flipped, "weights.npz is damaged"), (truncated, "damaged or truncated")):
        out = tmp_path / f"o_{bad.stem}"
        assert _run("--agent", str(bad), "--image-size", "40", "--out", str(out)) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_policy_image_size_mismatch_exits_2_and_training_pool_warns(tmp_path, capsys, caplog):
    path = _toy_policy(tmp_path, env_kwargs={"patient_seed": 0}, preset="easy")
    assert _run("--agent", str(path), "--out", str(tmp_path / "o")) == 2  # _run renders 8 px
    assert "trained on 40 x 40 images" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        argv = ["--agent", str(path), "--image-size", "40", "--episodes", "1"]
        assert evaluate.main([*argv, "--out", str(tmp_path / "p")]) == 0
    assert "pass --patient-seed" in caplog.text
    assert "trained with --preset easy" in caplog.text
