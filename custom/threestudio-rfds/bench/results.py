"""The state of a results folder.  Each attempt's trial folder holds its record, ``rfds-bench.json``
(``started``, then ``done`` | ``failed`` | ``interrupted``: status, the run's definition and its digest,
the launch command, and the score inputs), and is the truth; ``ledger.jsonl`` is an index of the same
records, rebuilt from the folders when it lacks them.

* A record is written to its trial folder (atomically) before the ledger, both under the ledger's lock.
* Reading the state merges the two: a folder's record that the ledger lacks — a ledger emptied or deleted,
  a runner killed between the two writes — is appended to the ledger, with a warning
  (:meth:`Results.rebuild` rewrites the whole ledger from the folders: ``rfds-bench status --rebuild``).
* A run recorded ``done`` whose trial folder or renders are gone has the state ``missing``: it is
  reported and rerun, never counted finished.
* Nothing here deletes a trial folder: every attempt gets a folder of its own (:meth:`Results.new_attempt`).
* ``suite.json`` records the suite revision the runs use, with every run's digest; :func:`suite_changes`
  names what differs from another revision.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from ..atomic import write_json
from .errors import ResultsError
from .ledger import Ledger
from .paths import LEDGER, RECORD, SUITE, RunPaths, attempts_on_disk, check_results, local_path, record_files, run_paths
from .suite import Run, Suite

SUITE_FIX = ("restore it, or delete it and run `rfds-bench run` again with the suite its runs used "
             "(checked against the trial folders' records, then written anew)")


_SAID: set = set()


def _warn(msg: str) -> None:
    print(f"rfds-bench: warning: {msg}", file=sys.stderr)


def read_suite_file(out_dir: str, required: bool = True) -> Optional[Dict[str, Any]]:
    """``OUT/suite.json`` as a dict; None if absent and not ``required`` (else FileNotFoundError); a file
    that is not the JSON rfds-bench wrote is a one-line :class:`ResultsError`."""
    path = os.path.join(out_dir, SUITE)
    if required:
        check_results(out_dir)
    elif not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except IsADirectoryError:
        raise ResultsError(f"{path} is a directory, not the suite record; {SUITE_FIX}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {SUITE_FIX}") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or "configs" not in data:
        raise ResultsError(f"{path} is not a suite record (no prompts/configs); {SUITE_FIX}")
    return data


def load_suite_file(out_dir: str) -> Suite:
    d = read_suite_file(out_dir)
    keys = ("name", "prompts", "configs", "seeds", "overrides", "description", "source", "slurm")
    return Suite.from_dict({k: d[k] for k in keys if k in d})


def suite_record(suite: Suite, extra_overrides: List[str], config_sha: Dict[str, str], digests: Dict[str, str],
                 revision: int) -> Dict[str, Any]:
    """What ``suite.json`` holds: the suite, the command line's ``--override``s, each config file's
    content hash, every run's digest and the revision number."""
    return {**suite.to_dict(), "extra_overrides": list(extra_overrides), "config_sha": dict(config_sha),
            "digests": dict(digests), "revision": revision}


