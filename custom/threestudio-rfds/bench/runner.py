"""Run a suite through threestudio's ``launch.py``, one subprocess per (config, prompt, seed).

Layout of the results folder OUT (docs/tools.md)::

    OUT/suite.json                         the suite that was run (+ digest)
    OUT/ledger.jsonl                       resume-safe run ledger (bench/ledger.py)
    OUT/runs/<label>/<tag>/                threestudio's trial dir: exp_root_dir=OUT/runs, name=<label>,
                                           tag=<prompt-slug>-s<seed>, use_timestamp=false
    OUT/runs/<label>/<tag>/save/it<N>-test/<view>.png    threestudio's test renders
    OUT/logs/<label>/<tag>.log, .stats.json               child stdout+stderr, memwrap's peak memory

Each launch is ``<python> memwrap.py <stats> launch.py --config C --train --gpu G
system.prompt_processor.prompt='P' seed=S exp_root_dir=… name=… tag=… use_timestamp=false <overrides>``
with cwd = the threestudio checkout.  Wall time is measured here around the subprocess.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..atomic import write_json
from .ledger import Ledger
from .suite import Run, Suite, SuiteError, suite_digest

MEMWRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memwrap.py")
LOG_TAIL_LINES = 40
_TEST_DIR = re.compile(r"^it(\d+)-test$")


def yaml_quote(value: str) -> str:
    """A YAML single-quoted scalar, so OmegaConf's dotlist parser keeps the value a plain string
    (a prompt such as ``a cat: cute`` or ``[draft] vase`` would otherwise parse as a mapping/list)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass
class RunPaths:
    tag: str
    trial_dir: str
    log: str
    stats: str


def run_paths(out_dir: str, run: Run) -> RunPaths:
    tag = f"{run.slug}-s{run.seed}"
    return RunPaths(
        tag=tag,
        trial_dir=os.path.join(out_dir, "runs", run.config.label, tag),
        log=os.path.join(out_dir, "logs", run.config.label, tag + ".log"),
        stats=os.path.join(out_dir, "logs", run.config.label, tag + ".stats.json"),
    )


def resolve_config(path: str, threestudio: str, suite: Suite) -> str:
    """An absolute config path: as given, else relative to the threestudio checkout, else to the
    repository holding the suite file (its parent's parent), else to the current directory."""
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(threestudio, path)]
        if suite.source:
            candidates.append(os.path.join(os.path.dirname(os.path.dirname(suite.source)), path))
        candidates.append(os.path.abspath(path))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise SuiteError(f"config {path!r} not found; looked at {candidates}")


def build_command(run: Run, suite: Suite, out_dir: str, threestudio: str, python: str, gpu: str = "0",
                  extra_overrides: Optional[List[str]] = None) -> List[str]:
    p = run_paths(out_dir, run)
    config = resolve_config(run.config.path, threestudio, suite)
    return [
        python, MEMWRAP, p.stats, os.path.join(threestudio, "launch.py"),
        "--config", config, "--train", "--gpu", gpu,
        f"system.prompt_processor.prompt={yaml_quote(run.prompt)}",
        f"seed={run.seed}",
        f"exp_root_dir={yaml_quote(os.path.join(os.path.abspath(out_dir), 'runs'))}",
        f"name={run.config.label}",
        f"tag={p.tag}",
        "use_timestamp=false",
        *suite.overrides, *run.config.overrides, *(extra_overrides or []),
    ]


def find_test_renders(trial_dir: str) -> Dict[str, object]:
    """The test renders of the last step: ``save/it<N>-test/*.png`` with the largest N, views sorted
    by their numeric name (threestudio names them by the test batch index)."""
    save = os.path.join(trial_dir, "save")
    best = None
    if os.path.isdir(save):
        for d in os.listdir(save):
            m = _TEST_DIR.match(d)
            if m and os.path.isdir(os.path.join(save, d)) and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), d)
    if best is None:
        return {"step": None, "renders_dir": None, "renders": []}
    d = os.path.join(save, best[1])
    pngs = [f for f in os.listdir(d) if f.lower().endswith(".png")]
    pngs.sort(key=lambda f: (0, int(f[:-4])) if f[:-4].isdigit() else (1, f))
    return {"step": best[0], "renders_dir": d, "renders": pngs}


