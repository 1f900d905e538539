"""``--executor slurm``: the suite as a submitit job array, one array task per run.

Each task runs :func:`scheduler.execute` for its one run on one slot (the GPUs SLURM gave it), so
claiming, recording and stopping are the local code.  Results go to the results folder, which must be
on a file system all nodes share.  A task is ``submitit.helpers.Checkpointable``: on preemption or
time-out SLURM signals it, submitit requeues it (at most ``max_requeues`` times), and the requeued
task finds its earlier incarnation's ``started`` record (same array task id) and reruns the run in a
new attempt folder.  ``scancel`` / ``scontrol requeue`` send SIGTERM: the run is recorded ``interrupted``.

Job states come from ``squeue`` (what SLURM still holds) and, where accounting is enabled, ``sacct``
(how finished tasks ended); neither is needed for correctness — the records decide what is done — so a
cluster without slurmdbd works.  submitit itself reads sacct only when asked to wait for a job, so
``--wait`` polls squeue here instead.  Submitted arrays are listed in ``OUT/slurm/jobs.jsonl``.
``cluster="local"`` / ``"debug"`` are submitit's own local-subprocess / in-process executors: the
same code path without a cluster (tests, a quick check of a suite).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional

from .errors import SuiteError
from .options import SlurmOptions
from .owner import Heartbeat, me
from .results import Results
from .scheduler import INTERRUPT_REASON, RunSpec, Slot, classify, execute
from .suite import Run

try:  # optional dependency: only --executor slurm needs it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover
    _Checkpointable = object

LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
               "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING")
WAIT_POLL_S = 2.0


def _task_slot(gpus: int) -> Slot:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return Slot(f"{socket.gethostname()}:gpu{visible or '-'}", {}, ",".join(str(i) for i in range(max(gpus, 1))))


def run_task(spec: RunSpec, run_id: str, gpus_per_task: int = 1) -> str:
    """One array task: run ``run_id`` here (unless done or alive elsewhere); returns its status."""
    import signal

    runs = [r for r in spec.suite.runs() if r.run_id == run_id]
    if not runs:
        raise SuiteError(f"run {run_id!r} is not in suite {spec.suite.name!r}")
    prev = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # SLURM's SIGTERM (preemption, scancel, requeue) reaches our child too
        INTERRUPT_REASON.setdefault("why", "SIGTERM to the SLURM job (scancel, requeue or preemption)")
        if callable(prev):
            prev(signum, frame)  # submitit's own handler (it logs and waits for SIGUSR2)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        execute(runs, spec, [_task_slot(gpus_per_task)], handle_signals=False, progress_every=300.0)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, prev)
    return Results(spec.out_dir).states(runs)[run_id]["status"]


class BenchTask(_Checkpointable):
    """A picklable array task; ``checkpoint`` (submitit's) resubmits it with the same run id."""

    def __init__(self, spec: RunSpec, gpus_per_task: int):
        self.spec, self.gpus_per_task = spec, gpus_per_task

    def __call__(self, run_id: str) -> str:
        return run_task(self.spec, run_id, self.gpus_per_task)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption / time-out, just before it requeues the task and exits."""
        INTERRUPT_REASON["why"] = "preempted or timed out; requeued by submitit"
        return super().checkpoint(*args, **kwargs)


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise SuiteError("--executor slurm needs submitit: pip install 'threestudio-rfds[slurm]'") from None
    return submitit


def jobs_file(out_dir: str) -> str:
    return os.path.join(out_dir, "slurm", "jobs.jsonl")


def submitted(out_dir: str) -> List[Dict[str, Any]]:
    """The arrays ``rfds-bench run --executor slurm`` submitted into ``out_dir``, oldest first."""
    path = jobs_file(out_dir)
    if not os.path.exists(path):
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                out.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, ValueError):
                continue
    return out


def _query(cmd: List[str]) -> Optional[subprocess.CompletedProcess]:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


def _squeue(job_ids: List[str]) -> Optional[Dict[str, str]]:
    """``<job>[_<task>]`` → state of every task SLURM still holds; None where squeue cannot answer."""
    p = _query(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)])
    if p is None or (p.returncode != 0 and "Invalid job id" not in p.stderr):
        return None
    return dict(line.split("|", 1) for line in p.stdout.splitlines() if "|" in line)


def _sacct(job_ids: List[str]) -> Dict[str, str]:
    """How SLURM's accounting says tasks ended ({} without accounting: "Slurm accounting storage is disabled")."""
    p = _query(["sacct", "-o", "JobID,State", "--parsable2", *[a for j in job_ids for a in ("-j", j)]])
    if p is None or p.returncode != 0:
        return {}
    try:
        from submitit.slurm.slurm import SlurmInfoWatcher  # parses array ranges such as 42_[3-9%4]
    except ImportError:
        return {}
    return {k: v["State"] for k, v in SlurmInfoWatcher().read_info(p.stdout).items() if v.get("State")}


def task_states(out_dir: str) -> Dict[str, str]:
    """run_id → SLURM state of its latest task (``"RUNNING (42_3)"``): squeue's for tasks SLURM holds,
    else sacct's where accounting answers, else ``ENDED`` when squeue answers without it; {} off SLURM."""
    recs = [r for r in submitted(out_dir) if r.get("cluster") == "slurm"]
    if not recs:
        return {}
    ids = [str(r["job_id"]) for r in recs]
    held = _squeue(ids)
    info = {**_sacct(ids), **(held or {})}
    states: Dict[str, str] = {}
    for r in recs:  # a later submission of a run overrides an earlier one
        for i, rid in enumerate(r["runs"]):
            key = f"{r['job_id']}_{i}" if len(r["runs"]) > 1 else str(r["job_id"])  # submitit: 1 run = plain job
            if info.get(key):
                states[rid] = f"{info[key].split()[0]} ({key})"  # "CANCELLED by 1234" → CANCELLED
            elif held is not None:
                states[rid] = f"ENDED ({key} is no longer in SLURM's queue)"
    return states


def _live(states: Dict[str, str]) -> List[str]:
    return [rid for rid, st in states.items() if st.split()[0] in LIVE_STATES]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__  # sbatch's last line says why ("... submission failed: ...")


class SubmititExecutor:
    name = "slurm"

    def __init__(self, options: SlurmOptions):
        self.options = options

    def run(self, spec: RunSpec, runs: List[Run], log: Callable[[str], None]) -> Dict[str, int]:
        submitit = _import_submitit()
        probe = Heartbeat(spec.out_dir, me())
        try:
            groups = classify(Results(spec.out_dir), runs, spec, probe)
        finally:
            probe.remove()
        counts = {"planned": len(runs), "done": 0, "failed": 0, "skipped": len(groups["done"]),
                  "failed_earlier": len(groups["failed"]), "running_elsewhere": len(groups["running"])}
        live = set(_live(task_states(spec.out_dir)))
        todo = [r for r in groups["todo"] if r.run_id not in live]  # queued, not yet started: not again
        counts.update(submitted=len(todo), already_queued=len(groups["todo"]) - len(todo))
        if not todo:
            return counts
        # each submission in a folder of its own, removed whole if sbatch refuses it (no stray pickles)
        sub = os.path.join(spec.out_dir, "slurm", time.strftime("%Y%m%d-%H%M%S-") + str(os.getpid()))
        folder = os.path.join(sub, "%j")
        try:
            ex = submitit.AutoExecutor(folder=folder, cluster=self.options.cluster,
                                       slurm_max_num_timeout=self.options.max_requeues)
        except RuntimeError as e:  # e.g. no srun on this machine
            raise SuiteError(f"--executor slurm: {e} (--slurm-cluster local runs the array here)") from None
        ex.update_parameters(**self.options.executor_parameters(f"rfds-bench-{spec.suite.name}"))
        ids = [r.run_id for r in todo]
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr too
                jobs = ex.map_array(BenchTask(spec, self.options.gpus_per_task), ids)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
            shutil.rmtree(sub, ignore_errors=True)
            raise SuiteError(f"--executor slurm: the submission failed: {_first_line(e)}") from None
        array_id = str(jobs[0].job_id).split("_")[0]
        rec = {"job_id": array_id, "jobs": [str(j.job_id) for j in jobs], "runs": ids, "cluster": self.options.cluster,
               "folder": folder, "time": time.time(), "options": asdict(self.options)}
        os.makedirs(os.path.dirname(jobs_file(spec.out_dir)), exist_ok=True)
        fd = os.open(jobs_file(spec.out_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())  # one write: whole lines from concurrent submitters
        finally:
            os.close(fd)
        what = f"SLURM job array {array_id}" if self.options.cluster == "slurm" else f"submitit {self.options.cluster} jobs"
        log(f"submitted {len(ids)} runs as {what} (logs in {sub}); watch with `rfds-bench status {spec.out_dir}`")
        if not self.options.wait and self.options.cluster != "debug":
            return counts
        if self.options.cluster == "slurm":
            while _live({rid: st for rid, st in task_states(spec.out_dir).items() if rid in ids}):
                time.sleep(WAIT_POLL_S)
        else:
            for j, rid in zip(jobs, ids):
                try:
                    j.result()
                except Exception as e:  # the task itself crashed (not the run): the records say what is known
                    log(f"{rid}: task {j.job_id} ended with {type(e).__name__}: {_first_line(e)}")
        state = Results(spec.out_dir).states(todo)
        counts["interrupted"] = 0
        for rid in ids:
            st = state.get(rid, {}).get("status")
            counts[st if st in ("done", "failed") else "interrupted"] += 1
        return counts