def suite_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two suite records, in words (empty: the same runs)."""
    out: List[str] = []
    op, np_ = list(old.get("prompts", [])), list(new["prompts"])
    added, removed = [p for p in np_ if p not in op], [p for p in op if p not in np_]
    if added:
        out.append(f"prompts added: {added}")
    if removed:
        out.append(f"prompts removed: {removed}")
    if not added and not removed and op != np_:
        out.append("prompts reordered")
    for key, name in (("seeds", "seeds"), ("overrides", "overrides"), ("extra_overrides", "--override")):
        a, b = old.get(key, [0] if key == "seeds" else []), new.get(key, [])
        if a != b:
            out.append(f"{name} {a} → {b}")
    oc = {c["label"]: c for c in old.get("configs", [])}
    nc = {c["label"]: c for c in new["configs"]}
    out += [f"config {label} added" for label in nc if label not in oc]
    out += [f"config {label} removed" for label in oc if label not in nc]
    for label in (x for x in nc if x in oc):
        a, b = oc[label], nc[label]
        for key in ("path", "overrides"):
            if a.get(key) != b.get(key):
                out.append(f"config {label}: {key} {a.get(key)} → {b.get(key)}")
        sa, sb = old.get("config_sha", {}).get(label), new.get("config_sha", {}).get(label)
        if sa and sb and sa != sb and a.get("path") == b.get("path"):
            out.append(f"config {label}: {b['path']} changed (content {sa[:8]} → {sb[:8]})")
    return out


def definition_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two run definitions (bench.command.run_definition), in words."""
    out = []
    for key in ("config", "config_path", "prompt", "seed", "overrides"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)!r} → {new.get(key)!r}" if key != "overrides"
                       else f"overrides {old.get(key)} → {new.get(key)}")
    if old.get("config_sha") != new.get("config_sha") and old.get("config_path") == new.get("config_path"):
        out.append(f"config {new.get('config')}: {new.get('config_path')} changed "
                   f"(content {str(old.get('config_sha'))[:8]} → {str(new.get('config_sha'))[:8]})")
    return out


def _newer(folder: Dict[str, Any], ledger: Dict[str, Any]) -> bool:
    """Whether a folder's record is newer than the ledger's last record of the same run."""
    fa, la = folder.get("attempt", 1), ledger.get("attempt", 1)
    return fa > la or (fa == la and ledger.get("status") == "started" and folder.get("status") != "started")


