"""Markdown report and plots of a results folder (``suite.json``, ``ledger.jsonl``, ``scores.json``).

Writes ``report.md`` (per-config summary; per prompt × config table of CLIP score, R-precision,
wall time and peak GPU memory averaged over seeds, prompts numbered as in the plots; GPU
utilisation; failed runs with the line that says why) and, with matplotlib's Agg backend,
``plots/score_per_prompt.png``, ``plots/score_vs_time.png`` (each point labelled with its prompt
number) and ``plots/gpu_timeline.png`` (which run each GPU ran when).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional

import numpy as np

from ..atomic import atomic_write
from .ledger import FINAL
from .paths import local_path
from .results import Results, read_suite_file

GIB = 1024**3
STATUS_COLOURS = {"done": "tab:green", "failed": "tab:red", "interrupted": "tab:gray"}


def _mean(xs: List[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def fmt_minutes(seconds: Optional[float]) -> str:
    """Minutes with two significant digits below 10 min (0.013, 0.25, 2.5), one decimal above."""
    if seconds is None:
        return "–"
    m = seconds / 60
    if m >= 10:
        return f"{m:.1f}"
    if m <= 0:
        return "0"
    return f"{m:.2g}" if m >= 0.001 else "<0.001"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def collect(out_dir: str) -> Dict[str, object]:
    """Join the runs' records with their scores (if scored); also every attempt's GPU time."""
    suite = read_suite_file(out_dir)
    scores_file = os.path.join(out_dir, "scores.json")
    scores = {}
    if os.path.exists(scores_file):
        with open(scores_file, encoding="utf-8") as f:
            scores = json.load(f)
    results = Results(out_dir)
    index = {p: i + 1 for i, p in enumerate(suite["prompts"])}
    digests = suite.get("digests", {})
    rows = []
    for rid, rec in sorted(results.states().items()):
        if rec.get("digest") and digests.get(rid) and rec["digest"] != digests[rid]:
            continue  # a run of an earlier revision of the suite
        s = scores.get("runs", {}).get(rid, {})
        mem = rec.get("peak_mem_allocated_bytes")
        rows.append({"run_id": rid, "status": rec["status"], "config": rec.get("config"), "prompt": rec.get("prompt"),
                     "prompt_no": index.get(rec.get("prompt")), "seed": rec.get("seed"),
                     "wall_time_s": rec.get("wall_time_s"), "gpu": rec.get("gpu"),
                     "peak_mem_gib": None if mem is None else mem / GIB, "clip_score": s.get("clip_score"),
                     "r_precision": s.get("r_precision"), "n_views": s.get("n_views"), "error": rec.get("error"),
                     "log": None if not rec.get("log") else os.path.relpath(local_path(out_dir, rec["log"]), out_dir)})
    attempts = [{"run_id": r["run_id"], "status": r["status"], "gpu": r.get("gpu") or "?",
                 "session": r.get("session") or "?", "start": r["start_time"], "end": r["end_time"],
                 "prompt_no": index.get(r.get("prompt"))}
                for r in results.ledger.records()
                if r["status"] in FINAL and isinstance(r.get("start_time"), (int, float))
                and isinstance(r.get("end_time"), (int, float))]
    return {"suite": suite, "scores": scores, "rows": rows, "attempts": attempts}


def gpu_usage(attempts: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per GPU: runs, busy seconds, and idle seconds while its runner session was going (from the
    session's first start to its last end), summed over sessions (resumes, array tasks)."""
    spans: Dict[str, List[float]] = {}
    for a in attempts:
        lo, hi = spans.get(a["session"], [a["start"], a["end"]])
        spans[a["session"]] = [min(lo, a["start"]), max(hi, a["end"])]
    by: Dict[str, Dict[str, Any]] = {}
    for a in attempts:
        g = by.setdefault(a["gpu"], {"gpu": a["gpu"], "runs": 0, "done": 0, "busy_s": 0.0, "sessions": set()})
        g["runs"] += 1
        g["done"] += a["status"] == "done"
        g["busy_s"] += a["end"] - a["start"]
        g["sessions"].add(a["session"])
    out = []
    for g in sorted(by.values(), key=lambda g: g["gpu"]):
        span = sum(spans[s][1] - spans[s][0] for s in g.pop("sessions"))
        g["idle_s"] = max(span - g["busy_s"], 0.0)
        g["utilisation"] = g["busy_s"] / span if span > 0 else None
        out.append(g)
    return out


