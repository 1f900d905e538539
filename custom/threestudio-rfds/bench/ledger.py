"""The run ledger ``OUT/ledger.jsonl``: one JSON object per line, appended, never rewritten.

Each record is ``{"run_id", "status", "time", ...}`` with status ``started`` → ``done`` | ``failed``
| ``interrupted``.  The state of a run is its last record.  Writers on many processes and nodes
append whole lines with one ``write`` under an exclusive POSIX lock on ``ledger.jsonl.lock``
(``fcntl.lockf``, which NFS honours), and fsync.  :meth:`Ledger.transaction` holds the lock across a
read and an append, so claiming a run (check its state, then append ``started``) is atomic.
A line that is not a JSON record (torn by a crash, or corrupt) is reported once with its line
number and skipped.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

FINAL = ("done", "failed", "interrupted")


def _warn(msg: str) -> None:
    print(f"rfds-bench: warning: {msg}", file=sys.stderr)


class Ledger:
    def __init__(self, path: str, warn: Callable[[str], None] = _warn):
        self.path = path
        self.warn = warn
        self._reported: set = set()
        self._lock_fd: Optional[int] = None
        self._depth = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Ledger"]:
        """Exclusive access (re-entrant within this object) for a read-then-append."""
        if self._depth == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the lock
                self._lock_fd = None

    def records(self) -> Iterator[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            for no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    ok = isinstance(rec, dict) and isinstance(rec.get("run_id"), str) and "status" in rec
                    why = "not a run record"
                except (UnicodeDecodeError, ValueError) as e:
                    ok, why = False, str(e).split(":")[0]
                if not ok:
                    if no not in self._reported:
                        self._reported.add(no)
                        self.warn(f"{self.path} line {no} skipped ({why}): {raw[:60]!r}")
                    continue
                yield rec

    def state(self) -> Dict[str, Dict[str, Any]]:
        """run_id → its last record."""
        out: Dict[str, Dict[str, Any]] = {}
        for rec in self.records():
            out[rec["run_id"]] = rec
        return out

    def append(self, run_id: str, status: str, **fields: Any) -> Dict[str, Any]:
        rec = {"run_id": run_id, "status": status, "time": time.time(), **fields}
        line = (json.dumps(rec, sort_keys=True) + "\n").encode("utf-8")
        with self.transaction():
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                # a crash can leave a torn line without "\n": start on a fresh line so this record survives
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return rec

    def finished(self, statuses=("done",)) -> List[str]:
        return [rid for rid, rec in self.state().items() if rec["status"] in statuses]
