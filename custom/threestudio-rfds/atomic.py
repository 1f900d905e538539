"""Atomic file writes: a reader sees the old file or the whole new one, never part of it."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp)`` fills a temporary file beside ``path`` (same file system); it is fsync'ed and
    published with ``os.replace``.  On any error the temporary file is removed and nothing changes."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
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
