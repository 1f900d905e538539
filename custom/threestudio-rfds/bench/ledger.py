"""The run ledger ``OUT/ledger.jsonl``: one JSON object per line, appended (rewritten whole only by
``rfds-bench status --rebuild``).  It is an index: each record is also in its attempt's trial folder
(bench/results.py), from which the ledger can be rebuilt.

Each record is ``{"run_id", "status", "time", ...}`` with status ``started`` → ``done`` | ``failed``
| ``interrupted``.  The state of a run is its last record.  Writers on many processes and nodes
append whole lines with one ``write`` under an exclusive POSIX lock on ``ledger.jsonl.lock``
(``fcntl.lockf``, which NFS honours), and fsync.  :meth:`Ledger.transaction` holds the lock across a
read and an append, so claiming a run (check its state, then append ``started``) is atomic.
A line that is not a JSON record (torn by a crash, or corrupt) is reported once with its line
number and skipped; a ledger of which no line is a record, or a directory in its place, is a
:class:`ResultsError` naming the fix.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from .errors import ResultsError

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

    def _unusable(self, what: str) -> ResultsError:
        out = os.path.dirname(os.path.abspath(self.path))
        return ResultsError(f"{self.path} {what}; `rfds-bench status {out} --rebuild` rebuilds the ledger from "
                            "the trial folders (and keeps the old one beside it)")

    def records(self) -> Iterator[Dict[str, Any]]:
        if os.path.isdir(self.path):
            raise self._unusable("is a directory, not rfds-bench's ledger")
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        except OSError as e:
            raise ResultsError(f"{self.path}: cannot read the ledger: {e.strerror}") from None
        good = 0
        pending = []  # bad lines before the first record: reported once a record shows this is a ledger
        with f:
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
                    pending.append((no, f"{self.path} line {no} skipped ({why}): {raw[:60]!r}"))
                    if not good:
                        continue
                for n, msg in pending:
                    if n not in self._reported:
                        self._reported.add(n)
                        self.warn(msg)
                pending = []
                if ok:
                    good += 1
                    yield rec
        if pending and not good:
            raise self._unusable(f"holds no run record (line {pending[0][0]}: {pending[0][1].rsplit(': ', 1)[1]})")

    def state(self) -> Dict[str, Dict[str, Any]]:
        """run_id → its last record."""
        out: Dict[str, Dict[str, Any]] = {}
        for rec in self.records():
            out[rec["run_id"]] = rec
        return out

    def append(self, run_id: str, status: str, **fields: Any) -> Dict[str, Any]:
        return self.add({"run_id": run_id, "status": status, "time": time.time(), **fields})

    def add(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        """Append ``rec`` as one line (one ``write``, fsync'ed) under the lock."""
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

    def rewrite(self, records: Iterable[Dict[str, Any]], keep_as: str) -> None:
        """Replace the ledger by ``records`` atomically, under the lock; the old file (or whatever stands
        at the path) is renamed to ``keep_as`` first, never deleted."""
        data = b"".join((json.dumps(r, sort_keys=True) + "\n").encode("utf-8") for r in records)
        with self.transaction():
            tmp = self.path + ".rebuild.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if os.path.lexists(self.path):
                os.rename(self.path, keep_as)
            os.replace(tmp, self.path)
