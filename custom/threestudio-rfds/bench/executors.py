"""Executors: where the runs of a suite go.  ``local`` (here) runs them on this machine, one per GPU
slot; ``slurm`` (bench/slurm.py) submits them as a submitit job array.

An executor implements :class:`Executor`: ``run(spec, runs, log)`` launches (or submits) ``runs``
and returns counts.  Whatever the executor, each run ends up in :func:`scheduler.execute` on some
machine, which claims it in the shared ledger, so executors never need to coordinate with each
other.  To add one (e.g. Ray), write a class whose tasks call ``execute([run], spec, [slot])`` and
register it in ``bench.runner.EXECUTORS``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Callable, Dict, List, Protocol

from .errors import SuiteError
from .scheduler import RunSpec, Slot, execute
from .suite import Run

_GPU_ID = re.compile(r"^(?:\d+|(?:GPU|MIG)-[A-Za-z0-9-]+)$")  # what CUDA_VISIBLE_DEVICES takes
GPU_IDS = "distinct non-negative GPU indices (or GPU-/MIG- UUIDs) separated by commas, such as 0,1,3"


class Executor(Protocol):
    name: str

    def run(self, spec: RunSpec, runs: List[Run], log: Callable[[str], None]) -> Dict[str, int]:
        """Run (or submit) ``runs``; counts with at least {planned, done, failed, skipped, failed_earlier}."""


def detect_gpus() -> List[str]:
    """GPU ids for ``--gpus all``: ``$CUDA_VISIBLE_DEVICES`` if set, else the indices nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [g.strip() for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout
            return [line.strip() for line in out.splitlines() if line.strip().isdigit()]
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def gpu_ids(value: str, what: str = "--gpus") -> List[str]:
    """``0,1,3`` → ["0", "1", "3"]; a negative, empty, malformed or repeated id is a SuiteError."""
    ids = [g.strip() for g in value.split(",")]
    keys = [str(int(g)) if g.isdigit() else g for g in ids]
    if not all(_GPU_ID.match(g) for g in ids) or len(set(keys)) != len(keys):
        allowed = ("'all' or " if what == "--gpus" else "") + GPU_IDS
        raise SuiteError(f"{what} must be {allowed}; got {value!r}")
    return ids


def parse_gpus(value: str) -> List[Slot]:
    """``--gpus 0,1,3`` or ``all`` → one slot per GPU, each child seeing only its GPU as device 0."""
    if value.strip() != "all":
        ids = gpu_ids(value)
    else:
        ids = detect_gpus()
        if not ids:
            raise SuiteError("--gpus all found no GPU (CUDA_VISIBLE_DEVICES is unset and nvidia-smi lists none); "
                             "pass --gpus 0,1,... explicitly")
        ids = gpu_ids(",".join(ids), "the GPUs of --gpus all (CUDA_VISIBLE_DEVICES or nvidia-smi)")
    return [Slot(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": g}, "0") for g in ids]


class LocalExecutor:
    """All runs on this machine, one at a time per slot."""

    name = "local"

    def __init__(self, slots: List[Slot], progress_every: float = 60.0, handle_signals: bool = True):
        self.slots, self.progress_every, self.handle_signals = slots, progress_every, handle_signals

    def run(self, spec: RunSpec, runs: List[Run], log: Callable[[str], None]) -> Dict[str, int]:
        return execute(runs, spec, self.slots, log=log, handle_signals=self.handle_signals,
                       progress_every=self.progress_every)
