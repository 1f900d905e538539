"""The layout of a results folder OUT.  Paths are stored relative to OUT, so it can be copied or moved.

    OUT/suite.json                                   the suite revision its runs use (bench/results.py)
    OUT/ledger.jsonl                                 the index of every record (bench/ledger.py)
    OUT/runs/<label>/<tag>/                          threestudio's trial dir of a run's first attempt:
                                                     exp_root_dir=OUT/runs, name=<label>, tag=<tag>
    OUT/runs/<label>/<tag>-a<N>/                     attempt N >= 2 (a rerun never reuses a folder)
    OUT/runs/<label>/<tag>[-a<N>]/rfds-bench.json    the attempt's record, written atomically
    OUT/runs/<label>/<tag>[-a<N>]/save/it<K>-test/   threestudio's test renders
    OUT/logs/<label>/<tag>[-a<N>].log, .stats.json   the launch's stdout+stderr, memwrap's peak memory

with ``<tag> = <prompt-slug>-<hash6>-s<seed>``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from .suite import Run

RECORD = "rfds-bench.json"
SUITE = "suite.json"
LEDGER = "ledger.jsonl"
_TEST_DIR = re.compile(r"^it(\d+)-test$")


@dataclass(frozen=True)
class RunPaths:
    """The files of one attempt of one run (absolute)."""

    attempt: int
    tag: str
    trial_dir: str
    log: str
    stats: str

    @property
    def record(self) -> str:
        return os.path.join(self.trial_dir, RECORD)


def base_tag(run: Run) -> str:
    return f"{run.slug}-s{run.seed}"


def run_paths(out_dir: str, run: Run, attempt: int = 1) -> RunPaths:
    tag = base_tag(run) + ("" if attempt == 1 else f"-a{attempt}")
    logs = os.path.join(out_dir, "logs", run.config.label)
    return RunPaths(attempt, tag, os.path.join(out_dir, "runs", run.config.label, tag),
                    os.path.join(logs, tag + ".log"), os.path.join(logs, tag + ".stats.json"))


def attempts_on_disk(out_dir: str, run: Run) -> List[int]:
    """Attempt numbers whose trial folders exist (with or without a record)."""
    label_dir = os.path.join(out_dir, "runs", run.config.label)
    try:
        names = os.listdir(label_dir)
    except OSError:
        return []
    pat = re.compile(re.escape(base_tag(run)) + r"(?:-a(\d+))?$")
    found = [pat.match(n) for n in names]
    return sorted(int(m.group(1) or 1) for m in found if m)


def record_files(out_dir: str) -> List[str]:
    """Every attempt's record file under ``OUT/runs``."""
    runs = os.path.join(out_dir, "runs")
    out = []
    for label in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        d = os.path.join(runs, label)
        for tag in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if os.path.isfile(os.path.join(d, tag, RECORD)):
                out.append(os.path.join(d, tag, RECORD))
    return out


def check_results(out_dir: str) -> str:
    """``out_dir/suite.json``, or FileNotFoundError saying this is not a results folder."""
    suite_file = os.path.join(out_dir, SUITE)
    if not os.path.isfile(suite_file):
        why = "does not exist" if not os.path.exists(out_dir) else "has no suite.json"
        raise FileNotFoundError(f"results folder {out_dir!r} {why}: pass the --out folder of `rfds-bench run`")
    return suite_file


def local_path(out_dir: str, path: str) -> str:
    """A stored path inside the results folder.  Paths are stored relative to it; an absolute one from an
    older ledger is re-rooted at its ``runs/`` or ``logs/`` part (``runs/<label>/<tag>[/save/it<N>-test]``,
    ``logs/<label>/<tag>.log``), so a copied or moved folder reads its own files."""
    if not os.path.isabs(path):
        return os.path.join(out_dir, path)
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 5 and parts[-5] == "runs" and parts[-2] == "save":
        return os.path.join(out_dir, *parts[-5:])
    if len(parts) > 3 and parts[-3] in ("runs", "logs"):
        return os.path.join(out_dir, *parts[-3:])
    return path


def find_test_renders(trial_dir: str) -> Dict[str, object]:
    """The test renders of the last step: ``save/it<N>-test/*.png`` with the largest N, views sorted
    by their numeric name (threestudio names them by the test batch index)."""
    save = os.path.join(trial_dir, "save")
    best: Optional[tuple] = None
    if os.path.isdir(save):
        for d in os.listdir(save):
            m = _TEST_DIR.match(d)
            if m and os.path.isdir(os.path.join(save, d)) and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), d)
    if best is None:
        return {"step": None, "renders_dir": None, "renders": []}
    d = os.path.join(save, best[1])
    pngs = [f for f in os.listdir(d) if f.lower().endswith(".png")]
    pngs.sort(key=lambda f: (0, int(f[:-4])) if f[:-4].isdigit() else (1, f))
    return {"step": best[0], "renders_dir": d, "renders": pngs}
