"""The run queue: one launch per slot (GPU) at a time, each run claimed in the ledger exactly once.

:func:`execute` is the loop every executor ends in — ``rfds-bench run --gpus 0,1`` runs it with one
slot per GPU, a SLURM array task runs it with one slot and one run.  It polls its children (no
threads: a child's death signal is tied to the thread that forked it), records each outcome, stops
runs past ``--timeout``, prints progress, and on SIGTERM/SIGINT stops every child and records it
``interrupted``.  Paths in the ledger are relative to the results folder.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from . import logs, procs
from .ledger import Ledger
from .owner import STALE_AFTER, Heartbeat, Owner, me, owner_alive
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
    """What every executor needs to launch the runs of a suite."""

    suite: Suite
    out_dir: str
    threestudio: str
    python: str
    timeout: Optional[float] = None
    extra_overrides: List[str] = field(default_factory=list)
    retry_failed: bool = False
    grace: float = 10.0
    stale_after: float = STALE_AFTER


@dataclass
class _Active:
    run: Run
    slot: Slot
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


def classify(ledger: Ledger, runs: List[Run], spec: RunSpec, probe: Heartbeat) -> Dict[str, List[Run]]:
    """Split runs into ``todo``, ``done`` (earlier), ``failed`` (earlier, kept) and ``running`` (elsewhere)."""
    state = ledger.state()
    out: Dict[str, List[Run]] = {"todo": [], "done": [], "failed": [], "running": []}
    for r in runs:
        rec = state.get(r.run_id, {})
        st = rec.get("status")
        if st == "done":
            out["done"].append(r)
        elif st == "failed" and not spec.retry_failed:
            out["failed"].append(r)
        elif st == "started" and owner_alive(spec.out_dir, Owner.from_dict(rec.get("owner")), probe, spec.stale_after):
            out["running"].append(r)
        else:
            out["todo"].append(r)
    return out


def claim(ledger: Ledger, run: Run, spec: RunSpec, probe: Heartbeat, info: Dict[str, Any]) -> Tuple[bool, str]:
    """Atomically take ``run`` (append ``started``) unless it is done, kept failed, or alive elsewhere.
    A ``started`` run whose owner is gone is first recorded ``interrupted``."""
    with ledger.transaction():
        last = ledger.state().get(run.run_id, {})
        st = last.get("status")
        if st == "done" or (st == "failed" and not spec.retry_failed):
            return False, st
        if st == "started":
            prev = Owner.from_dict(last.get("owner"))
            if owner_alive(spec.out_dir, prev, probe, spec.stale_after):
                return False, "running"
            ledger.append(run.run_id, "interrupted", reason=f"owner {prev.session if prev else '(unrecorded)'} is gone",
                          **{k: info[k] for k in ("config", "prompt", "prompt_index", "seed")})
        ledger.append(run.run_id, "started", **info)
        return True, st or "new"


def _finish(a: _Active, rc: int, spec: RunSpec, ledger: Ledger) -> Dict[str, Any]:
    from .runner import find_test_renders, run_paths, read_stats

    p = run_paths(spec.out_dir, a.run)
    wall = time.monotonic() - a.t0
    stats = read_stats(p.stats)
    renders = find_test_renders(p.trial_dir)
    if renders["renders_dir"]:
        renders["renders_dir"] = os.path.relpath(renders["renders_dir"], spec.out_dir)
    tail = logs.log_tail(p.log)
    error = a.error
    stopped = -rc in STOP_SIGNALS and error is None and "why" not in INTERRUPT_REASON
    if error is None and rc != 0 and (stopped or "why" in INTERRUPT_REASON):  # stopped from outside, not a failure
        why = INTERRUPT_REASON.get("why") or f"stopped by {procs.signal.Signals(-rc).name} from outside the runner"
        return ledger.append(a.run.run_id, "interrupted", reason=why, returncode=rc, wall_time_s=wall,
                             end_time=time.time(), log_tail=tail, **a.info)
    if error is None and rc != 0:
        why = logs.error_line(tail)
        error = f"exit code {rc}" if rc > 0 else f"killed by signal {-rc}"
        error += f": {why}" if why else ""
    if error is None and not renders["renders"]:
        error = f"no test renders under {os.path.relpath(p.trial_dir, spec.out_dir)}/save/it<N>-test/"
    fields = dict(a.info, returncode=rc, wall_time_s=wall, end_time=time.time(),
                  peak_mem_allocated_bytes=stats.get("cuda_max_memory_allocated"),
                  peak_mem_reserved_bytes=stats.get("cuda_max_memory_reserved"),
                  device_name=stats.get("device_name"), max_rss_bytes=stats.get("max_rss_bytes"),
                  n_renders=len(renders["renders"]), **renders)
    if error is not None:
        return ledger.append(a.run.run_id, "failed", error=error, log_tail=tail, **fields)
    return ledger.append(a.run.run_id, "done", **fields)


def _start(a: _Active, spec: RunSpec) -> None:
    from .runner import run_paths

    p = run_paths(spec.out_dir, a.run)
    shutil.rmtree(p.trial_dir, ignore_errors=True)  # a previous, unfinished attempt's renders (inside OUT only)
    if os.path.exists(p.stats):
        os.remove(p.stats)
    os.makedirs(os.path.dirname(p.log), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **a.slot.env)
    a.t0, a.start_time = time.monotonic(), time.time()
    a.proc = procs.spawn(a.info["cmd"], cwd=spec.threestudio, env=env, log_path=p.log)


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
            pr = logs.progress(a.info["log_abs"])
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
            pr = logs.progress(a.info["log_abs"])
            step = f"step {pr[0]}/{pr[1]}" if pr else "starting"
            lines.append(f"  {a.slot.label}: {a.run.run_id}: {step}, {fmt_duration(time.monotonic() - a.t0)}")
        self.log("\n".join(lines))


_AGAIN = {"started": " (rerun: the runner of its earlier attempt is gone)",
          "interrupted": " (rerun after an interruption)", "failed": " (retry of a failed run)"}


class _Loop:
    """The state of one :func:`execute`: queue, free slots, running children, counts."""

    def __init__(self, runs: List[Run], spec: RunSpec, slots: List[Slot], log: Callable[[str], None],
                 progress_every: float, owner: Owner):
        self.spec, self.log, self.owner = spec, log, owner
        self.ledger = Ledger(os.path.join(spec.out_dir, "ledger.jsonl"))
        self.hb = Heartbeat(spec.out_dir, owner)
        self.hb.beat(force=True)
        groups = classify(self.ledger, runs, spec, self.hb)
        self.counts = {"planned": len(runs), "done": 0, "failed": 0, "interrupted": 0,
                       "skipped": len(groups["done"]), "failed_earlier": len(groups["failed"]),
                       "running_elsewhere": len(groups["running"])}
        self.queue: Deque[Run] = deque(groups["todo"])
        self.free: List[Slot] = list(slots)
        self.active: List[_Active] = []
        self.pending: Optional[_Active] = None  # claimed, being spawned
        self.prog = _Progress(len(self.queue), len(slots), log, progress_every)

    def _info(self, run: Run, slot: Slot) -> Dict[str, Any]:
        from .runner import build_command, run_paths

        p, o, spec = run_paths(self.spec.out_dir, run), self.owner, self.spec
        return {"config": run.config.label, "config_path": run.config.path, "prompt": run.prompt,
                "prompt_index": run.prompt_index, "seed": run.seed,
                "trial_dir": os.path.relpath(p.trial_dir, spec.out_dir), "log": os.path.relpath(p.log, spec.out_dir),
                "gpu": slot.label, "host": o.host, "owner": o.to_dict(), "session": o.session,
                "start_time": time.time(),
                "cmd": build_command(run, spec.suite, spec.out_dir, spec.threestudio, spec.python, slot.launch_gpu,
                                     spec.extra_overrides)}

    def fill(self) -> None:
        """Start queued runs on free slots (each claimed first; one taken meanwhile is passed over)."""
        while self.free and self.queue:
            run, slot = self.queue.popleft(), self.free[0]
            info = self._info(run, slot)
            ok, why = claim(self.ledger, run, self.spec, self.hb, info)
            if not ok:
                self.counts[{"done": "skipped", "failed": "failed_earlier"}.get(why, "running_elsewhere")] += 1
                self.prog.total -= 1
                self.log(f"{run.run_id}: {why} elsewhere meanwhile, not started")
                continue
            info["log_abs"] = os.path.join(self.spec.out_dir, info["log"])
            self.pending = _Active(run, slot, info)
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
            a.info.pop("log_abs", None)
            rec = _finish(a, rc, spec, self.ledger)
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
            a.info.pop("log_abs", None)
            wall = time.monotonic() - a.t0 if a.t0 else 0.0
            self.ledger.append(a.run.run_id, "interrupted", reason=reason, wall_time_s=wall, end_time=time.time(),
                               **a.info)
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
