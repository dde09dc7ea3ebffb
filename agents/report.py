"""The evaluation report: a self-contained HTML page and the PNGs it shows.

Figures: success rate per (env, task, agent) with Wilson 95% intervals, mean
image-quality score against step, and a strip of final images from successful
and failed episodes. Every string embedded in the page is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SAMPLES_PER_OUTCOME = 4

TABLE_COLUMNS = (
    ("env_id", "env"),
    ("task", "task"),
    ("agent", "agent"),
    ("episodes", "episodes"),
    ("success_rate", "success"),
    ("success_ci95", "95% CI"),
    ("mean_score", "mean score"),
    ("median_steps", "median steps"),
    ("mean_dose_dap_mgy_cm2", "dose DAP (mGy cm2)"),
    ("max_peak_force_n", "peak force (N)"),
    ("safety_violations", "safety violations"),
)


def format_cell(key: str, value) -> str:
    """Text of one summary value as shown in tables."""
    if value is None:
        return "-"
    if key == "success_rate":
        return f"{100 * value:.0f}%"
    if key == "success_ci95":
        return f"[{100 * value[0]:.0f}, {100 * value[1]:.0f}]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def text_table(results: list[dict]) -> str:
    """The summary as a plain-text table."""
    header = [title for _, title in TABLE_COLUMNS]
    rows = [[format_cell(k, r.get(k)) for k, _ in TABLE_COLUMNS] for r in results]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def _label(r: dict) -> str:
    return f"{r['env_id'].split('/')[-1]} {r['task']} {Path(r['agent']).name}"


def _success_chart(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(results) + 1.2))
    y = np.arange(len(results))
    rates = np.array([r["success_rate"] for r in results])
    lo = rates - np.array([r["success_ci95"][0] for r in results])
    hi = np.array([r["success_ci95"][1] for r in results]) - rates
    ax.barh(y, rates, xerr=[np.maximum(lo, 0), np.maximum(hi, 0)], color="#4c78a8", capsize=3)
    ax.set_yticks(y, [_label(r) for r in results], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("success rate (95% Wilson interval)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _score_curves(records: list[dict], path: Path) -> None:
    """One panel per env: colour by task, line style by agent (scripted solid)."""
    groups: dict[str, dict[tuple[str, str], list[list[float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in records:
        trace = [s for s in r.get("score_trace", []) if s is not None]
        if trace:
            groups[r["env_id"]][(r["task"], Path(r["agent"]).name)].append(trace)
    envs = sorted(groups) or [""]
    fig, axes = plt.subplots(len(envs), 1, figsize=(9, 3.2 * len(envs)), squeeze=False)
    styles = {"scripted": "-", "random": "--"}
    for ax, env_id in zip(axes[:, 0], envs, strict=True):
        tasks = sorted({task for task, _ in groups[env_id]})
        for (task, agent), traces in sorted(groups[env_id].items()):
            n = max(len(t) for t in traces)
            padded = np.array([t + [t[-1]] * (n - len(t)) for t in traces])  # hold the final
            ax.plot(
                np.arange(n),
                padded.mean(0),
                styles.get(agent, ":"),
                color=plt.cm.tab10(tasks.index(task) % 10),
                label=f"{task} {agent}",
            )
        ax.set_title(env_id, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mean overall score")
        ax.set_ylim(0, 1)
        if groups[env_id]:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _embed(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def write_report(out_dir: Path, records: list[dict], results: list[dict], provenance: dict) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; return the page's path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    chart, curves = fig_dir / "success_rates.png", fig_dir / "score_vs_step.png"
    _success_chart(results, chart)
    _score_curves(records, curves)

    e = html.escape
    head = "".join(f"<th>{e(title)}</th>" for _, title in TABLE_COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{e(format_cell(k, r.get(k)))}</td>" for k, _ in TABLE_COLUMNS)
        + "</tr>"
        for r in results
    )
    prov = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in provenance.items()
    )
    strips = []
    for r in results:
        group = [
            x
            for x in records
            if (x["env_id"], x["task"], x["agent"]) == (r["env_id"], r["task"], r["agent"])
        ]
        cells = []
        for outcome in (True, False):
            picked = [
                x for x in sorted(group, key=lambda x: x["episode"]) if x["success"] == outcome
            ][:SAMPLES_PER_OUTCOME]
            for x in picked:
                img = out_dir / x["image"]
                if img.is_file():
                    caption = f"ep {x['episode']} {'success' if outcome else 'failure'}"
                    cells.append(
                        f"<figure>{_embed(img)}<figcaption>{e(caption)}</figcaption></figure>"
                    )
        strips.append(f"<h3>{e(_label(r))}</h3><div class='strip'>{''.join(cells)}</div>")

    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>sonoray evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}.strip{{display:flex;flex-wrap:wrap}}
figure{{margin:4px}}figure img{{width:128px;image-rendering:pixelated}}
figcaption{{font-size:11px}}</style></head><body>
<h1>sonoray evaluation</h1>
<h2>Results</h2><table><tr>{head}</tr>{body}</table>
<h2>Success rates</h2>{_embed(chart)}
<h2>Image quality against step</h2>{_embed(curves)}
<h2>Sample final images</h2>{"".join(strips)}
<h2>Provenance</h2><table>{prov}</table>
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
