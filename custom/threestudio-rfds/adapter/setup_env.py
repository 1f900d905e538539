"""``rfds-setup``: from a threestudio checkout to a checked environment in one command.

    rfds-setup THREESTUDIO_ROOT [--dry-run] [--clone] [--yes] [--force]

1. ``--clone``: clone threestudio at the tested commit into THREESTUDIO_ROOT (needs GitHub).
2. Install, with ``python -m pip``, the known-good set (:mod:`.envset`) around the torch already
   installed (torch is pinned to its own version in the command, so pip can neither replace a
   CUDA build nor change its version; torchvision only as the release made for that torch),
   plus threestudio's remaining requirements; conflicting or unbuildable entries are listed
   with the reason and skipped or replaced.
3. Where torch sees a GPU and nvcc exists, build tinycudann, nvdiffrast, nerfacc's and gsplat's
   CUDA kernels (and threestudio-3dgs' rasteriser and simple-knn where that extension is in
   ``custom/``); elsewhere print the commands and why training will not run here.
4. Link this package into ``custom/`` (``rfds-link``; ``--force`` replaces a link to another
   folder) and run the environment check; the last line says whether this machine can train.

Before anything is installed, the checkout is checked for what the link step needs (write access
to ``custom/``, no folder or foreign link in the way).  Ctrl-C prints one line saying which steps
finished and the command to re-run (safe: pip skips what is installed).  ``--dry-run`` prints
every step and command and changes nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, List, Optional

from packaging.version import Version

from . import envset
from .ts_requirements import plan_requirements, requirement_name

PYTORCH_INDEX = "https://download.pytorch.org/whl"


class SetupError(RuntimeError):
    """A step failed; the message names it."""


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


class Interrupted(Exception):
    """Ctrl-C during step ``n``."""

    def __init__(self, n: int, step: "Step"):
        super().__init__(n, step)
        self.n, self.step = n, step


@dataclass
class Step:
    """One step: a command run as a subprocess, or an in-process action, or a note."""

    what: str
    argv: Optional[List[str]] = None
    action: Optional[Callable[[], None]] = None
    notes: List[str] = field(default_factory=list)
    may_fail: bool = False  # CUDA builds: report and go on; the check then fails
    is_check: bool = False  # its exit status is the run's


def pip(*args: str) -> List[str]:
    return [sys.executable, "-m", "pip", "install", *args]


def installed_torch() -> Version:
    """The installed torch (never changed by rfds-setup); UsageError when absent or too old."""
    try:
        have = Version(metadata.version("torch"))
    except metadata.PackageNotFoundError:
        raise UsageError("torch is not installed: install the build for your machine first "
                         "(GPU: pip install torch==2.14.1 torchvision==0.29.1; CPU only: pip install torch==2.14.1 "
                         f"torchvision==0.29.1 --index-url {PYTORCH_INDEX}/cpu), then rerun rfds-setup") from None
    if Version(have.public) < Version(envset.MIN_TORCH):
        raise UsageError(f"torch {have} is older than {envset.MIN_TORCH}; rfds-setup never changes torch: "
                         "upgrade it yourself (pip install 'torch>=2.1' from the index of your CUDA version)")
    return have


def torchvision_plan(torch_v: Version) -> tuple[List[str], List[Step]]:
    """(requirements to add to the main install, extra steps) for torchvision."""
    from .envcheck import check_torch

    row = [r for r in check_torch() if r.component == "torchvision"][0]
    tv = envset.TORCHVISION_FOR_TORCH.get(torch_v.public)
    if row.status == "ok":
        return [f"torchvision=={Version(row.detail).public}"], []  # keep it as it is
    if tv is None:
        cmd = shlex.join(pip(f"torch=={torch_v.public}", "torchvision"))
        return [], [Step(f"torchvision: none known for torch {torch_v} ({row.detail})",
                         notes=[f"no known torchvision pair for torch {torch_v.public}; this lets pip pick the "
                                f"release built for it: {cmd}"])]
    if torch_v.local:  # a build from the PyTorch index (+cpu, +cu121, ...): its torchvision lives there too
        argv = pip(f"torch=={torch_v.public}", f"torchvision=={tv}",
                   "--extra-index-url", f"{PYTORCH_INDEX}/{torch_v.local}")
        return [f"torchvision=={tv}"], [Step(f"torchvision {tv}, the release for torch {torch_v} "
                                             f"({torch_v.local} index)", argv)]
    return [f"torchvision=={tv}"], []


def merge(pins: List[str], remaining: List[str]) -> List[str]:
    """``pins`` then the entries of ``remaining`` for distributions the pins do not name (extras
    such as ``imageio[ffmpeg]`` beside ``imageio>=2.28.0`` both stay: pip merges them)."""
    named = {requirement_name(p) for p in pins}
    return list(dict.fromkeys([*pins, *(r for r in remaining if requirement_name(r) not in named)]))


def cuda_steps(root: Optional[str] = None) -> List[Step]:
    """Build the CUDA extensions where possible (threestudio-3dgs' too where it is in ``custom/``);
    otherwise say why and how."""
    from .envcheck import no_gpu_reason

    builds = list(envset.CUDA_BUILDS)
    if root and os.path.isdir(os.path.join(root, "custom", envset.THREESTUDIO_3DGS)):
        builds += envset.THREESTUDIO_3DGS_BUILDS
    reason = no_gpu_reason() or (None if shutil.which("nvcc") else "nvcc not found (install the CUDA toolkit)")
    if reason is None:
        return [Step(f"build {b.name} ({b.why})", _argv(b.command), may_fail=True) for b in builds]
    notes = [f"{b.name}: {b.command}" for b in builds]
    return [Step(f"CUDA extensions: not built ({reason}); training (launch.py --train) will not run here. "
                 "On a machine with CUDA and nvcc run:", notes=notes)]


def _argv(command: str) -> List[str]:
    """A build command of :data:`envset.CUDA_BUILDS` as argv for this interpreter."""
    words = shlex.split(command)
    if words[0] == "pip":
        return [sys.executable, "-m", "pip", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    return words


def clone_steps(root: str) -> List[Step]:
    return [Step(f"clone threestudio {envset.THREESTUDIO_COMMIT[:7]}", ["git", "clone", envset.THREESTUDIO_URL, root]),
            Step("check out the tested commit", ["git", "-C", root, "checkout", envset.THREESTUDIO_COMMIT])]


def plan(root: str, cloned_later: bool = False, force: bool = False) -> List[Step]:
    """Every step after the clone, in order (nothing is executed here).  ``cloned_later``: the
    checkout does not exist yet (a dry run with --clone), so its requirements cannot be listed."""
    from .link import link

    torch_v = installed_torch()
    tv_reqs, steps = torchvision_plan(torch_v)
    if cloned_later:
        remaining: List[str] = []
        note = ["+ threestudio's remaining requirements.txt entries, read after the clone "
                "(a dry run without --clone on the checkout lists them)"]
    else:
        decisions, remaining = plan_requirements(root)
        note = [f"{d.line}: " + (f"replaced by {d.install} ({d.reason})" if d.install else f"skipped: {d.reason}")
                for d in decisions if d.reason]
    reqs = merge([f"torch=={torch_v.public}", *tv_reqs, *envset.install_pins()], remaining)
    steps.append(Step(f"install the known-good set around torch {torch_v} (pinned to itself) and threestudio's "
                      "remaining requirements", pip(*reqs), notes=note))
    steps += cuda_steps(root)
    steps.append(Step(f"link this package into {os.path.join(root, 'custom')}",
                      action=lambda: print(f"    {link(root, force=force)}")))
    steps.append(Step("check the environment", [sys.executable, "-m", "threestudio_rfds.adapter.envcheck", root],
                      is_check=True))
    return steps


def show(step: Step, n: int) -> None:
    print(f"[{n}] {step.what}")
    for note in step.notes:
        print(f"    - {note}")
    if step.argv:
        print(f"    $ {shlex.join(step.argv)}")


def run(steps: List[Step]) -> int:
    """Execute the steps in order; returns the exit status of the check step (SetupError on another
    failed step, except CUDA builds, which the check then reports)."""
    status = 0
    for n, step in enumerate(steps, 1):
        show(step, n)
        try:
            if step.action is not None:
                step.action()
            if step.argv is None:
                continue
            status = subprocess.run(step.argv).returncode  # on Ctrl-C it stops the child before re-raising
        except KeyboardInterrupt:
            raise Interrupted(n, step) from None
        if status and not (step.may_fail or step.is_check):
            raise SetupError(f"step {n} ({step.what}) failed with exit status {status}: {shlex.join(step.argv)}")
        if status and step.may_fail:
            print(f"    ! failed (exit status {status}); the check below reports it")
    return status


def check_root(root: str, clone: bool, force: bool = False) -> None:
    """A checkout the run can finish in, checked before anything is installed (the link step
    comes last: a read-only checkout or a folder in the way would otherwise fail after pip)."""
    from .link import link_problem

    if clone:
        if os.path.exists(root) and os.listdir(root):
            raise UsageError(f"--clone needs an empty or new folder, but {root!r} has files")
        return
    if not (os.path.isfile(os.path.join(root, "launch.py")) and os.path.isfile(os.path.join(root, "requirements.txt"))):
        raise UsageError(f"{root!r} is not a threestudio checkout (expected launch.py and requirements.txt); "
                         "pass its folder, or --clone to clone it there")
    problem = link_problem(root, force)
    if problem is not None:
        raise UsageError(f"the link step would fail, so nothing was installed: {problem}"
                         + (" (or pass --force)" if "--force" in problem else ""))


def last_line(root: str, status: int) -> str:
    """What the run leaves: the check failed, this machine cannot train, or the command to train."""
    from .envcheck import no_cuda_line, no_gpu_reason
    from .link import EXTENSION_NAME

    if status:
        return "rfds-setup: the environment check failed: fix the FAIL rows above, then re-run rfds-setup"
    if no_gpu_reason() is not None:
        return (f"rfds-setup: done; {no_cuda_line()}: run launch.py --train on a GPU machine; here the guidance, "
                "rfds-2d/rfds-edit and the tests run")
    return (f"rfds-setup: done; train with: cd {shlex.quote(root)} && python launch.py --config "
            f"custom/{EXTENSION_NAME}/configs/rfds-sd3.yaml --train --gpu 0 "
            "system.prompt_processor.prompt=\"a DSLR photo of a hamburger\"")


def interrupted_line(e: Interrupted, root: str, cloned: bool, force: bool) -> str:
    """One line for Ctrl-C: what finished, and the command that resumes (re-running is safe)."""
    done = f"steps 1-{e.n - 1} finished" if e.n > 1 else "no step finished"
    again = shlex.join(["rfds-setup", root, "--yes", *(["--clone"] if not cloned else []),
                        *(["--force"] if force else [])])
    return (f"rfds-setup: interrupted during step {e.n} ({e.step.what}); {done}, the later ones did not run; "
            f"re-running is safe (pip skips what is installed): {again}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rfds-setup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="threestudio checkout (with --clone: an empty or new folder)")
    p.add_argument("--dry-run", action="store_true", help="print every step and command, change nothing")
    p.add_argument("--clone", action="store_true",
                   help=f"clone threestudio {envset.THREESTUDIO_COMMIT[:7]} into ROOT first")
    p.add_argument("--yes", action="store_true", help="do not ask before installing")
    p.add_argument("--force", action="store_true",
                   help="replace an existing custom/threestudio-rfds link to another folder (as rfds-link --force)")
    args = p.parse_args(argv)
    root = os.path.abspath(os.path.expanduser(args.root))
    try:
        check_root(root, args.clone, args.force)
        first = clone_steps(root) if args.clone else []
        steps = first + plan(root, cloned_later=args.clone, force=args.force)
    except UsageError as e:
        print(f"rfds-setup: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run or not args.yes:
        for n, step in enumerate(steps, 1):
            show(step, n)
    if args.dry_run:
        print("dry run: nothing was changed")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            print("rfds-setup: error: pass --yes to install without asking (or --dry-run to see the steps)",
                  file=sys.stderr)
            return 2
        if input("run these steps? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    cloned = not first
    try:
        if first:
            run(first)
            cloned = True
            steps = plan(root, force=args.force)  # now with the clone's requirements.txt
        status = run(steps)
    except SetupError as e:
        print(f"rfds-setup: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(interrupted_line(e, root, cloned, args.force), file=sys.stderr)
        return 130
    print(last_line(root, status))
    return status


if __name__ == "__main__":
    sys.exit(main())
