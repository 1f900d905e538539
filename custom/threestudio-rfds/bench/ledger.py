"""A resume-safe run ledger: one JSON object per line, appended and fsync'ed.

Each record is ``{"run_id", "status", "time", ...}`` with status ``started`` → ``done`` |
``failed`` | ``interrupted``.  The state of a run is its last record; a run whose last record is
``started`` was cut off (the runner was killed) and is run again.  Appending whole lines with one
``write`` keeps every earlier record intact if the process dies; a torn last line is skipped.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Iterator, List

FINAL = ("done", "failed", "interrupted")


class Ledger:
    def __init__(self, path: str):
        self.path = path

    def records(self) -> Iterator[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # torn write at a crash
                    continue
                if isinstance(rec, dict) and "run_id" in rec:
                    yield rec

    def state(self) -> Dict[str, Dict[str, Any]]:
        """run_id → its last record."""
        out: Dict[str, Dict[str, Any]] = {}
        for rec in self.records():
            out[rec["run_id"]] = rec
        return out

    def append(self, run_id: str, status: str, **fields: Any) -> Dict[str, Any]:
        rec = {"run_id": run_id, "status": status, "time": time.time(), **fields}
        line = json.dumps(rec, sort_keys=True) + "\n"
        # a crash can leave a torn line without "\n": start on a fresh line so this record survives
        needs_nl = False
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_nl = f.read(1) != b"\n"
        with open(self.path, "a") as f:
            f.write(("\n" if needs_nl else "") + line)
            f.flush()
            os.fsync(f.fileno())
        return rec

    def finished(self, statuses=("done",)) -> List[str]:
        return [rid for rid, rec in self.state().items() if rec["status"] in statuses]
