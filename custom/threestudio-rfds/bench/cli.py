"""``rfds-bench``: ``run`` a suite through threestudio, ``score`` its renders with CLIP, ``report``.

    rfds-bench run default --threestudio ~/threestudio --out bench-out [--dry-run] [--python EXE]
    rfds-bench score bench-out --clip-model openai/clip-vit-base-patch32
    rfds-bench report bench-out
    rfds-bench validate configs/*.yaml
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .suite import SuiteError, load_suite


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rfds-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite (resumes: finished runs are skipped)")
    r.add_argument("suite", help="suite YAML path or name in configs/ (default, dreamfusion-gallery, t3bench-*)")
    r.add_argument("--threestudio", required=True, help="threestudio checkout (has launch.py; the plugin linked in custom/)")
    r.add_argument("--out", default=None, help="results folder (default bench-out/<suite name>)")
    r.add_argument("--python", default=None, help="Python of the threestudio environment (default: this one)")
    r.add_argument("--gpu", default="0", help="passed to launch.py --gpu")
    r.add_argument("--dry-run", action="store_true", help="print the launch commands, run nothing")
    r.add_argument("--retry-failed", action="store_true", help="also rerun runs recorded as failed")
    r.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped and marked failed")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra threestudio override for every run (repeatable), e.g. trainer.max_steps=100")
    s = sub.add_parser("score", help="CLIP score and R-precision of the test renders")
    s.add_argument("results")
    s.add_argument("--clip-model", default=None, help="hub id or local folder (default openai/clip-vit-base-patch32)")
    s.add_argument("--device", default="auto")
    s.add_argument("--panel", default="first-square", choices=["first-square", "full"],
                   help="first-square: keep the rgb panel of threestudio's rgb|normal|opacity test grid")
    s.add_argument("--max-views", type=int, default=None, help="score this many evenly spaced views per run")
    s.add_argument("--batch-size", type=int, default=32)
    p = sub.add_parser("report", help="markdown table and plots")
    p.add_argument("results")
    v = sub.add_parser("validate", help="check suite files")
    v.add_argument("suites", nargs="+")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            from .runner import run_suite
            from .suite import _check_overrides

            suite = load_suite(args.suite)
            extra = _check_overrides("--override", args.override)
            out = args.out or f"bench-out/{suite.name}"
            counts = run_suite(suite, args.threestudio, out, python=args.python, gpu=args.gpu, dry_run=args.dry_run,
                               retry_failed=args.retry_failed, timeout=args.timeout, extra_overrides=extra)
            if not args.dry_run:
                print(f"{suite.name}: {counts['done']} done, {counts['failed']} failed, "
                      f"{counts['skipped']} already finished (of {counts['planned']}); results in {out}")
            return 1 if counts["failed"] else 0
        if args.cmd == "score":
            from .score import DEFAULT_CLIP, ClipScorer, score_results

            scorer = ClipScorer(args.clip_model or DEFAULT_CLIP, device=args.device, batch_size=args.batch_size)
            res = score_results(args.results, scorer, panel=args.panel, max_views=args.max_views)
            print(f"scored {len(res['runs'])} runs → {args.results}/scores.json")
            return 0
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
    except (SuiteError, FileNotFoundError) as e:
        print(f"rfds-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rfds-bench: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
