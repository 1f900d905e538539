"""Atomic writes: a reader sees the old file (or folder) or the whole new one, never part of it.

Files are created with the permissions of the user's umask (as ``open`` would), not the 0600 of
``mkstemp``, so a folder shared by a group stays readable by all its members."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Optional


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp)`` fills a temporary file beside ``path`` (same file system); it is fsync'ed and
    published with ``os.replace``.  On any error the temporary file is removed and nothing changes."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # after ``write``: some writers replace the file they are given
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _json_safe(x: Any) -> Any:
    """JSON has no inf/nan: non-finite floats become their string, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(path: str, obj: Any, sort_keys: bool = False) -> str:
    """``obj`` as indented JSON at ``path``, atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_json_safe(obj), f, indent=2, sort_keys=sort_keys, default=str)

    return atomic_write(path, write)


class OutputExistsError(FileExistsError):
    """The output location is taken (a file, a non-empty folder, or one that must not be replaced)."""


class StagedDir:
    """A folder built as a hidden sibling of ``final`` and moved into place by :meth:`publish`, so
    ``final`` holds one complete run or is left as it was (never a mix of two runs).

    ``final`` must be absent, an empty folder, or (``replace=True``) a folder that ``replaceable``
    accepts; anything else raises :class:`OutputExistsError` here, before any work.  Creating the
    sibling also proves the parent is writable.  A process killed outright (SIGKILL) leaves only
    the sibling ``.<name>.tmp-*``."""

    def __init__(self, final: str, replace: bool = False, replaceable: Optional[Callable[[str], bool]] = None):
        self.final = os.path.abspath(os.path.expanduser(final))
        self.replace = replace
        if os.path.lexists(self.final) and not os.path.isdir(self.final):
            raise OutputExistsError(f"{final!r} exists and is not a folder; name a new or existing output folder")
        if self._occupied():
            if not replace:
                raise OutputExistsError(f"{final!r} already holds files; choose another folder or pass --overwrite "
                                      "to replace it as a whole")
            if replaceable is not None and not replaceable(self.final):
                raise OutputExistsError(f"{final!r} is not an output folder of this tool; it is never replaced "
                                      "(choose another folder)")
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.final)}.tmp-")
        self.keep = False  # set when publishing was refused: the staged run is left for the user
        os.chmod(self.path, 0o777 & ~umask())

    def _occupied(self) -> bool:
        return os.path.isdir(self.final) and bool(os.listdir(self.final))

    def publish(self) -> str:
        """Move the staged folder to ``final`` (replacing the old one when allowed)."""
        if os.path.isdir(self.final) and not self._occupied():
            os.rmdir(self.final)
        if not os.path.lexists(self.final):
            os.rename(self.path, self.final)
            return self.final
        if not self.replace:
            self.keep = True
            raise OutputExistsError(f"{self.final!r} was created by someone else meanwhile; this run is kept in "
                                  f"{self.path!r}")
        old = tempfile.mkdtemp(dir=os.path.dirname(self.final), prefix=f".{os.path.basename(self.final)}.old-")
        aside = os.path.join(old, "run")
        try:
            os.rename(self.final, aside)
            os.rename(self.path, self.final)
        except BaseException:  # Ctrl-C or an error between the two renames: put the old run back
            if not os.path.lexists(self.final) and os.path.lexists(aside):
                os.rename(aside, self.final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        """Remove the staged folder (a no-op once published or when publishing was refused)."""
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
