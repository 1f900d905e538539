"""Reading a run's log: its tail, the line that says why it failed, and its training progress."""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

LOG_TAIL_LINES = 40
_ERROR = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)|Killed|Segmentation fault|"
                    r"CUDA out of memory|torch\.OutOfMemoryError|AssertionError|.*\bError:)\b.*")
# threestudio's training bar (Lightning's): "Epoch 0:  45%|████ | 450/1000 [00:10<00:12, ...]"; the log also
# holds transformers' "Loading weights: 100%| 53/53 [...]" and Lightning's validation/test bars, which are not
# training progress
_PROGRESS = re.compile(r"(?:^|[\r\n])Epoch \d+:[^\r\n]*?\|[^\r\n]*?\s(\d+)/(\d+) \[")


def read_tail(path: str, nbytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def log_tail(path: str, n: int = LOG_TAIL_LINES) -> str:
    lines = [ln.rsplit("\r", 1)[-1] for ln in read_tail(path).split("\n")]  # a progress bar's last state
    return "\n".join(lines[-n:]).strip("\n")


def error_line(text: str) -> Optional[str]:
    """The last line that looks like an error (``RuntimeError: ...``), else the last non-empty line."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    for ln in reversed(lines):
        if _ERROR.match(ln):
            return ln[:300]
    return lines[-1][:300] if lines else None


def progress(path: str) -> Optional[Tuple[int, int]]:
    """(step, total) of the last state of threestudio's training bar in the log, if it has started."""
    m = None
    for m in _PROGRESS.finditer(read_tail(path, 64 * 1024)):
        pass
    return (int(m.group(1)), int(m.group(2))) if m else None
