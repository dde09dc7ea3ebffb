"""Learning curves of train.py runs: held-out success rate and return against steps.

    python benchmarks/plot_learning_curves.py RUN_DIR [RUN_DIR ...] --out curves.png

Each run folder is one written by ``train.py --out``: its ``eval/evaluations.jsonl``
(evaluations on held-out seeds and patients) gives the curves, its ``config.yaml`` the
label and, when the run started with imitation, the success rate of each DAgger round's
rollouts. Give a run resumed from another (``--resume``) right after that one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def read_run(run: Path) -> dict:
    """Evaluations and imitation rounds of one run folder."""
    evals_path = run / "eval" / "evaluations.jsonl"
    if not evals_path.is_file():
        raise ValueError(f"{str(run)!r} has no eval/evaluations.jsonl (not a train.py run?)")
    evals = [json.loads(line) for line in evals_path.read_text().splitlines() if line.strip()]
    config = (
        yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    )
    notes = (config or {}).get("notes") or {}
    label = f"{config.get('task', run.name)} ({config.get('preset') or 'default'})"
    return {
        "label": label,
        "evals": evals,
        "rounds": notes.get("imitation_rounds") or [],
        "resumed": bool(notes.get("resumed_from")),
    }


def plot(runs: list[dict], out: Path) -> None:
    """Held-out success and return against all environment steps taken so far: the
    imitation rollouts (DAgger rounds, drawn as crosses with the success of their noisy
    rollouts on training patients) and reinforcement learning (circles, held-out
    evaluations). A run resumed from the previous one's policy continues its curve, its
    imitation steps adding to the earlier ones; any other run starts at step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    imitation_steps = 0.0  # imitation steps of this and the earlier runs
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        if not run["resumed"]:
            imitation_steps = 0.0
        first_rl = run["evals"][0]["timesteps"]
        rounds_x = []
        for r in run["rounds"]:
            imitation_steps += r["episodes"] * r["mean_steps"]
            rounds_x.append(first_rl + imitation_steps)
        if rounds_x:
            axes[0].plot(
                rounds_x,
                [100 * r["success_rate"] for r in run["rounds"]],
                "x--",
                color=colour,
                alpha=0.7,
                label=f"{run['label']}: DAgger rounds (noisy, training patients)",
            )
        steps = [e["timesteps"] + imitation_steps for e in run["evals"]]
        axes[0].plot(
            steps,
            [100 * e["success_rate"] for e in run["evals"]],
            "o-",
            color=colour,
            label=f"{run['label']}: validation, unseen patients",
        )
        axes[1].plot(
            steps, [e["mean_reward"] for e in run["evals"]], "o-", color=colour, label=run["label"]
        )
    axes[0].set(
        xlabel="environment steps (imitation rollouts + reinforcement learning)",
        ylabel="success (%)",
        ylim=(-3, 103),
        title="success rate",
    )
    axes[1].set(
        xlabel="environment steps (imitation rollouts + reinforcement learning)",
        ylabel="mean episode return",
        title="return on validation (unseen) patients",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="train.py output folders")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        runs = [read_run(Path(r)) for r in args.runs]
    except ValueError as exc:
        print(f"plot_learning_curves.py: error: {exc}", file=sys.stderr)
        return 2
    plot(runs, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
