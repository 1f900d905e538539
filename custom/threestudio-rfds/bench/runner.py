"""Run a suite through threestudio's ``launch.py``, one subprocess per (config, prompt, seed), on this
machine's GPUs (bench/scheduler.py) or as a SLURM job array (bench/slurm.py).

Layout of the results folder OUT (docs/tools.md)::

    OUT/suite.json                         the suite that was run (+ digest)
    OUT/ledger.jsonl                       resume-safe run ledger (bench/ledger.py)
    OUT/runs/<label>/<tag>/                threestudio's trial dir: exp_root_dir=OUT/runs, name=<label>,
                                           tag=<prompt-slug>-<hash6>-s<seed>, use_timestamp=false
    OUT/runs/<label>/<tag>/save/it<N>-test/<view>.png    threestudio's test renders
    OUT/logs/<label>/<tag>.log, .stats.json               child stdout+stderr, memwrap's peak memory

Each launch is ``<python> memwrap.py <stats> launch.py --config C --train --gpu G
system.prompt_processor.prompt='P' seed=S exp_root_dir=… name=… tag=… use_timestamp=false <overrides>``
with cwd = the threestudio checkout.  Wall time is measured by the scheduler around the subprocess;
paths in the ledger are relative to OUT.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from ..atomic import write_json
from .executors import EXECUTORS, Executor, LocalExecutor, parse_gpus
from .ledger import Ledger
from .owner import STALE_AFTER
from .scheduler import RunSpec, Slot
from .suite import Run, Suite, SuiteError, suite_digest

MEMWRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memwrap.py")
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


def read_stats(path: str) -> Dict[str, object]:
    """memwrap's stats file, or {} if the child died before writing it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def check_out_dir(out_dir: str, suite: Suite, allow_other_suite: bool = False) -> None:
    """Refuse to mix two different suites in one results folder (resume needs the same suite)."""
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
    gpus: Optional[str] = None,
    executor: str = "local",
    executor_options: Optional[Dict[str, Any]] = None,
    progress_every: float = 60.0,
    grace: float = 10.0,
    stale_after: float = STALE_AFTER,
) -> Dict[str, int]:
    """Run (or, with ``executor="slurm"``, submit) every run of ``suite`` not yet done; returns counts
    {planned, done, failed, skipped (done earlier), failed_earlier, running_elsewhere[, submitted]}.
    ``gpus`` ("0,1,3" or "all") runs one launch per GPU at a time; without it every launch gets ``--gpu gpu``."""
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0 and timeout < float("inf")):
        raise SuiteError(f"--timeout must be a number of seconds > 0, got {timeout!r}")
    if executor not in EXECUTORS:
        raise SuiteError(f"--executor must be one of {sorted(EXECUTORS)}, got {executor!r}")
    if gpus and executor != "local":
        raise SuiteError(f"--gpus {gpus} is for --executor local; with --executor {executor} use --gpus-per-task")
    python = python or sys.executable
    threestudio = os.path.abspath(threestudio)
    out_dir = os.path.abspath(out_dir)  # the child runs in the threestudio checkout
    if not (shutil.which(python) or (os.path.isfile(python) and os.access(python, os.X_OK))):
        raise SuiteError(f"--python {python!r} is not an executable; pass the threestudio environment's python")
    if not os.path.isfile(os.path.join(threestudio, "launch.py")):
        raise SuiteError(f"--threestudio {threestudio!r} has no launch.py; pass the threestudio checkout")
    if executor == "local":
        slots = parse_gpus(gpus) if gpus else [Slot(f"gpu{gpu}", {}, gpu)]
        ex: Executor = LocalExecutor(slots, progress_every=progress_every)
    else:
        opts = {**suite.slurm, **(executor_options or {})}  # the command line wins over the suite
        opts["sbatch"] = {**suite.slurm.get("sbatch", {}), **(executor_options or {}).get("sbatch", {})}
        ex = EXECUTORS[executor](**opts)
        slots = [Slot("task", {}, "0")]
    runs = suite.runs()
    cmds = {r.run_id: build_command(r, suite, out_dir, threestudio, python, slots[0].launch_gpu, extra_overrides)
            for r in runs}  # resolves every config now: a missing one stops the suite before any launch
    counts = {"planned": len(runs), "skipped": 0, "done": 0, "failed": 0, "failed_earlier": 0, "running_elsewhere": 0}

    if dry_run:
        state = Ledger(os.path.join(out_dir, "ledger.jsonl")).state()
        skip_status = ("done", "failed") if not retry_failed else ("done",)
        if gpus:
            log(f"# one launch at a time per GPU, each with CUDA_VISIBLE_DEVICES set to one of: "
                f"{', '.join(s.env['CUDA_VISIBLE_DEVICES'] for s in slots)}")
        for r in runs:
            st = state.get(r.run_id, {}).get("status")
            mark = f"[skip: {st}] " if st in skip_status else ""
            log(f"{mark}{r.run_id}\n  cd {shlex.quote(threestudio)} && {shlex.join(cmds[r.run_id])}")
        return counts

    check_out_dir(out_dir, suite)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "suite.json"), {**suite.to_dict(), "digest": suite_digest(suite)}, sort_keys=True)
    spec = RunSpec(suite, out_dir, threestudio, python, timeout, list(extra_overrides or []), retry_failed, grace,
                   stale_after)
    return {**counts, **ex.run(spec, runs, log)}