class Results:
    """One results folder's records: read (merged, repaired), written, rebuilt."""

    def __init__(self, out_dir: str, warn: Callable[[str], None] = _warn):
        self.out_dir = out_dir
        self.warn = warn
        self.ledger = Ledger(os.path.join(out_dir, LEDGER), warn)

    def _say(self, key: str, msg: str) -> None:
        """``msg`` once per process and results folder (a command reads the state several times)."""
        if (self.out_dir, key) not in _SAID:
            _SAID.add((self.out_dir, key))
            self.warn(msg)

    # -- reading ------------------------------------------------------------------------------------
    def _read_record(self, path: str) -> Optional[Dict[str, Any]]:
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self._say(path, f"{os.path.relpath(path, self.out_dir)} skipped: not readable ({str(e)[:80]})")
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("run_id"), str) or "status" not in rec:
            self._say(path, f"{os.path.relpath(path, self.out_dir)} skipped: not a run record")
            return None
        return rec

    def folder_records(self, runs: Optional[Iterable[Run]] = None) -> Dict[str, Dict[int, Dict[str, Any]]]:
        """run_id → attempt → the record in that attempt's trial folder (all runs, or ``runs``)."""
        if runs is None:
            files = record_files(self.out_dir)
        else:
            files = [p.record for r in runs for p in (run_paths(self.out_dir, r, a) for a in attempts_on_disk(self.out_dir, r))
                     if os.path.isfile(p.record)]
        out: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for f in files:
            rec = self._read_record(f)
            if rec is not None:
                out.setdefault(rec["run_id"], {})[int(rec.get("attempt", 1))] = rec
        return out

    def states(self, runs: Optional[Iterable[Run]] = None) -> Dict[str, Dict[str, Any]]:
        """run_id → its newest record, from the ledger and the trial folders (of all runs, or of ``runs``);
        folder records the ledger lacks are added to it; a ``done`` run whose trial folder is gone gets
        status ``missing`` (and ``missing``: what is gone)."""
        state = self.ledger.state()
        newer = []
        for rid, by_attempt in self.folder_records(runs).items():
            rec = by_attempt[max(by_attempt)]
            if rid not in state or _newer(rec, state[rid]):
                state[rid] = rec
                newer.append(rec)
        if newer:
            self._repair(newer)
        for rid, rec in state.items():
            gone = self._gone(rec) if rec["status"] == "done" else None
            if gone:
                state[rid] = {**rec, "status": "missing", "missing": gone}
                self._say("missing " + rid, f"{rid} is recorded done, but {gone}: it counts as not finished "
                                            "and the next `rfds-bench run` reruns it")
        return state

    def _gone(self, rec: Dict[str, Any]) -> Optional[str]:
        for key, what in (("trial_dir", "trial folder"), ("renders_dir", "test renders")):
            if rec.get(key) and not os.path.isdir(local_path(self.out_dir, rec[key])):
                return f"its {what} {rec[key]} is gone"
        return None

    def _repair(self, newer: List[Dict[str, Any]]) -> None:
        """Append to the ledger the folder records it lacks (re-checked under its lock)."""
        try:
            with self.ledger.transaction():
                existed = os.path.isfile(self.ledger.path) and os.path.getsize(self.ledger.path) > 0
                current = self.ledger.state()
                add = [r for r in newer if r["run_id"] not in current or _newer(r, current[r["run_id"]])]
                for rec in sorted(add, key=lambda r: r.get("time", 0)):
                    self.ledger.add(rec)
        except OSError as e:  # a read-only copy: the folders' records are used as they are
            self._say("repair", f"{self.ledger.path} lacks the newest record of {len(newer)} run(s) that their "
                                f"trial folders hold, and cannot be updated ({e.strerror}); using the folders' records")
            return
        if add:
            what = f"lacked the newest record of {len(add)} run(s)" if existed else "was missing or empty"
            self.warn(f"{self.ledger.path} {what}: rebuilt it from {len(add)} trial folder(s)' records "
                      f"(e.g. {add[0]['run_id']}: {add[0]['status']}); `rfds-bench status {self.out_dir} --rebuild` "
                      "rewrites the whole ledger")

    # -- writing ------------------------------------------------------------------------------------
    def new_attempt(self, run: Run, after: int = 0) -> RunPaths:
        """A new trial folder for ``run`` (attempt > ``after`` and > any folder on disk), created here;
        call under the ledger's lock."""
        n = max([after, *attempts_on_disk(self.out_dir, run)]) + 1
        while True:
            p = run_paths(self.out_dir, run, n)
            os.makedirs(os.path.dirname(p.trial_dir), exist_ok=True)
            try:
                os.mkdir(p.trial_dir)
                return p
            except FileExistsError:
                n += 1

    def write(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        """``rec`` into its trial folder (``rec['trial_dir']``, atomically), then into the ledger."""
        with self.ledger.transaction():
            trial = local_path(self.out_dir, rec["trial_dir"]) if rec.get("trial_dir") else None
            if trial and os.path.isdir(trial):
                write_json(os.path.join(trial, RECORD), rec, sort_keys=True)
            return self.ledger.add(rec)

    def close(self, rec: Dict[str, Any], status: str, **fields: Any) -> Dict[str, Any]:
        """A new record of the same attempt (``started`` → ``interrupted`` when its owner is gone)."""
        return self.write({**rec, "status": status, "time": time.time(), **fields})

    def rebuild(self) -> Dict[str, Any]:
        """Rewrite the ledger from every trial folder's record, oldest first; the old ledger (or whatever
        stood in its place) is kept as ``ledger.jsonl.old-<time>``."""
        recs = [r for by_attempt in self.folder_records().values() for r in by_attempt.values()]
        recs.sort(key=lambda r: (r.get("time", 0), r["run_id"], r.get("attempt", 1)))
        keep = f"{self.ledger.path}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        while os.path.lexists(keep):
            keep += "+"
        existed = os.path.lexists(self.ledger.path)
        self.ledger.rewrite(recs, keep)
        return {"records": len(recs), "runs": len({r["run_id"] for r in recs}), "kept": keep if existed else None}
