"""``rfds-bench status OUT``: where every run of a results folder stands.

States: ``done``, ``failed``, ``running`` (its owner is alive), ``lost`` (recorded started, but its
owner is gone: the next ``run`` reruns it), ``interrupted``, ``queued`` (submitted to SLURM, not
started; with SLURM's own state where sacct answers), ``not started``.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any, Dict, List

from . import logs
from .ledger import Ledger
from .owner import Heartbeat, Owner, me, owner_alive
from .paths import check_results, local_path
from .scheduler import fmt_duration
from .suite import Suite

ORDER = ("done", "failed", "running", "queued", "lost", "interrupted", "not started")


def collect_status(out_dir: str) -> Dict[str, Any]:
    with open(check_results(out_dir), encoding="utf-8") as f:
        d = json.load(f)
    suite = Suite.from_dict({k: v for k, v in d.items() if k != "digest"})
    state = Ledger(os.path.join(out_dir, "ledger.jsonl")).state()
    from .slurm import submitted, task_states

    queued = {rid for rec in submitted(out_dir) for rid in rec.get("runs", [])}
    sched = task_states(out_dir)
    probe = Heartbeat(out_dir, me())
    rows: List[Dict[str, Any]] = []
    try:
        for run in suite.runs():
            rec = state.get(run.run_id, {})
            st = rec.get("status")
            detail = ""
            if st == "started":
                alive = owner_alive(out_dir, Owner.from_dict(rec.get("owner")), probe)
                st = "running" if alive else "lost"
                where = f"{rec['gpu']} on {rec['host']}" if rec.get("host") else "(an older runner, no owner recorded)"
                if alive:
                    pr = logs.progress(local_path(out_dir, rec["log"])) if rec.get("log") else None
                    step = f"step {pr[0]}/{pr[1]}" if pr else "starting"
                    detail = f"{where}, {step}, {fmt_duration(time.time() - rec.get('start_time', time.time()))}"
                else:
                    detail = f"{where}: its runner is gone; the next `rfds-bench run` reruns it"
            elif st == "failed":
                detail = str(rec.get("error"))
            elif st == "interrupted":
                detail = str(rec.get("reason", ""))
            elif st is None:
                st = "queued" if run.run_id in queued else "not started"
                if run.run_id in sched:
                    detail = f"SLURM: {sched[run.run_id]}"
            rows.append({"run_id": run.run_id, "state": st, "detail": detail})
    finally:
        probe.remove()
    return {"suite": suite.name, "rows": rows, "counts": Counter(r["state"] for r in rows)}


def print_status(out_dir: str) -> int:
    s = collect_status(out_dir)
    c = s["counts"]
    print(f"{s['suite']}: " + ", ".join(f"{c[k]} {k}" for k in ORDER if c[k]) + f" (of {len(s['rows'])})")
    for k in ("running", "failed", "lost", "interrupted", "queued"):
        for r in (r for r in s["rows"] if r["state"] == k):
            print(f"  {k:<11} {r['run_id']}" + (f": {r['detail']}" if r["detail"] else ""))
    return 0
