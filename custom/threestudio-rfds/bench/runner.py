"""``rfds-bench run``: check everything, then hand the runs of a suite to an executor — this machine's GPUs
(bench/executors.py, bench/scheduler.py) or a SLURM job array (bench/slurm.py).

Before any run starts: the options and overrides are validated, every config file is resolved, the
imports a launch does first are tried once in the launches' Python (bench.command.preflight), and the
suite is compared with the revision the results folder's runs used (``suite.json``, or the trial
folders' records when it is absent): a change is refused, naming it, unless ``new_revision``.
The layout of the results folder is in bench/paths.py, the records in bench/results.py.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from typing import Any, Callable, Dict, List, Optional

from ..atomic import atomic_write, write_json
from .command import build_command, digest, file_sha, preflight, resolve_config, run_definition
from .errors import SuiteError
from .executors import Executor, LocalExecutor, gpu_ids, parse_gpus
from .owner import STALE_AFTER
from .paths import SUITE, run_paths
from .results import Results, definition_changes, read_suite_file, suite_changes, suite_record
from .scheduler import RunSpec, Slot
from .suite import Suite, check_overrides


def _slurm(**options: Any) -> Executor:
    from .options import SlurmOptions
    from .slurm import SubmititExecutor

    return SubmititExecutor(SlurmOptions(**options))


EXECUTORS: Dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "slurm": _slurm}


def make_spec(suite: Suite, out_dir: str, threestudio: str, python: str, extra_overrides: List[str],
              **kw: Any) -> RunSpec:
    """Resolve every config (a missing one stops the suite before any launch) and define every run."""
    configs = {c.label: resolve_config(c.path, threestudio, suite) for c in suite.configs}
    shas = {label: file_sha(path) for label, path in configs.items()}
    defs = {r.run_id: run_definition(r, suite, shas[r.config.label], extra_overrides) for r in suite.runs()}
    return RunSpec(suite, out_dir, threestudio, python, configs, defs, {k: digest(d) for k, d in defs.items()}, **kw)


def check_revision(results: Results, suite: Suite, spec: RunSpec, extra: List[str], new_revision: bool) -> None:
    """Write ``suite.json`` if the folder has none, keep it if the suite is unchanged, refuse a changed
    suite (one line naming the change) unless ``new_revision``: then the old record is kept as
    ``suite.r<N>.json`` and this one becomes revision N + 1.  Call under the ledger's lock."""
    out = results.out_dir
    shas = {d["config"]: d["config_sha"] for d in spec.definitions.values()}
    path = os.path.join(out, SUITE)
    old = read_suite_file(out, required=False)
    if old is not None:
        if old.get("name") != suite.name:
            raise SuiteError(f"{out} holds results of suite {old.get('name')!r}, not {suite.name!r}; use another --out")
        new = suite_record(suite, extra, shas, spec.digests, int(old.get("revision", 1)) + 1)
        changes = suite_changes(old, new)
        if not changes:
            return
        if not new_revision:
            raise SuiteError(
                f"{out}: suite {suite.name!r} differs from the revision its runs used: {'; '.join(changes)}; "
                "pass --new-revision to run this revision here (finished runs whose definition is unchanged are "
                "kept, the others rerun in new attempt folders), or use another --out")
        atomic_write(os.path.join(out, f"suite.r{old.get('revision', 1)}.json"),
                     lambda tmp: shutil.copyfile(path, tmp))
    else:
        conflicts = []
        for rid, rec in sorted(results.states().items()):
            if "definition" not in rec or rec.get("digest") == spec.digests.get(rid):
                continue
            conflicts.append(f"run {rid} is not in suite {suite.name!r}" if rid not in spec.digests else
                             f"run {rid}: " + ", ".join(definition_changes(rec["definition"], spec.definitions[rid])))
        if conflicts and not new_revision:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise SuiteError(f"{out} has no {SUITE}, and its trial folders hold runs of another suite: "
                             f"{conflicts[0]}{more}; run the suite they used (suite.json is then written anew), "
                             "pass --new-revision, or use another --out")
        new = suite_record(suite, extra, shas, spec.digests, 2 if conflicts else 1)
    write_json(path, new, sort_keys=True)


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
    new_revision: bool = False,
    skip_preflight: bool = False,
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
    extra = check_overrides("--override", list(extra_overrides or []))
    python = python or sys.executable
    threestudio = os.path.abspath(threestudio)
    out_dir = os.path.abspath(out_dir)  # the child runs in the threestudio checkout
    if not (shutil.which(python) or (os.path.isfile(python) and os.access(python, os.X_OK))):
        raise SuiteError(f"--python {python!r} is not an executable; pass the threestudio environment's python")
    if not os.path.isfile(os.path.join(threestudio, "launch.py")):
        raise SuiteError(f"--threestudio {threestudio!r} has no launch.py; pass the threestudio checkout")
    if executor == "local":
        slots = parse_gpus(gpus) if gpus else [Slot(f"gpu{gpu}", {}, ",".join(gpu_ids(gpu, "--gpu")))]
        ex: Executor = LocalExecutor(slots, progress_every=progress_every)
    else:
        opts = {**suite.slurm, **(executor_options or {})}  # the command line wins over the suite
        opts["sbatch"] = {**suite.slurm.get("sbatch", {}), **(executor_options or {}).get("sbatch", {})}
        ex = EXECUTORS[executor](**opts)
        slots = [Slot("task", {}, "0")]
    spec = make_spec(suite, out_dir, threestudio, python, extra, timeout=timeout, retry_failed=retry_failed,
                     grace=grace, stale_after=stale_after)
    runs = suite.runs()
    counts = {"planned": len(runs), "skipped": 0, "done": 0, "failed": 0, "failed_earlier": 0, "running_elsewhere": 0}
    results = Results(out_dir)

    if dry_run:
        state = results.states() if os.path.isdir(out_dir) else {}
        if gpus:
            log(f"# one launch at a time per GPU, each with CUDA_VISIBLE_DEVICES set to one of: "
                f"{', '.join(s.env['CUDA_VISIBLE_DEVICES'] for s in slots)}")
        for r in runs:
            rec = state.get(r.run_id, {})
            st = rec.get("status") if rec and spec.current(rec) else None
            skip = st == "done" or (st == "failed" and not retry_failed)
            p = run_paths(out_dir, r, int(rec.get("attempt", 0)) + 1 if rec else 1)
            cmd = build_command(r, p, spec.configs[r.config.label], spec.definitions[r.run_id]["overrides"], out_dir,
                                threestudio, python, slots[0].launch_gpu)
            log(f"{f'[skip: {st}] ' if skip else ''}{r.run_id}\n  cd {shlex.quote(threestudio)} && {shlex.join(cmd)}")
        return counts

    if os.path.isdir(out_dir):  # a corrupt ledger or suite.json stops here, before the preflight's wait
        results.states()
        read_suite_file(out_dir, required=False)
    if not skip_preflight:
        why = preflight(python, threestudio, dict(os.environ, **slots[0].env))
        if why and executor == "local":
            raise SuiteError(f"launch.py cannot start here: `import threestudio` (what launch.py does before it "
                             f"loads extensions) fails in {python} with: {why}; no run was started "
                             "(`rfds-link --check` says what this machine lacks; --skip-preflight launches anyway)")
        if why:
            results.warn(f"`import threestudio` fails on this host ({why}); submitting anyway, since the "
                         "compute nodes may differ (a task whose launch fails records the error)")
    os.makedirs(out_dir, exist_ok=True)
    with results.ledger.transaction():
        check_revision(results, suite, spec, extra, new_revision)
    return {**counts, **ex.run(spec, runs, log)}

