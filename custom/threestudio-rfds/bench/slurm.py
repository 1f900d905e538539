"""``--executor slurm``: the suite as a submitit job array, one array task per run.

Each task runs :func:`scheduler.execute` for its one run on one slot (the GPUs SLURM gave it), so
claiming, recording and stopping are the local code.  Results go to the results folder, which must be
on a file system all nodes share.  A task is ``submitit.helpers.Checkpointable``: on preemption or
time-out SLURM signals it, submitit requeues it (at most ``max_requeues`` times), and the requeued
task finds its earlier incarnation's ``started`` record (same array task id) and reruns the run.
Submitted arrays are listed in ``OUT/slurm/jobs.jsonl`` for ``rfds-bench status``.
``cluster="local"`` / ``"debug"`` are submitit's own local-subprocess / in-process executors: the
same code path without a cluster (tests, a quick check of a suite).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .ledger import Ledger
from .owner import Heartbeat, me
from .scheduler import RunSpec, Slot, classify, execute
from .suite import Run, SuiteError

try:  # optional dependency: only --executor slurm needs it
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover
    _Checkpointable = object

CLUSTERS = ("slurm", "local", "debug")
OPTION_KEYS = {"partition", "account", "time_min", "gpus_per_task", "cpus_per_task", "mem_gb",
               "array_parallelism", "sbatch", "setup", "max_requeues"}


@dataclass
class SlurmOptions:
    cluster: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    time_min: int = 240
    gpus_per_task: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    array_parallelism: Optional[int] = None
    sbatch: Dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options, e.g. {"qos": "high"}
    setup: List[str] = field(default_factory=list)  # shell lines before the task (module load, ...)
    max_requeues: int = 3
    wait: bool = False

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise SuiteError(f"slurm cluster must be one of {list(CLUSTERS)}, got {self.cluster!r}")
        for key, lo in (("time_min", 1), ("gpus_per_task", 0), ("cpus_per_task", 1), ("array_parallelism", 1),
                        ("max_requeues", 0)):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise SuiteError(f"slurm {key} must be an integer >= {lo}, got {v!r}")
        if self.mem_gb is not None and (not isinstance(self.mem_gb, (int, float)) or self.mem_gb <= 0):
            raise SuiteError(f"slurm mem_gb must be a number > 0, got {self.mem_gb!r}")
        if not isinstance(self.sbatch, dict) or not all(isinstance(k, str) for k in self.sbatch):
            raise SuiteError(f"slurm sbatch must be a mapping of sbatch option names to values, got {self.sbatch!r}")
        if not isinstance(self.setup, list) or not all(isinstance(s, str) for s in self.setup):
            raise SuiteError(f"slurm setup must be a list of shell lines, got {self.setup!r}")

    def executor_parameters(self, name: str) -> Dict[str, Any]:
        """``AutoExecutor.update_parameters`` keywords (slurm_* ones are ignored off SLURM)."""
        p: Dict[str, Any] = dict(name=name, timeout_min=self.time_min, gpus_per_node=self.gpus_per_task,
                                 tasks_per_node=1, nodes=1, cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb,
                                 slurm_partition=self.partition, slurm_account=self.account,
                                 slurm_array_parallelism=self.array_parallelism,
                                 slurm_additional_parameters=dict(self.sbatch) or None,
                                 slurm_setup=list(self.setup) or None)
        if self.cluster == "local":
            p["local_setup"] = list(self.setup) or None
        return {k: v for k, v in p.items() if v is not None}


def _task_slot(gpus: int) -> Slot:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return Slot(f"{socket.gethostname()}:gpu{visible or '-'}", {}, ",".join(str(i) for i in range(max(gpus, 1))))


def run_task(spec: RunSpec, run_id: str, gpus_per_task: int = 1) -> str:
    """One array task: run ``run_id`` here (unless done or alive elsewhere); returns its ledger status."""
    import signal

    from . import scheduler

    runs = [r for r in spec.suite.runs() if r.run_id == run_id]
    if not runs:
        raise SuiteError(f"run {run_id!r} is not in suite {spec.suite.name!r}")
    prev = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # SLURM's SIGTERM (preemption, scancel) reaches our child too
        scheduler.INTERRUPT_REASON.setdefault("why", "SIGTERM to the SLURM job (preemption or scancel)")
        if callable(prev):
            prev(signum, frame)  # submitit's own handler (it logs and waits for SIGUSR2)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        execute(runs, spec, [_task_slot(gpus_per_task)], handle_signals=False, progress_every=300.0)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, prev)
    return Ledger(os.path.join(spec.out_dir, "ledger.jsonl")).state()[run_id]["status"]


class BenchTask(_Checkpointable):
    """A picklable array task; ``checkpoint`` (submitit's) resubmits it with the same run id."""

    def __init__(self, spec: RunSpec, gpus_per_task: int):
        self.spec, self.gpus_per_task = spec, gpus_per_task

    def __call__(self, run_id: str) -> str:
        return run_task(self.spec, run_id, self.gpus_per_task)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on preemption / time-out, just before it requeues the task and exits."""
        from . import scheduler

        scheduler.INTERRUPT_REASON["why"] = "preempted or timed out; requeued by submitit"
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


LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")


def task_states(out_dir: str) -> Dict[str, str]:
    """run_id → SLURM state (PENDING, RUNNING, ...) of its latest array task, as sacct reports it;
    {} where sacct is absent or silent (the ledger alone then decides)."""
    recs = [r for r in submitted(out_dir) if r.get("cluster") == "slurm"]
    if not recs or not shutil.which("sacct"):
        return {}
    cmd = ["sacct", "-o", "JobID,State", "--parsable2"]
    for r in recs:
        cmd += ["-j", str(r["job_id"])]
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        from submitit.slurm.slurm import SlurmInfoWatcher  # parses array ranges such as 42_[3-9%4]

        info = SlurmInfoWatcher().read_info(text)
    except (OSError, subprocess.SubprocessError, ImportError):
        return {}
    states: Dict[str, str] = {}
    for r in recs:  # a later submission of a run overrides an earlier one
        for i, rid in enumerate(r["runs"]):
            key = f"{r['job_id']}_{i}" if len(r["runs"]) > 1 else str(r["job_id"])  # submitit: 1 run = plain job
            st = info.get(key, {}).get("State")
            if st:
                states[rid] = st.split()[0]  # "CANCELLED by 1234" → CANCELLED
    return states


class SubmititExecutor:
    name = "slurm"

    def __init__(self, options: SlurmOptions):
        self.options = options

    def run(self, spec: RunSpec, runs: List[Run], log: Callable[[str], None]) -> Dict[str, int]:
        submitit = _import_submitit()
        probe = Heartbeat(spec.out_dir, me())
        try:
            groups = classify(Ledger(os.path.join(spec.out_dir, "ledger.jsonl")), runs, spec, probe)
        finally:
            probe.remove()
        counts = {"planned": len(runs), "done": 0, "failed": 0, "skipped": len(groups["done"]),
                  "failed_earlier": len(groups["failed"]), "running_elsewhere": len(groups["running"]),
                  "submitted": len(groups["todo"])}
        live = {rid for rid, st in task_states(spec.out_dir).items() if st in LIVE_STATES}
        todo = [r for r in groups["todo"] if r.run_id not in live]  # queued, not yet started: not again
        counts.update(submitted=len(todo), already_queued=len(groups["todo"]) - len(todo))
        if not todo:
            return counts
        folder = os.path.join(spec.out_dir, "slurm", "%j")
        try:
            ex = submitit.AutoExecutor(folder=folder, cluster=self.options.cluster,
                                       slurm_max_num_timeout=self.options.max_requeues)
        except RuntimeError as e:  # e.g. no srun on this machine
            raise SuiteError(f"--executor slurm: {e} (--slurm-cluster local runs the array here)") from None
        ex.update_parameters(**self.options.executor_parameters(f"rfds-bench-{spec.suite.name}"))
        ids = [r.run_id for r in todo]
        jobs = ex.map_array(BenchTask(spec, self.options.gpus_per_task), ids)
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
        log(f"submitted {len(ids)} runs as {what} (logs in {os.path.join(spec.out_dir, 'slurm')}); "
            f"watch with `rfds-bench status {spec.out_dir}`")
        if not self.options.wait and self.options.cluster != "debug":
            return counts
        for j, rid in zip(jobs, ids):
            try:
                j.result()
            except Exception as e:  # the task itself crashed (not the run): the ledger says what is known
                last = (str(e).strip().splitlines() or [""])[-1]
                log(f"{rid}: task {j.job_id} ended with {type(e).__name__}: {last}")
        state = Ledger(os.path.join(spec.out_dir, "ledger.jsonl")).state()
        counts["interrupted"] = 0
        for rid in ids:
            st = state.get(rid, {}).get("status")
            counts[st if st in ("done", "failed") else "interrupted"] += 1
        return counts
