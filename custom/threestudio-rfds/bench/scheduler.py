"""The run queue: one launch per slot (GPU) at a time, each run claimed in the ledger exactly once.

:func:`execute` is the loop every executor ends in — ``rfds-bench run --gpus 0,1`` runs it with one
slot per GPU, a SLURM array task runs it with one slot and one run.  It polls its children (no
threads: a child's death signal is tied to the thread that forked it), records each outcome, stops
runs past ``--timeout``, prints progress, and on SIGTERM/SIGINT stops every child and records it
``interrupted``.  Every attempt gets its own trial folder (bench/results.py), whose record is written
before the ledger's; paths in records are relative to the results folder.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import logs, procs
from .command import build_command
from .owner import STALE_AFTER, Heartbeat, Owner, me, owner_alive
from .paths import RunPaths, find_test_renders, run_paths
from .results import Results
from .suite import Run, Suite

POLL_S = 0.1
# why runs are cut off, set when the job itself is being stopped (SIGTERM to a SLURM task, submitit's
# requeue): a child that then exits non-zero is recorded interrupted (rerun later), not failed
INTERRUPT_REASON: Dict[str, str] = {}
STOP_SIGNALS = (procs.signal.SIGTERM, procs.signal.SIGINT, procs.signal.SIGHUP)


@dataclass(frozen=True)
class Slot:
    """Where a launch runs: ``env`` for the child (``CUDA_VISIBLE_DEVICES``) and launch.py's ``--gpu``."""

    label: str
    env: Dict[str, str] = field(default_factory=dict)
    launch_gpu: str = "0"


@dataclass
class RunSpec:
    """What every executor needs to launch the runs of a suite: per run id its definition
    (bench.command.run_definition) and digest, per config label the resolved config file."""

    suite: Suite
    out_dir: str
    threestudio: str
    python: str
    configs: Dict[str, str]
    definitions: Dict[str, Dict[str, Any]]
    digests: Dict[str, str]
    timeout: Optional[float] = None
    retry_failed: bool = False
    grace: float = 10.0
    stale_after: float = STALE_AFTER

    def current(self, rec: Dict[str, Any]) -> bool:
        """Whether a record is of this revision's definition of its run (records without a digest are)."""
        return rec.get("digest") in (None, self.digests.get(rec["run_id"]))


@dataclass
class _Active:
    run: Run
    slot: Slot
    paths: RunPaths
    info: Dict[str, Any]
    proc: Any = None
    t0: float = 0.0
    start_time: float = 0.0
    kill_at: Optional[float] = None
    error: Optional[str] = None


def fmt_duration(s: Optional[float]) -> str:
    if s is None:
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def classify(results: Results, runs: List[Run], spec: RunSpec, probe: Heartbeat) -> Dict[str, List[Run]]:
    """Split runs into ``todo``, ``done`` (earlier), ``failed`` (earlier, kept) and ``running`` (elsewhere)."""
    state = results.states()
    out: Dict[str, List[Run]] = {"todo": [], "done": [], "failed": [], "running": []}
    for r in runs:
        rec = state.get(r.run_id, {})
        st = rec.get("status") if rec and spec.current(rec) else None
        if st == "done":
            out["done"].append(r)
        elif st == "failed" and not spec.retry_failed:
            out["failed"].append(r)
        elif rec.get("status") == "started" and owner_alive(spec.out_dir, Owner.from_dict(rec.get("owner")), probe,
                                                            spec.stale_after):
            out["running"].append(r)
        else:
            out["todo"].append(r)
    return out


