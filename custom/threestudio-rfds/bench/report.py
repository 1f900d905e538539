"""Markdown report and plots of a results folder (``suite.json``, ``ledger.jsonl``, ``scores.json``).

Writes ``report.md`` (per-config summary, per prompt × config table of CLIP score, R-precision,
wall time and peak GPU memory averaged over seeds, failed runs with their errors) and
``plots/score_per_prompt.png``, ``plots/score_vs_time.png`` (matplotlib, Agg backend).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np

from .ledger import Ledger

GIB = 1024**3


def _mean(xs: List[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def collect(out_dir: str) -> Dict[str, object]:
    """Join the ledger's finished runs with their scores (if scored)."""
    suite_file = os.path.join(out_dir, "suite.json")
    if not os.path.exists(suite_file):
        raise FileNotFoundError(f"{out_dir} has no suite.json: is it an `rfds-bench run` results folder?")
    with open(suite_file) as f:
        suite = json.load(f)
    scores_file = os.path.join(out_dir, "scores.json")
    scores = {}
    if os.path.exists(scores_file):
        with open(scores_file) as f:
            scores = json.load(f)
    rows = []
    for rid, rec in sorted(Ledger(os.path.join(out_dir, "ledger.jsonl")).state().items()):
        s = scores.get("runs", {}).get(rid, {})
        mem = rec.get("peak_mem_allocated_bytes")
        rows.append({"run_id": rid, "status": rec["status"], "config": rec.get("config"), "prompt": rec.get("prompt"),
                     "seed": rec.get("seed"), "wall_time_s": rec.get("wall_time_s"),
                     "peak_mem_gib": None if mem is None else mem / GIB, "clip_score": s.get("clip_score"),
                     "r_precision": s.get("r_precision"), "n_views": s.get("n_views"), "error": rec.get("error")})
    return {"suite": suite, "scores": scores, "rows": rows}


def markdown(data: Dict[str, object]) -> str:
    suite, rows, scores = data["suite"], data["rows"], data["scores"]
    done = [r for r in rows if r["status"] == "done"]
    configs = [c["label"] for c in suite["configs"]]
    lines = [f"# Benchmark report: {suite['name']}", ""]
    if suite.get("description"):
        lines += [suite["description"].strip(), ""]
    lines += [f"{len(suite['prompts'])} prompts × {len(configs)} configs × seeds {suite['seeds']}; "
              f"{len(done)} runs done, {sum(r['status'] == 'failed' for r in rows)} failed, "
              f"{sum(r['status'] in ('started', 'interrupted') for r in rows)} unfinished.", ""]
    if scores:
        lines += [f"CLIP model `{scores['clip_model']}`, panel `{scores['panel']}`; CLIP score = 100·max(cos, 0), "
                  "R-precision = top-1 retrieval of the run's prompt among the suite's prompts, both averaged "
                  "over test views, then over seeds."
                  + ("" if scores.get("r_precision_informative", True) else
                     " **R-precision is 1 by construction: the suite has one prompt.**"), ""]
    else:
        lines += ["Not scored yet (run `rfds-bench score`).", ""]
    lines += ["## Per config", "", "| config | runs done | CLIP score | R-precision | wall time (min) | peak GPU mem (GiB) |",
              "|---|---|---|---|---|---|"]
    for c in configs:
        rs = [r for r in done if r["config"] == c]
        lines.append(f"| {c} | {len(rs)} | {_fmt(_mean([r['clip_score'] for r in rs]), '.2f')} | "
                     f"{_fmt(_mean([r['r_precision'] for r in rs]), '.3f')} | "
                     f"{_fmt(_mean([r['wall_time_s'] / 60 for r in rs if r['wall_time_s'] is not None]), '.1f')} | "
                     f"{_fmt(_mean([r['peak_mem_gib'] for r in rs]), '.2f')} |")
    lines += ["", "## Per prompt", "", "| prompt | config | seeds | CLIP score | R-precision | wall time (min) | peak GPU mem (GiB) |",
              "|---|---|---|---|---|---|---|"]
    for p in suite["prompts"]:
        for c in configs:
            rs = [r for r in done if r["config"] == c and r["prompt"] == p]
            if not rs:
                continue
            lines.append(f"| {p.replace('|', '/')} | {c} | {len(rs)} | {_fmt(_mean([r['clip_score'] for r in rs]), '.2f')} | "
                         f"{_fmt(_mean([r['r_precision'] for r in rs]), '.3f')} | "
                         f"{_fmt(_mean([r['wall_time_s'] / 60 for r in rs]), '.1f')} | "
                         f"{_fmt(_mean([r['peak_mem_gib'] for r in rs]), '.2f')} |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", "", "| run | prompt | error |", "|---|---|---|"]
        lines += [f"| {r['run_id']} | {str(r['prompt']).replace('|', '/')} | {str(r['error']).replace('|', '/')} |"
                  for r in failed]
    return "\n".join(lines) + "\n"


def plots(data: Dict[str, object], plot_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = data["suite"]
    done = [r for r in data["rows"] if r["status"] == "done" and r["clip_score"] is not None]
    if not done:
        return []
    os.makedirs(plot_dir, exist_ok=True)
    configs = [c["label"] for c in suite["configs"]]
    prompts = [p for p in suite["prompts"] if any(r["prompt"] == p for r in done)]
    by = defaultdict(list)
    for r in done:
        by[(r["config"], r["prompt"])].append(r["clip_score"])

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(prompts) * max(1, len(configs))), 4.5))
    width = 0.8 / len(configs)
    x = np.arange(len(prompts))
    for i, c in enumerate(configs):
        ys = [np.mean(by[(c, p)]) if by[(c, p)] else np.nan for p in prompts]
        ax.bar(x + (i - (len(configs) - 1) / 2) * width, ys, width, label=c)
    ax.set_xticks(x)
    ax.set_xticklabels([p if len(p) <= 28 else p[:26] + "…" for p in prompts], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("CLIP score (mean over views, seeds)")
    ax.set_title(f"{suite['name']}: CLIP score per prompt")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = [os.path.join(plot_dir, "score_per_prompt.png")]
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in configs:
        rs = [r for r in done if r["config"] == c and r["wall_time_s"] is not None]
        if rs:
            ax.scatter([r["wall_time_s"] / 60 for r in rs], [r["clip_score"] for r in rs], label=c, alpha=0.7)
    ax.set_xlabel("wall time per run (min)")
    ax.set_ylabel("CLIP score")
    ax.set_title(f"{suite['name']}: score vs time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(os.path.join(plot_dir, "score_vs_time.png"))
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out


def write_report(out_dir: str) -> Dict[str, object]:
    data = collect(out_dir)
    md = markdown(data)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(md)
    return {"report": path, "plots": plots(data, os.path.join(out_dir, "plots")), "markdown": md}