def log_tail(path: str, n: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _read_stats(path: str) -> Dict[str, object]:
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def check_out_dir(out_dir: str, suite: Suite, allow_other_suite: bool = False) -> None:
    """Refuse to mix two different suites in one results folder (resume needs the same suite)."""
    import json

    path = os.path.join(out_dir, "suite.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    if old.get("name") != suite.name and not allow_other_suite:
        raise SuiteError(
            f"{out_dir} holds results of suite {old.get('name')!r}, not {suite.name!r}; use another --out"
        )


def run_suite(
    suite: Suite,
    threestudio: str,
    out_dir: str,
    *,
    python: Optional[str] = None,
    gpu: str = "0",
    dry_run: bool = False,
    retry_failed: bool = False,
    timeout: Optional[float] = None,
    extra_overrides: Optional[List[str]] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, int]:
    """Run every run of ``suite`` not yet done; returns counts {done, failed, skipped, planned}."""
    python = python or sys.executable
    threestudio = os.path.abspath(threestudio)
    out_dir = os.path.abspath(out_dir)  # the child runs in the threestudio checkout
    launch = os.path.join(threestudio, "launch.py")
    if not os.path.isfile(launch):
        raise SuiteError(f"--threestudio {threestudio!r} has no launch.py; pass the threestudio checkout")
    runs = suite.runs()
    cmds = {r.run_id: build_command(r, suite, out_dir, threestudio, python, gpu, extra_overrides) for r in runs}
    ledger = Ledger(os.path.join(out_dir, "ledger.jsonl"))
    state = ledger.state()
    skip_status = ("done", "failed") if not retry_failed else ("done",)
    counts = {"planned": len(runs), "skipped": 0, "done": 0, "failed": 0}

    if dry_run:
        for r in runs:
            st = state.get(r.run_id, {}).get("status")
            mark = f"[skip: {st}] " if st in skip_status else ""
            log(f"{mark}{r.run_id}\n  cd {shlex.quote(threestudio)} && {shlex.join(cmds[r.run_id])}")
        return counts

    check_out_dir(out_dir, suite)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "suite.json"), {**suite.to_dict(), "digest": suite_digest(suite)}, sort_keys=True)
    for i, r in enumerate(runs):
        prev = state.get(r.run_id, {}).get("status")
        if prev in skip_status:
            counts["skipped"] += 1
            continue
        log(f"[{i + 1}/{len(runs)}] {r.run_id}" + (f" (previous attempt: {prev})" if prev else ""))
        rec = _run_one(r, cmds[r.run_id], out_dir, threestudio, ledger, timeout)
        counts[rec["status"]] += 1
        if rec["status"] == "failed":
            log(f"  FAILED ({rec.get('error')}); log: {run_paths(out_dir, r).log}")
        else:
            log(f"  done in {rec['wall_time_s']:.1f}s, {rec['n_renders']} test renders")
    return counts


def _run_one(run: Run, cmd: List[str], out_dir: str, threestudio: str, ledger: Ledger,
             timeout: Optional[float]) -> Dict[str, object]:
    p = run_paths(out_dir, run)
    # a previous, unfinished attempt may have left renders: start clean (only inside OUT)
    shutil.rmtree(p.trial_dir, ignore_errors=True)
    for f in (p.stats,):
        if os.path.exists(f):
            os.remove(f)
    os.makedirs(os.path.dirname(p.log), exist_ok=True)
    info = {"config": run.config.label, "config_path": run.config.path, "prompt": run.prompt,
            "seed": run.seed, "trial_dir": p.trial_dir, "log": p.log, "cmd": cmd}
    ledger.append(run.run_id, "started", **info)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    error = None
    with open(p.log, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=threestudio, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc, error = proc.returncode, f"timed out after {timeout}s"
        except BaseException:  # KeyboardInterrupt / SystemExit: record and stop the child
            _stop(proc)
            ledger.append(run.run_id, "interrupted", wall_time_s=time.monotonic() - t0, **info)
            raise
    wall = time.monotonic() - t0
    stats = _read_stats(p.stats)
    renders = find_test_renders(p.trial_dir)
    if error is None and rc != 0:
        error = f"exit code {rc}"
    if error is None and not renders["renders"]:
        error = f"no test renders under {os.path.join(p.trial_dir, 'save')}/it<N>-test/"
    fields = dict(info, returncode=rc, wall_time_s=wall,
                  peak_mem_allocated_bytes=stats.get("cuda_max_memory_allocated"),
                  peak_mem_reserved_bytes=stats.get("cuda_max_memory_reserved"),
                  device_name=stats.get("device_name"), max_rss_bytes=stats.get("max_rss_bytes"),
                  n_renders=len(renders["renders"]), **renders)
    if error is not None:
        return ledger.append(run.run_id, "failed", error=error, log_tail=log_tail(p.log), **fields)
    return ledger.append(run.run_id, "done", **fields)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGINT (lets Lightning shut down), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