def read_stats(path: str) -> Dict[str, object]:
    """memwrap's stats file, or {} if the child died before writing it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _record(run: Run, spec: RunSpec, p: RunPaths, slot: Slot, owner: Owner) -> Dict[str, Any]:
    """The ``started`` record of a new attempt."""
    rel = lambda path: os.path.relpath(path, spec.out_dir)  # noqa: E731
    definition = spec.definitions[run.run_id]
    return {"run_id": run.run_id, "status": "started", "time": time.time(), "attempt": p.attempt,
            "digest": spec.digests[run.run_id], "definition": definition,
            "config": run.config.label, "config_path": run.config.path, "prompt": run.prompt,
            "prompt_index": run.prompt_index, "seed": run.seed,
            "trial_dir": rel(p.trial_dir), "log": rel(p.log), "gpu": slot.label, "host": owner.host,
            "owner": owner.to_dict(), "session": owner.session, "start_time": time.time(),
            "cmd": build_command(run, p, spec.configs[run.config.label], definition["overrides"], spec.out_dir,
                                 spec.threestudio, spec.python, slot.launch_gpu)}


def claim(results: Results, run: Run, spec: RunSpec, probe: Heartbeat,
          slot: Slot) -> Tuple[Optional[Dict[str, Any]], str]:
    """Atomically take ``run`` unless it is done, kept failed, or alive elsewhere: a new attempt folder and
    its ``started`` record (returned, with why it runs).  A ``started`` run whose owner is gone is first
    recorded ``interrupted``."""
    with results.ledger.transaction():
        last = results.states([run]).get(run.run_id, {})
        st = last.get("status")
        if last and spec.current(last) and (st == "done" or (st == "failed" and not spec.retry_failed)):
            return None, st
        if st == "started":
            prev = Owner.from_dict(last.get("owner"))
            if owner_alive(spec.out_dir, prev, probe, spec.stale_after):
                return None, "running"
            results.close(last, "interrupted", reason=f"owner {prev.session if prev else '(unrecorded)'} is gone")
        if last and not spec.current(last):
            st = "revised"
        p = results.new_attempt(run, after=int(last.get("attempt", 1)) if last else 0)
        return results.write(_record(run, spec, p, slot, probe.owner)), st or "new"


def _finish(a: _Active, rc: int, spec: RunSpec, results: Results) -> Dict[str, Any]:
    p = a.paths
    wall = time.monotonic() - a.t0
    stats = read_stats(p.stats)
    renders = find_test_renders(p.trial_dir)
    if renders["renders_dir"]:
        renders["renders_dir"] = os.path.relpath(renders["renders_dir"], spec.out_dir)
    tail = logs.log_tail(p.log)
    error = a.error
    end = dict(returncode=rc, wall_time_s=wall, end_time=time.time())
    stopped = -rc in STOP_SIGNALS and error is None and "why" not in INTERRUPT_REASON
    if error is None and rc != 0 and (stopped or "why" in INTERRUPT_REASON):  # stopped from outside, not a failure
        why = INTERRUPT_REASON.get("why") or f"stopped by {procs.signal.Signals(-rc).name} from outside the runner"
        return results.close(a.info, "interrupted", reason=why, log_tail=tail, **end)
    if error is None and rc != 0:
        why = logs.error_line(tail)
        error = f"exit code {rc}" if rc > 0 else f"killed by signal {-rc}"
        error += f": {why}" if why else ""
    if error is None and not renders["renders"]:
        error = f"no test renders under {os.path.relpath(p.trial_dir, spec.out_dir)}/save/it<N>-test/"
    fields = dict(end, peak_mem_allocated_bytes=stats.get("cuda_max_memory_allocated"),
                  peak_mem_reserved_bytes=stats.get("cuda_max_memory_reserved"),
                  device_name=stats.get("device_name"), max_rss_bytes=stats.get("max_rss_bytes"),
                  n_renders=len(renders["renders"]), **renders)
    if error is not None:
        return results.close(a.info, "failed", error=error, log_tail=tail, **fields)
    return results.close(a.info, "done", **fields)


def _start(a: _Active, spec: RunSpec) -> None:
    os.makedirs(os.path.dirname(a.paths.log), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **a.slot.env)
    a.t0, a.start_time = time.monotonic(), time.time()
    a.proc = procs.spawn(a.info["cmd"], cwd=spec.threestudio, env=env, log_path=a.paths.log)


class _Progress:
    def __init__(self, total: int, n_slots: int, log: Callable[[str], None], every: float):
        self.total, self.n_slots, self.log, self.every = total, n_slots, log, every
        self.done = self.failed = 0
        self.walls: List[float] = []
        self._last = time.monotonic()

    def eta(self, queued: int, active: List[_Active]) -> Optional[float]:
        now = time.monotonic()
        mean = sum(self.walls) / len(self.walls) if self.walls else None
        left = []
        for a in active:
            el = now - a.t0
            pr = logs.progress(a.paths.log)
            expected = el / (pr[0] / pr[1]) if pr and pr[0] > 0 and pr[1] else mean
            if expected is None:
                return None
            left.append(max(expected - el, 0.0))
            mean = mean if mean is not None else expected
        if mean is None:
            return None if queued else (max(left) if left else 0.0)
        return (sum(left) + queued * mean) / self.n_slots

    def line(self, queued: int, active: List[_Active]) -> str:
        return (f"progress: {self.done} done, {self.failed} failed, {len(active)} running, {queued} queued "
                f"(of {self.total}); ETA {fmt_duration(self.eta(queued, active))}")

    def maybe_report(self, queued: int, active: List[_Active], force: bool = False) -> None:
        if not force and time.monotonic() - self._last < self.every:
            return
        self._last = time.monotonic()
        lines = [self.line(queued, active)]
        for a in active:
            pr = logs.progress(a.paths.log)
            step = f"step {pr[0]}/{pr[1]}" if pr else "starting"
            lines.append(f"  {a.slot.label}: {a.run.run_id}: {step}, {fmt_duration(time.monotonic() - a.t0)}")
        self.log("\n".join(lines))


_AGAIN = {"started": " (rerun: the runner of its earlier attempt is gone)",
          "interrupted": " (rerun after an interruption)", "failed": " (retry of a failed run)",
          "missing": " (rerun: the trial folder of its finished attempt is gone)",
          "revised": " (rerun: its settings changed in this revision of the suite)"}


class _Loop:
    """The state of one :func:`execute`: queue, free slots, running children, counts."""

    def __init__(self, runs: List[Run], spec: RunSpec, slots: List[Slot], log: Callable[[str], None],
                 progress_every: float, owner: Owner):
        self.spec, self.log, self.owner = spec, log, owner
        self.results = Results(spec.out_dir)
        self.hb = Heartbeat(spec.out_dir, owner)
        self.hb.beat(force=True)
        groups = classify(self.results, runs, spec, self.hb)
        self.counts = {"planned": len(runs), "done": 0, "failed": 0, "interrupted": 0,
                       "skipped": len(groups["done"]), "failed_earlier": len(groups["failed"]),
                       "running_elsewhere": len(groups["running"])}
        self.queue: Deque[Run] = deque(groups["todo"])
        self.free: List[Slot] = list(slots)
        self.active: List[_Active] = []
        self.pending: Optional[_Active] = None  # claimed, being spawned
        self.prog = _Progress(len(self.queue), len(slots), log, progress_every)

    def fill(self) -> None:
        """Start queued runs on free slots (each claimed first; one taken meanwhile is passed over)."""
        while self.free and self.queue:
            run, slot = self.queue.popleft(), self.free[0]
            rec, why = claim(self.results, run, self.spec, self.hb, slot)
            if rec is None:
                self.counts[{"done": "skipped", "failed": "failed_earlier"}.get(why, "running_elsewhere")] += 1
                self.prog.total -= 1
                self.log(f"{run.run_id}: {why} elsewhere meanwhile, not started")
                continue
            self.pending = _Active(run, slot, run_paths(self.spec.out_dir, run, rec["attempt"]), rec)
            _start(self.pending, self.spec)
            self.active.append(self.pending)
            self.free.pop(0)
            self.pending = None
            n = self.prog.done + self.prog.failed + len(self.active)
            self.log(f"[{n}/{self.prog.total}] {slot.label}: {run.run_id} started{_AGAIN.get(why, '')}")

    def reap(self) -> None:
        """Record children that ended; stop those past the timeout (SIGINT, SIGKILL after the grace)."""
        now, spec = time.monotonic(), self.spec
        for a in list(self.active):
            rc = a.proc.poll()
            if rc is None:
                if spec.timeout is not None and a.kill_at is None and now - a.t0 > spec.timeout:
                    a.error = f"timed out after {fmt_duration(spec.timeout)}"
                    procs.signal_group(a.proc, procs.signal.SIGINT)
                    a.kill_at = now + spec.grace
                elif a.kill_at is not None and now > a.kill_at:
                    procs.signal_group(a.proc, procs.signal.SIGKILL)
                continue
            procs.signal_group(a.proc, procs.signal.SIGKILL)  # leftovers of its group
            rec = _finish(a, rc, spec, self.results)
            self.active.remove(a)
            self.free.append(a.slot)
            self.counts[rec["status"]] += 1
            self.prog.walls.append(rec["wall_time_s"])
            where = f"{a.run.run_id} {{}} on {a.slot.label}"
            if rec["status"] == "interrupted":
                self.log(where.format("interrupted") + f": {rec['reason']}; the next run reruns it")
                continue
            self.prog.done += rec["status"] == "done"
            self.prog.failed += rec["status"] == "failed"
            head = f"[{self.prog.done + self.prog.failed}/{self.prog.total} finished] "
            if rec["status"] == "done":
                self.log(head + where.format("done") + f" in {fmt_duration(rec['wall_time_s'])}, "
                         f"{rec['n_renders']} test renders")
            else:
                self.log(head + where.format("FAILED") + f" after {fmt_duration(rec['wall_time_s'])}: "
                         f"{rec['error']} (log: {rec['log']})")

    def cut(self, reason: str, hurry: Callable[[], bool]) -> None:
        """Stop every child and record it ``interrupted``."""
        cut = self.active + ([self.pending] if self.pending is not None and self.pending not in self.active else [])
        procs.stop_all([a.proc for a in cut if a.proc is not None], self.spec.grace, hurry)
        for a in cut:
            wall = time.monotonic() - a.t0 if a.t0 else 0.0
            self.results.close(a.info, "interrupted", reason=reason, wall_time_s=wall, end_time=time.time())
        self.active, self.pending = [], None

    def run(self) -> None:
        while self.queue or self.active:
            self.fill()
            self.reap()
            self.hb.beat()
            self.prog.maybe_report(len(self.queue), self.active)
            if self.active:
                time.sleep(POLL_S)


def execute(runs: List[Run], spec: RunSpec, slots: List[Slot], *, log: Callable[[str], None] = print,
            handle_signals: bool = True, progress_every: float = 60.0,
            owner: Optional[Owner] = None) -> Dict[str, int]:
    """Run ``runs`` over ``slots``; returns counts {planned, done, failed, interrupted, skipped,
    failed_earlier, running_elsewhere}.  On SIGTERM/SIGINT/SIGHUP (``handle_signals``) or any exception,
    every child is stopped and recorded ``interrupted`` before the exception (:class:`procs.Interrupted`)
    propagates; a second signal meanwhile skips the grace period."""
    INTERRUPT_REASON.clear()
    loop = _Loop(runs, spec, slots, log, progress_every, owner or me())
    try:
        with procs.signals_to_exceptions(handle_signals) as sig:
            try:
                loop.run()
            except BaseException as e:
                reason = e.args[0] if isinstance(e, procs.Interrupted) else INTERRUPT_REASON.get("why", type(e).__name__)
                loop.cut(str(reason), hurry=lambda: sig["again"] is not None)
                raise
    finally:
        loop.hb.remove()
    return loop.counts
