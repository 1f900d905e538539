"""Options of ``--executor slurm``: the suite's ``slurm:`` section and the command line's SLURM flags
(data only; bench/slurm.py submits with them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import SuiteError

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
