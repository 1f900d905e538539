"""Who owns a run, and is that owner still alive?

An owner is one runner process (``rfds-bench run`` on a workstation, or one submitit task on a
cluster node).  It is identified by host, pid, the pid's start time (so a recycled pid is not
mistaken for it) and, under SLURM, its array task id.  While it lives it touches a heartbeat file
``OUT/owners/<session>.hb`` every few seconds; from another host, an owner whose heartbeat is
older than ``stale_after`` seconds (default 300, above NFS attribute caching) is gone.  Heartbeat
ages compare two mtimes set by the same (shared) file server — ours, just touched, and theirs — so
node clocks need not agree.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

HEARTBEAT_EVERY = 5.0
STALE_AFTER = 300.0  # well above NFS attribute caching (acregmax, 60 s by default)


def pid_start(pid: int) -> Optional[int]:
    """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of stat, after "pid (comm)"


def pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start is None:
        return True
    now = pid_start(pid)
    return now is None or now == start


def slurm_task_id() -> Optional[str]:
    """``<array job>_<task>`` (or the job id) when running under SLURM / submitit's local cluster."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or None


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_start: Optional[int]
    job: Optional[str] = None

    @property
    def session(self) -> str:
        return f"{self.host}-{self.pid}-{self.pid_start or 0}"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Optional["Owner"]:
        if not isinstance(d, dict) or "host" not in d or "pid" not in d:
            return None
        return cls(str(d["host"]), int(d["pid"]), d.get("pid_start"), d.get("job"))


def me() -> Owner:
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, pid_start(pid), slurm_task_id())


class Heartbeat:
    """``OUT/owners/<session>.hb``, touched at most every ``every`` seconds by :meth:`beat`."""

    def __init__(self, out_dir: str, owner: Owner, every: float = HEARTBEAT_EVERY):
        self.dir = os.path.join(out_dir, "owners")
        self.owner, self.every = owner, every
        self.path = heartbeat_path(out_dir, owner)
        self._last = 0.0

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every:
            os.makedirs(self.dir, exist_ok=True)
            with open(self.path, "a"):
                os.utime(self.path, None)
            self._last = now

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass


def heartbeat_path(out_dir: str, owner: Owner) -> str:
    return os.path.join(out_dir, "owners", owner.session + ".hb")


def _mtime(path: str) -> float:
    """mtime via open + fstat: NFS revalidates attributes on open (close-to-open consistency)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_mtime


def heartbeat_age(out_dir: str, owner: Owner, probe: Heartbeat) -> Optional[float]:
    """Seconds since ``owner`` last beat, as seen by the file server; None if it never did."""
    try:
        theirs = _mtime(heartbeat_path(out_dir, owner))
    except OSError:
        return None
    try:
        probe.beat(force=True)
        now = _mtime(probe.path)
    except OSError:  # a read-only results folder (status of a copy): fall back to this node's clock
        now = time.time()
    return now - theirs


def owner_alive(out_dir: str, owner: Optional[Owner], probe: Heartbeat, stale_after: float = STALE_AFTER) -> bool:
    """Whether the run owned by ``owner`` may still be going (then it must not be started again)."""
    if owner is None:  # a record written before owners were recorded: its runner is long gone
        return False
    mine = probe.owner
    if owner == mine:
        return True
    if owner.host == mine.host:
        return pid_alive(owner.pid, owner.pid_start)
    if owner.job and owner.job == mine.job:  # our own earlier incarnation: requeued after preemption
        return False
    age = heartbeat_age(out_dir, owner, probe)
    return age is not None and age < stale_after