def markdown(data: Dict[str, object]) -> str:
    suite, rows, scores = data["suite"], data["rows"], data["scores"]
    done = [r for r in rows if r["status"] == "done"]
    configs = [c["label"] for c in suite["configs"]]
    lines = [f"# Benchmark report: {suite['name']}", ""]
    if suite.get("description"):
        lines += [suite["description"].strip(), ""]
    unfinished = sum(r["status"] in ("started", "interrupted", "missing") for r in rows)
    lines += [f"{_count(len(suite['prompts']), 'prompt')} × {_count(len(configs), 'config')} × seeds {suite['seeds']}; "
              f"{_count(len(done), 'run')} done, {sum(r['status'] == 'failed' for r in rows)} failed, "
              f"{unfinished} unfinished.", ""]
    if scores:
        lines += [f"CLIP model `{scores['clip_model']}`, panel `{scores['panel']}`; CLIP score = 100·max(cos, 0), "
                  "R-precision = top-1 retrieval of the run's prompt among the suite's prompts, both averaged "
                  "over test views, then over seeds."
                  + ("" if scores.get("r_precision_informative", True) else
                     " **R-precision is 1 by construction: the suite's prompts are one class for the scorer.**"), ""]
    else:
        lines += ["Not scored yet (run `rfds-bench score`).", ""]
    lines += ["## Per config", "", "| config | runs done | CLIP score | R-precision | wall time (min) | peak GPU mem (GiB) |",
              "|---|---|---|---|---|---|"]
    for c in configs:
        rs = [r for r in done if r["config"] == c]
        lines.append(f"| {c} | {len(rs)} | {_fmt(_mean([r['clip_score'] for r in rs]), '.2f')} | "
                     f"{_fmt(_mean([r['r_precision'] for r in rs]), '.3f')} | "
                     f"{fmt_minutes(_mean([r['wall_time_s'] for r in rs]))} | "
                     f"{_fmt(_mean([r['peak_mem_gib'] for r in rs]), '.2f')} |")
    lines += ["", "## Per prompt", "", "Prompt numbers (#) label the points in `plots/`.", "",
              "| # | prompt | config | seeds | CLIP score | R-precision | wall time (min) | peak GPU mem (GiB) |",
              "|---|---|---|---|---|---|---|---|"]
    for n, p in enumerate(suite["prompts"], 1):
        for c in configs:
            rs = [r for r in done if r["config"] == c and r["prompt"] == p]
            if not rs:
                continue
            lines.append(f"| {n} | {_cell(p)} | {c} | {len(rs)} | {_fmt(_mean([r['clip_score'] for r in rs]), '.2f')} | "
                         f"{_fmt(_mean([r['r_precision'] for r in rs]), '.3f')} | "
                         f"{fmt_minutes(_mean([r['wall_time_s'] for r in rs]))} | "
                         f"{_fmt(_mean([r['peak_mem_gib'] for r in rs]), '.2f')} |")
    usage = gpu_usage(data.get("attempts", []))
    if usage:
        lines += ["", "## GPU utilisation", "",
                  "Every attempt counts (failed and interrupted ones too); idle = time a GPU waited while its "
                  "runner was going.", "",
                  "| GPU | runs | done | busy (min) | idle (min) | utilisation |", "|---|---|---|---|---|---|"]
        lines += [f"| {g['gpu']} | {g['runs']} | {g['done']} | {fmt_minutes(g['busy_s'])} | {fmt_minutes(g['idle_s'])} | "
                  f"{_fmt(None if g['utilisation'] is None else 100 * g['utilisation'], '.0f')}% |" for g in usage]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", "", "| run | # | prompt | error | log |", "|---|---|---|---|---|"]
        lines += [f"| {r['run_id']} | {r['prompt_no'] or '–'} | {_cell(r['prompt'])} | {_cell(r['error'])} | {r['log'] or '–'} |"
                  for r in failed]
    return "\n".join(lines) + "\n"


def _short(p: str, n: int = 40) -> str:
    return p if len(p) <= n else p[: n - 1] + "…"


