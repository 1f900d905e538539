"""``rfds-bench status OUT [--rebuild]``: where every run of a results folder stands.

States: ``done``, ``failed``, ``running`` (its owner is alive), ``lost`` (recorded started, but its
owner is gone: the next ``run`` reruns it), ``interrupted``, ``missing`` (recorded done, but its trial
folder is gone: rerun), ``queued`` (submitted to SLURM, not started), ``not started``.  Runs submitted
to SLURM also show SLURM's state of their task (squeue; sacct where accounting is enabled).
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Dict, List

from . import logs
from .owner import Heartbeat, Owner, me, owner_alive
from .paths import local_path
from .results import Results, load_suite_file, read_suite_file
from .scheduler import fmt_duration
from .slurm import LIVE_STATES, submitted, task_states

ORDER = ("done", "failed", "running", "queued", "lost", "interrupted", "missing", "not started")


def collect_status(out_dir: str) -> Dict[str, Any]:
    suite = load_suite_file(out_dir)
    digests = read_suite_file(out_dir).get("digests", {})
    state = Results(out_dir).states()
    queued = {rid for rec in submitted(out_dir) for rid in rec.get("runs", [])}
    sched = task_states(out_dir)
    probe = Heartbeat(out_dir, me())
    rows: List[Dict[str, Any]] = []
    try:
        for run in suite.runs():
            rec = state.get(run.run_id, {})
            if rec.get("digest") and digests.get(run.run_id) and rec["digest"] != digests[run.run_id]:
                rec = {}  # a record of an earlier revision's definition of this run
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
            elif st == "missing":
                detail = f"{rec['missing']}; the next `rfds-bench run` reruns it"
            elif st is None:
                held = run.run_id not in sched or sched[run.run_id].split()[0] in LIVE_STATES
                st = "queued" if run.run_id in queued and held else "not started"
            if run.run_id in sched:
                detail += ("; " if detail else "") + f"SLURM: {sched[run.run_id]}"
            rows.append({"run_id": run.run_id, "state": st, "detail": detail})
    finally:
        probe.remove()
    return {"suite": suite.name, "rows": rows, "counts": Counter(r["state"] for r in rows)}


def print_status(out_dir: str, rebuild: bool = False) -> int:
    if rebuild:
        read_suite_file(out_dir)  # a results folder, before anything is rewritten
        r = Results(out_dir).rebuild()
        kept = f"; the old one is kept as {r['kept']}" if r["kept"] else ""
        print(f"rebuilt {out_dir}/ledger.jsonl from {r['records']} trial folder(s) of {r['runs']} run(s){kept}")
    s = collect_status(out_dir)
    c = s["counts"]
    print(f"{s['suite']}: " + ", ".join(f"{c[k]} {k}" for k in ORDER if c[k]) + f" (of {len(s['rows'])})")
    for k in ("running", "failed", "lost", "interrupted", "missing", "queued", "not started"):
        for r in (r for r in s["rows"] if r["state"] == k and (r["detail"] or k != "not started")):
            print(f"  {k:<11} {r['run_id']}" + (f": {r['detail']}" if r["detail"] else ""))
    return 0
