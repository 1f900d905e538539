"""Paths inside a results folder: stored relative to it, so the folder can be copied or moved."""
from __future__ import annotations

import os


def check_results(out_dir: str) -> str:
    """``out_dir/suite.json``, or FileNotFoundError saying this is not a results folder."""
    suite_file = os.path.join(out_dir, "suite.json")
    if not os.path.isfile(suite_file):
        why = "does not exist" if not os.path.exists(out_dir) else "has no suite.json"
        raise FileNotFoundError(f"results folder {out_dir!r} {why}: pass the --out folder of `rfds-bench run`")
    return suite_file


def local_path(out_dir: str, path: str) -> str:
    """A ledger path inside the results folder.  Paths are stored relative to it; an absolute one from an
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
