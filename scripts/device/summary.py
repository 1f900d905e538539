"""The table printed at the end of scripts/device/run.sh, from the JSON lines under the output folder."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from phases import SD3_PEAK_GIB, TARGET_MS


def _read(folder: str, name: str) -> List[Dict]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def render(folder: str, elapsed_s: float) -> str:
    lines = [f"== summary ({elapsed_s:.0f} s) =="]
    env = next((r for r in _read(folder, "phases.jsonl") if r.get("phase") == "env"), {})
    lines.append(f"device: {env.get('gpu', 'cpu')}  torch {env.get('torch')}  diffusers {env.get('diffusers')}  "
                 f"torchao {env.get('torchao')}")
    lines.append("step (median (min) ms, peak GiB, warm-up s per resolution) vs target:")
    for r in _read(folder, "step.jsonl"):
        if "skipped" in r:
            lines.append(f"  {r.get('model')} [{r.get('label')}]: skipped: {r['skipped']}")
            continue
        if "progress" in r:  # warm-up seconds so far of a case (its full line follows unless it was cut)
            lines.append(f"  {r['progress']:<19} [{r.get('label', '')}] warm-up so far {r['warmup_s']}")
            continue
        target = TARGET_MS.get(r["case"])
        ok = "meets" if target and r["median_ms"] <= target else "misses"
        peak = r.get("peak_mem_with_build_gib")
        extra = f" fp8 err {r['fp8_velocity_rel_err']}" if "fp8_velocity_rel_err" in r else ""
        mem = "" if peak is None or not r["case"].startswith("sd3") else (
            f" (≤ {SD3_PEAK_GIB} GiB: {'yes' if peak <= SD3_PEAK_GIB else 'no'})")
        lines.append(f"  {r['case']:<19} [{r.get('label', '')}] {r['median_ms']:.1f} ({r['min_ms']:.1f}) ms, "
                     f"encode/flow/backward {r.get('encode_ms')}/{r.get('flow_ms')}/{r.get('backward_ms')}, "
                     f"peak {peak}{mem}, warm-up {r.get('warmup_s')}{extra} — {ok} {target} ms")
    lines.append("threestudio launch.py --train (s/iteration per render height, peak GiB):")
    for r in _read(folder, "train.jsonl"):
        lines.append(f"  {r['config']:<30} rc={r['returncode']} steps {r['steps_done']}/{r['max_steps']} "
                     f"s/it {r['s_per_it']} peak {r['peak_gib']} nerfacc={r['nerfacc']} ({r['wall_s']} s)")
    for r in _read(folder, "phases.jsonl"):
        if "status" in r and r["status"] != "ok":
            lines.append(f"  phase {r['phase']}: {r['status']}")
    return "\n".join(lines) + "\n"
