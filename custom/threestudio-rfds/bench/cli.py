"""``rfds-bench``: ``run`` a suite through threestudio, ``score`` its renders with CLIP, ``report``.

    rfds-bench run default --threestudio ~/threestudio --out bench-out [--gpus 0,1,2,3 | all]
    rfds-bench run default --threestudio ~/threestudio --out /shared/bench --executor slurm --partition gpu
    rfds-bench status bench-out [--rebuild]
    rfds-bench score bench-out --clip-model openai/clip-vit-base-patch32
    rfds-bench report bench-out
    rfds-bench validate configs/*.yaml
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from .errors import BenchError, SuiteError
from .suite import load_suite


def _number(kind: type, what: str, low: float, strict: bool):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or v != v or v == float("inf") or (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {what} {'>' if strict else '>='} {low:g}, got {text!r}")
        return v

    return parse


def _gpus(what: str, allow_all: bool):
    def parse(text: str) -> str:
        from .executors import gpu_ids

        if not (allow_all and text.strip() == "all"):
            try:
                gpu_ids(text, what)
            except SuiteError as e:
                raise argparse.ArgumentTypeError(str(e).replace(f"{what} must", "must", 1)) from None
        return text

    return parse


def _key_value(text: str):
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (an sbatch option without '--'), got {text!r}")
    k, v = text.split("=", 1)
    return k.strip().lstrip("-"), v


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the full usage of ``run`` is a screenful): exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="rfds-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite (resumes: finished runs are skipped)")
    r.add_argument("suite", help="suite YAML path (relative to the current folder) or name in configs/ (default, ...)")
    r.add_argument("--threestudio", required=True, help="threestudio checkout (has launch.py; the plugin linked in custom/)")
    r.add_argument("--out", default=None, help="results folder (default bench-out/<suite name>)")
    r.add_argument("--python", default=None, help="Python of the threestudio environment (default: this one)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--gpu", default="0", type=_gpus("--gpu", False), help="passed to launch.py --gpu (one run at a time)")
    g.add_argument("--gpus", default=None, type=_gpus("--gpus", True),
                   help="'all' or ids such as 0,1,2,3: one run per GPU at a time")
    r.add_argument("--executor", default="local", choices=["local", "slurm"], help="where runs go (default local)")
    r.add_argument("--dry-run", action="store_true", help="print the launch commands, run nothing")
    r.add_argument("--retry-failed", action="store_true", help="also rerun runs recorded as failed")
    r.add_argument("--new-revision", action="store_true",
                   help="run a suite that changed since its runs in --out (unchanged runs are kept, changed ones rerun)")
    r.add_argument("--skip-preflight", action="store_true",
                   help="launch even if `import threestudio` fails in --python (tests, launchers that do not need it)")
    r.add_argument("--timeout", type=_number(float, "seconds", 0, True), default=None,
                   help="seconds per run before it is stopped and marked failed")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra threestudio override for every run (repeatable), e.g. trainer.max_steps=100")
    r.add_argument("--progress-every", type=_number(float, "seconds", 0, True), default=60.0,
                   help="seconds between progress reports (default 60)")
    r.add_argument("--stale-after", type=_number(float, "seconds", 0, True), default=300.0,
                   help="a run started on another host whose runner's heartbeat is older is rerun (default 300)")
    s = r.add_argument_group("--executor slurm (defaults from the suite's 'slurm:' section)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", dest="time_min", type=_number(int, "minutes", 1, False), help="minutes per task")
    s.add_argument("--gpus-per-task", type=_number(int, "a GPU count", 0, False))
    s.add_argument("--cpus-per-task", type=_number(int, "a CPU count", 1, False))
    s.add_argument("--mem-gb", type=_number(float, "GB", 0, True))
    s.add_argument("--array-parallelism", type=_number(int, "a task count", 1, False),
                   help="at most this many array tasks at once")
    s.add_argument("--sbatch", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="extra sbatch option (repeatable), e.g. qos=high or constraint=a100")
    s.add_argument("--max-requeues", type=_number(int, "a count", 0, False), help="requeues after preemption/time-out")
    s.add_argument("--wait", action="store_true", help="wait for the array to finish")
    s.add_argument("--slurm-cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit's cluster: slurm, or local/debug to try the array path on this machine")

    st = sub.add_parser("status", help="queued / running / done / failed runs of a results folder")
    st.add_argument("results")
    st.add_argument("--rebuild", action="store_true", help="rewrite ledger.jsonl from the trial folders' records")
    sc = sub.add_parser("score", help="CLIP score and R-precision of the test renders")
    sc.add_argument("results")
    sc.add_argument("--clip-model", default=None, help="hub id or local folder (default openai/clip-vit-base-patch32)")
    sc.add_argument("--device", default="auto")
    sc.add_argument("--panel", default="first-square", choices=["first-square", "full"],
                    help="first-square: keep the rgb panel of threestudio's rgb|normal|opacity test grid")
    sc.add_argument("--max-views", type=_number(int, "a view count", 1, False), default=None,
                    help="score this many evenly spaced views per run")
    sc.add_argument("--batch-size", type=_number(int, "a batch size", 1, False), default=32)
    p = sub.add_parser("report", help="markdown table and plots")
    p.add_argument("results")
    v = sub.add_parser("validate", help="check suite files")
    v.add_argument("suites", nargs="+")
    return ap


def _slurm_options(args: argparse.Namespace) -> Dict[str, Any]:
    keys = ("partition", "account", "time_min", "gpus_per_task", "cpus_per_task", "mem_gb", "array_parallelism",
            "max_requeues")
    opts: Dict[str, Any] = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    opts.update(cluster=args.slurm_cluster, wait=args.wait)
    if args.sbatch:
        opts["sbatch"] = dict(args.sbatch)
    return opts


def _run(args: argparse.Namespace) -> int:
    from .results import Results
    from .runner import run_suite

    suite = load_suite(args.suite)
    out = args.out or f"bench-out/{suite.name}"
    options = _slurm_options(args) if args.executor == "slurm" else None
    counts = run_suite(suite, args.threestudio, out, python=args.python, gpu=args.gpu, gpus=args.gpus,
                       dry_run=args.dry_run, retry_failed=args.retry_failed, timeout=args.timeout,
                       extra_overrides=args.override, executor=args.executor, executor_options=options,
                       progress_every=args.progress_every, stale_after=args.stale_after,
                       new_revision=args.new_revision, skip_preflight=args.skip_preflight,
                       log=lambda s: print(s, flush=True))
    if args.dry_run:
        return 0
    if "submitted" in counts and not (args.wait or args.slurm_cluster == "debug"):
        print(f"{suite.name}: {counts['submitted']} runs submitted, {counts.get('already_queued', 0)} already queued, "
              f"{counts['skipped']} already done, {counts['failed_earlier']} failed earlier, "
              f"{counts['running_elsewhere']} running elsewhere (of {counts['planned']}); results in {out}")
        return 0
    state = Results(out).states()
    ids = [r.run_id for r in suite.runs()]
    failed = [(rid, state[rid]) for rid in ids if state.get(rid, {}).get("status") == "failed"]
    unfinished = [rid for rid in ids if state.get(rid, {}).get("status") not in ("done", "failed")]
    print(f"{suite.name}: {counts['done']} done, {counts['failed']} failed"
          + (f", {counts['interrupted']} interrupted" if counts.get("interrupted") else "") + " in this run; "
          f"{counts['skipped']} already finished, {counts['failed_earlier']} failed earlier"
          + (f", {counts['running_elsewhere']} running elsewhere" if counts.get("running_elsewhere") else "")
          + f" (of {counts['planned']}); results in {out}")
    if failed:
        print(f"{len(failed)} failed run(s) (rerun with --retry-failed; full log tails in ledger.jsonl):")
        for rid, rec in failed:
            print(f"  {rid}: {rec.get('error')}")
    if unfinished:
        print(f"{len(unfinished)} run(s) not finished here (see `rfds-bench status {out}`): "
              f"{', '.join(unfinished[:5])}{' ...' if len(unfinished) > 5 else ''}")
    return 1 if failed or counts.get("interrupted") else 0  # interrupted: stopped from outside, rerun to finish


def _score(args: argparse.Namespace) -> int:
    from .results import Results, read_suite_file
    from .score import DEFAULT_CLIP, ClipScorer, score_results

    read_suite_file(args.results)  # a results folder whose records can be read, before loading CLIP
    Results(args.results).states()
    try:
        scorer = ClipScorer(args.clip_model or DEFAULT_CLIP, device=args.device, batch_size=args.batch_size)
    except OSError as e:
        print(f"rfds-bench: error: {e}", file=sys.stderr)
        return 2
    res = score_results(args.results, scorer, panel=args.panel, max_views=args.max_views)
    print(f"scored {len(res['runs'])} runs → {os.path.join(args.results, 'scores.json')}")
    if not res["runs"]:
        print(f"rfds-bench: no finished run to score in {args.results} (see `rfds-bench status {args.results}`)",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .procs import Interrupted

    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args)
        if args.cmd == "status":
            from .status import print_status

            return print_status(args.results, rebuild=args.rebuild)
        if args.cmd == "score":
            return _score(args)
        if args.cmd == "report":
            from .report import write_report

            res = write_report(args.results)
            print(res["markdown"])
            print(f"wrote {res['report']}" + "".join(f", {p}" for p in res["plots"]))
            return 0
        if args.cmd == "validate":
            for path in args.suites:
                s = load_suite(path)
                print(f"{path}: ok ({s.name}: {len(s.prompts)} prompts, {len(s.configs)} configs, seeds {s.seeds}, "
                      f"{len(s.runs())} runs)")
            return 0
    except (BenchError, FileNotFoundError) as e:
        print(f"rfds-bench: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"rfds-bench: stopped by {e.args[0]}; running launches were stopped and recorded as interrupted; "
              "run the same command again to resume", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("rfds-bench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
