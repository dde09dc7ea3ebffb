"""train.py: a few hundred steps on each env id, checkpoints evaluate.py loads, resume, errors."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

import evaluate
import train
from sonoray.agents.policy_io import read_policy_config
from sonoray.envs import ENV_IDS

SMALL = {
    "n_envs": 1,
    "eval_freq": 200,
    "eval_episodes": 1,
    "checkpoint_freq": 100,
    "env_kwargs": {"image_size": 64, "n_patients": 1},
    "policy_kwargs": {"net_arch": [32]},
    "ppo": {"n_steps": 100, "batch_size": 50, "n_epochs": 1},
    "sac": {"buffer_size": 500, "learning_starts": 50, "batch_size": 32},
}
TASKS = {ENV_IDS[0]: "chest_ap", ENV_IDS[1]: "liver_long_axis"}


@pytest.fixture()
def hyperparams(tmp_path) -> Path:
    path = tmp_path / "hp.yaml"
    short = {ENV_IDS[0]: {"max_exposures": 5}, ENV_IDS[1]: {"max_steps": 10}}
    data = {e: {**SMALL, "env_kwargs": {**SMALL["env_kwargs"], **short[e]}} for e in ENV_IDS}
    path.write_text(yaml.safe_dump(data))
    return path


def _train(
    hp: Path, out: Path, env_id: str, *extra: str, steps: int = 200, device: str = "cpu"
) -> int:
    return train.main(
        [
            "--env",
            env_id,
            "--task",
            TASKS[env_id],
            "--timesteps",
            str(steps),
            "--device",
            device,
            "--hyperparams",
            str(hp),
            "--out",
            str(out),
            *extra,
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_training_writes_a_policy_that_evaluate_loads_and_resume_continues(
    tmp_path, hyperparams, env_id
):
    out = tmp_path / "run"
    assert _train(hyperparams, out, env_id, "--bc-episodes", "2", "--bc-rounds", "2") == 0
    policy = out / "policy.zip"
    config = read_policy_config(policy)
    steps = config["extra"]["num_timesteps"]
    assert steps >= 200
    assert config["extra"]["env_kwargs"]["image_size"] == 64
    assert (out / "config.yaml").is_file() and list((out / "tb").rglob("events.*"))
    assert list((out / "checkpoints").glob("policy_*.zip"))
    with zipfile.ZipFile(policy) as z:
        assert set(z.namelist()) == {"config.json", "weights.npz"}
    rounds = yaml.safe_load((out / "config.yaml").read_text())["notes"]["imitation_rounds"]
    assert [r["behaviour"] for r in rounds] == ["oracle + noise", "policy + noise"]
    assert rounds[1]["samples"] > rounds[0]["samples"] > 0  # DAgger pools its rounds
    evaluations = [
        json.loads(x) for x in (out / "eval" / "evaluations.jsonl").read_text().splitlines()
    ]
    assert evaluations[0]["timesteps"] == 0 and evaluations[-1]["timesteps"] == steps
    assert all(0.0 <= e["success_rate"] <= 1.0 and e["wall_s"] > 0 for e in evaluations)
    assert read_policy_config(out / "best_policy.zip")["extra"]["held_out_eval"] in evaluations

    # evaluate.py takes the env and task from the policy file when none is named
    argv = ["--agent", str(policy), "--episodes", "1", "--out", str(tmp_path / "eval")]
    assert evaluate.main([*argv, "--patient-seed", "500", "--n-patients", "1"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {(r["env_id"], r["task"]) for r in summary["results"]} == {(env_id, TASKS[env_id])}

    assert (
        _train(
            hyperparams,
            tmp_path / "resumed",
            env_id,
            "--resume",
            str(policy),
            steps=100,
            device="auto",
        )
        == 0
    )
    resumed = read_policy_config(tmp_path / "resumed" / "policy.zip")
    assert resumed["extra"]["num_timesteps"] > steps


def test_unknown_algorithm_is_a_clear_error(hyperparams, tmp_path, capsys):
    assert _train(hyperparams, tmp_path, ENV_IDS[0], "--algo", "dqn") == 2
    assert "unknown algorithm 'dqn'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--bc-rounds", "0", "--bc-rounds must be at least 1, got 0"),
        ("--bc-episodes", "-1", "--bc-episodes must be at least 0, got -1"),
        ("--bc-epochs", "0", "--bc-epochs must be at least 1, got 0"),
        ("--bc-noise", "-0.5", "--bc-noise must lie in [0, 2], got -0.5"),
        ("--timesteps", "0", "--timesteps must be at least 1, got 0"),
    ],
)
def test_bad_imitation_settings_are_clear_errors(
    hyperparams, tmp_path, capsys, flag, value, message
):
    assert _train(hyperparams, tmp_path / "run", ENV_IDS[0], flag, value) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_returns_to_go_are_discounted_sums():
    from sonoray.agents.training import _returns_to_go

    assert _returns_to_go([1.0, 0.0, 2.0], 0.5) == [1.5, 1.0, 2.0]
    assert _returns_to_go([], 0.9) == []


def test_malformed_yaml_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "hp.yaml"
    bad.write_text("sonoray/XRayPositioning-v0: {ppo: [unclosed")
    assert _train(bad, tmp_path, ENV_IDS[0]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({ENV_IDS[0]: {"ppo": {"learning_rat": 0.1}}}))
    assert _train(bad, tmp_path, ENV_IDS[0]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_unknown_env_task_and_preset_are_clear_errors(hyperparams, tmp_path, capsys):
    assert train.main(["--env", "sonoray/Nope-v0", "--out", str(tmp_path)]) == 2
    assert "unknown env id" in capsys.readouterr().err
    assert train.main(["--env", ENV_IDS[0], "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert _train(hyperparams, tmp_path, ENV_IDS[0], "--preset", "nope") == 2
    assert "unknown preset" in capsys.readouterr().err


def test_shipped_hyperparameters_cover_every_env_and_algorithm():
    from sonoray.agents.training import DEFAULT_HYPERPARAMS, load_hyperparams

    for env_id in ENV_IDS:
        for algo in ("ppo", "sac"):
            hp = load_hyperparams(DEFAULT_HYPERPARAMS, env_id, algo, "easy")
            assert hp["env_kwargs"]["image_size"] == 64


def test_existing_output_folder_is_refused(hyperparams, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("earlier run\n")
    assert _train(hyperparams, out, ENV_IDS[0]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "earlier run\n"


def test_resume_of_a_policy_for_another_env_or_a_damaged_file_is_refused(
    hyperparams, tmp_path, capsys
):
    xray = Path(__file__).parents[1] / "agents" / "policies" / "xray_chest_ap.zip"
    assert _train(hyperparams, tmp_path / "a", ENV_IDS[1], "--resume", str(xray)) == 2
    assert f"was trained on {ENV_IDS[0]}, not {ENV_IDS[1]}" in capsys.readouterr().err
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(xray.read_bytes()[:5000])
    assert _train(hyperparams, tmp_path / "b", ENV_IDS[0], "--resume", str(truncated)) == 2
    assert "damaged or truncated" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
