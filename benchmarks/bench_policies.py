"""Evaluate the shipped policies against the random agent on held-out patients.

    python benchmarks/bench_policies.py                     # every agents/policies/*.zip
    SONORAY_CHEST_CT=DIR python benchmarks/bench_policies.py --episodes 100

For each policy file: ``evaluate.py`` runs it and the random agent on the task and
preset it was trained on, over ``--episodes`` seeded episodes on a phantom pool that
no training or validation run used (``--patient-seed``; training used phantoms 0-7,
validation 1000-1007), and, with the example CT, on that CT (a patient no run saw).
Writes ``benchmarks/results/policies.json`` and ``policies.md`` (success with 95%
Wilson intervals, the lead over random, median steps) and keeps each run's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_info import describe_machine  # noqa: E402

POLICIES = ROOT / "agents" / "policies"
RESULTS = ROOT / "benchmarks" / "results"
HELD_OUT_PATIENT_SEED = 2000
EVAL_SEED = 7


def evaluate(policy: Path, config: dict, patients: str, episodes: int, out: Path) -> dict:
    """Run evaluate.py on one policy and the random agent; return their summary rows."""
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--agent", str(policy), "random"]
    cmd += ["--episodes", str(episodes), "--seed", str(EVAL_SEED), "--out", str(out)]
    preset = config["extra"].get("preset")
    if preset:
        cmd += ["--preset", preset]
    if patients == "phantoms":
        cmd += ["--patient-seed", str(HELD_OUT_PATIENT_SEED), "--n-patients", "8"]
    else:
        cmd += ["--ct", patients]
    resume = ["--resume"] if (out / "episodes.jsonl").exists() else []
    print(" ".join(cmd[1:] + resume), flush=True)
    subprocess.run(cmd + resume, check=True, cwd=ROOT)
    rows = json.loads((out / "summary.json").read_text())["results"]
    for row in rows:  # name the policy as in the repository, not by this machine's path
        row["agent"] = row["agent"].replace(str(ROOT) + "/", "")
    by_agent = {("random" if r["agent"] == "random" else "policy"): r for r in rows}
    command = "python " + " ".join(
        str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[1:]
    )
    return {
        "policy": policy.name,
        "env_id": config["env_id"],
        "task": config["task"],
        "preset": preset or "default",
        "patients": "held-out phantoms" if patients == "phantoms" else "example CT",
        "trained_steps": config["extra"].get("num_timesteps"),
        "policy_result": by_agent["policy"],
        "random_result": by_agent["random"],
        "lead_points": 100
        * (by_agent["policy"]["success_rate"] - by_agent["random"]["success_rate"]),
        "command": command.replace(patients, "$SONORAY_CHEST_CT")
        if patients != "phantoms"
        else command,
    }


def _cell(result: dict) -> str:
    low, high = result["success_ci95"]
    return f"{100 * result['success_rate']:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        "# Shipped policies against the random agent",
        "",
        f"`python benchmarks/bench_policies.py` on {machine.get('description', machine)}.",
        "Success with its 95% Wilson interval over the episodes on patients no training run",
        "saw; lead = policy minus random, in percentage points.",
        "",
        "| policy | task | preset | patients | episodes | policy success | random success "
        "| lead (points) | policy median steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p, q = r["policy_result"], r["random_result"]
        lines.append(
            f"| {r['policy']} | {r['task']} | {r['preset']} | {r['patients']} | {p['episodes']} "
            f"| {_cell(p)} | {_cell(q)} | {r['lead_points']:+.0f} | {p['median_steps']:g} |"
        )
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=100, help="episodes per agent and setting")
    p.add_argument("--ct", default=os.environ.get("SONORAY_CHEST_CT"), help="example CT folder")
    p.add_argument("--policies", nargs="+", default=None, help="policy files (default: shipped)")
    p.add_argument("--out", default="runs/bench_policies", help="folder of the evaluate runs")
    args = p.parse_args(argv)
    from sonoray.agents.policy_io import read_policy_config

    policies = [Path(x) for x in args.policies] if args.policies else sorted(POLICIES.glob("*.zip"))
    if not policies:
        print(f"bench_policies.py: error: no policy files in {POLICIES}", file=sys.stderr)
        return 2
    rows = []
    for policy in policies:
        config = read_policy_config(policy)
        settings = ["phantoms"] + ([args.ct] if args.ct else [])
        for patients in settings:
            tag = "phantoms" if patients == "phantoms" else "ct"
            out = Path(args.out) / f"{policy.stem}_{tag}"
            rows.append(evaluate(policy.resolve(), config, patients, args.episodes, out))
    machine = describe_machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "policies.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n"
    )
    text = markdown(rows, machine)
    (RESULTS / "policies.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
