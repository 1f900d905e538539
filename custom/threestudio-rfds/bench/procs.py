"""Child processes the runner owns: each in its own process group, killed if the runner dies.

``spawn`` starts a child in a new session (so a terminal's Ctrl-C reaches only the runner, which
forwards it) and, on Linux, sets ``PR_SET_PDEATHSIG`` = SIGKILL in the child: when the runner dies,
even by SIGKILL, the kernel kills the child.  The death signal follows the *thread* that forked the
child, so children are spawned from the runner's main loop thread, which outlives them.
``signals_to_exceptions`` turns SIGTERM/SIGINT/SIGHUP into :class:`Interrupted` so the runner can stop
its children and record them as interrupted.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional

PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """The runner got a terminating signal; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _prctl():
    """libc's prctl, looked up in the parent (no dlopen between fork and exec), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl, parent: int) -> None:  # runs in the child between fork and exec
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(137)


def spawn(cmd: List[str], *, cwd: str, env: Dict[str, str], log_path: str) -> subprocess.Popen:
    parent, prctl = os.getpid(), _prctl()
    preexec = (lambda: _die_with_parent(prctl, parent)) if prctl is not None else None
    with open(log_path, "ab") as logf:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the child's whole process group (its own workers too)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Iterable[subprocess.Popen], grace: float, hurry: Callable[[], bool] = lambda: False) -> None:
    """SIGINT to every group (Lightning shuts down cleanly), SIGKILL what is left after ``grace`` s
    (or as soon as ``hurry()``)."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    for p in procs:
        signal_group(p, signal.SIGKILL)  # also any grandchild that outlived the child
        if p.poll() is None:
            p.wait()


@contextlib.contextmanager
def signals_to_exceptions(enabled: bool = True) -> Iterator[Dict[str, Optional[int]]]:
    """Within the block SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` once; later signals only
    set ``state['again']`` (so cleanup is not cut short).  A no-op off the main thread."""
    state: Dict[str, Optional[int]] = {"signum": None, "again": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, _frame):
        if state["signum"] is None:
            state["signum"] = signum
            raise Interrupted(signum)
        state["again"] = signum

    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)