def _save(fig, path: str) -> None:
    """PNG at 120 dpi, cropped to what is drawn (no blank margin whatever the labels' lengths)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight", pad_inches=0.1))


def plots(data: Dict[str, object], plot_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = data["suite"]
    out: List[str] = []
    os.makedirs(plot_dir, exist_ok=True)
    done = [r for r in data["rows"] if r["status"] == "done" and r["clip_score"] is not None]
    configs = [c["label"] for c in suite["configs"]]
    if done:
        prompts = [p for p in suite["prompts"] if any(r["prompt"] == p for r in done)]
        number = {p: i + 1 for i, p in enumerate(suite["prompts"])}
        by = defaultdict(list)
        for r in done:
            by[(r["config"], r["prompt"])].append(r["clip_score"])

        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(prompts) * max(1, len(configs))), 4.8))
        width = 0.8 / len(configs)
        x = np.arange(len(prompts))
        for i, c in enumerate(configs):
            ys = [np.mean(by[(c, p)]) if by[(c, p)] else np.nan for p in prompts]
            ax.bar(x + (i - (len(configs) - 1) / 2) * width, ys, width, label=c)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{number[p]}. {_short(p, 28)}" for p in prompts], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("CLIP score (mean over views, seeds)")
        ax.set_title(f"{suite['name']}: CLIP score per prompt")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(os.path.join(plot_dir, "score_per_prompt.png"))
        _save(fig, out[-1])
        plt.close(fig)

        timed = [r for r in done if r["wall_time_s"] is not None]
        in_seconds = bool(timed) and max(r["wall_time_s"] for r in timed) < 120
        scale, unit = (1.0, "s") if in_seconds else (60.0, "min")
        fig, ax = plt.subplots(figsize=(7, 4.8))
        markers = "osD^vP*X"
        for i, c in enumerate(configs):
            rs = [r for r in timed if r["config"] == c]
            if not rs:
                continue
            xs, ys = [r["wall_time_s"] / scale for r in rs], [r["clip_score"] for r in rs]
            ax.scatter(xs, ys, label=c, alpha=0.75, marker=markers[i % len(markers)])
            for r, xv, yv in zip(rs, xs, ys):
                ax.annotate(str(r["prompt_no"] or "?"), (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel(f"wall time per run ({unit})")
        ax.set_ylabel("CLIP score")
        ax.set_title(f"{suite['name']}: score vs time (labels: prompt #)")
        ax.legend(fontsize=8, title="config", title_fontsize=8)
        shown = [p for p in suite["prompts"] if any(r["prompt"] == p for r in timed)]
        # the key of prompt numbers beside the axes; the saved image is cropped to what is drawn (_save)
        ax.text(1.02, 1, "\n".join(f"{number[p]:>2}. {_short(p, 44)}" for p in shown[:30])
                + ("\n…" if len(shown) > 30 else ""), va="top", ha="left", family="monospace", fontsize=7,
                transform=ax.transAxes)
        fig.tight_layout()
        out.append(os.path.join(plot_dir, "score_vs_time.png"))
        _save(fig, out[-1])
        plt.close(fig)

    attempts = data.get("attempts", [])
    if attempts:
        t0 = min(a["start"] for a in attempts)
        span = max(a["end"] for a in attempts) - t0
        scale, unit = (1.0, "s") if span < 120 else ((60.0, "min") if span < 7200 else (3600.0, "h"))
        gpus = sorted({a["gpu"] for a in attempts})
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(gpus)))
        for y, g in enumerate(gpus):
            for a in (a for a in attempts if a["gpu"] == g):
                ax.broken_barh([((a["start"] - t0) / scale, (a["end"] - a["start"]) / scale)], (y - 0.35, 0.7),
                               facecolors=STATUS_COLOURS.get(a["status"], "tab:blue"), edgecolor="white")
                if a["prompt_no"]:
                    ax.text((a["start"] + a["end"] - 2 * t0) / 2 / scale, y, str(a["prompt_no"]), ha="center",
                            va="center", fontsize=7, color="white")
        ax.set_yticks(range(len(gpus)))
        ax.set_yticklabels(gpus, fontsize=8)
        ax.set_xlabel(f"time since the first start ({unit}); bar labels: prompt #")
        ax.set_title(f"{suite['name']}: runs per GPU (green done, red failed, grey interrupted)", fontsize=9)
        fig.tight_layout()
        out.append(os.path.join(plot_dir, "gpu_timeline.png"))
        _save(fig, out[-1])
        plt.close(fig)
    return out


def write_report(out_dir: str) -> Dict[str, object]:
    data = collect(out_dir)
    md = markdown(data)
    path = os.path.join(out_dir, "report.md")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(md)

    atomic_write(path, write)
    return {"report": path, "plots": plots(data, os.path.join(out_dir, "plots")), "markdown": md}
