"""The environment check behind ``rfds-link --check`` and the end of ``rfds-setup``.

    python -m threestudio_rfds.adapter.envcheck [THREESTUDIO_ROOT]

    python -m threestudio_rfds.adapter.envcheck THREESTUDIO_ROOT --for training

One row per component: ``ok``, ``warn`` (works, but note the detail) or ``FAIL`` (with the fix);
the exit status is 1 when any row fails.  Versions are read from the installed distributions'
metadata (importlib.metadata), compared with :mod:`.envset`, the data ``rfds-setup`` installs.

Without CUDA, the CUDA extensions (tinycudann, nvdiffrast, nerfacc's and gsplat's kernels) cannot
be built or used; they are then ``warn`` "not built (no CUDA)": the guidance, prompt processors and
tests run, training does not, and the check says so in one line ("this machine has no CUDA;
training needs a GPU").  Where torch sees CUDA their absence is a failure.  threestudio-3dgs is
optional: its rows (rasteriser, simple-knn) only warn.  ``--for training`` asks whether
``launch.py --train`` can run here: no GPU, a CUDA extension not built or the extension not linked
are then failures (exit status 1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import List, Optional

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from . import envset

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Row:
    component: str
    status: str  # OK, WARN or FAIL
    detail: str


def dist_version(dist: str) -> Optional[str]:
    """Installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def public(version: str) -> Version:
    """The public part of a version: 2.14.1+cu128 → 2.14.1."""
    return Version(Version(version).public)


def check_component(c: envset.Component) -> Row:
    """A row for one library of the known-good set."""
    have = dist_version(c.dist)
    fix = c.fix or (f"pip install '{c.pin}'" if c.pin else f"pip install '{c.dist}{c.accept}'")
    if have is None:
        if c.optional:
            return Row(c.dist, OK, "not installed (optional)")
        return Row(c.dist, FAIL, f"not installed; fix: {fix}")
    try:
        fine = not c.accept or public(have) in SpecifierSet(c.accept)
    except InvalidVersion:
        fine = False
    if fine:
        return Row(c.dist, OK, have)
    return Row(c.dist, FAIL, f"{have} is outside {c.accept}: {c.why}; fix: {fix}")


def check_threestudio(root: str) -> List[Row]:
    """Version (parsed from the source), commit (when the checkout has git metadata) and link."""
    from .compat import ThreestudioVersionError, check_threestudio_version
    from .link import LinkError, link_state, threestudio_version

    try:
        version = threestudio_version(root)
        check_threestudio_version(version)
    except (LinkError, ThreestudioVersionError) as e:
        return [Row("threestudio", FAIL, str(e))]
    commit = _git_commit(root)
    if commit is None:
        tested = envset.THREESTUDIO_COMMIT[:7]
        row = Row("threestudio", OK, f"{version} at {root} (no git metadata; tested commit {tested})")
    elif commit == envset.THREESTUDIO_COMMIT:
        row = Row("threestudio", OK, f"{version} at {root}, commit {commit[:7]} (the tested one)")
    else:
        pin = envset.THREESTUDIO_COMMIT
        row = Row("threestudio", WARN, f"{version} at {root}, commit {commit[:7]}: untested (tested: {pin[:7]}; "
                                       f"git -C {root} checkout {pin})")
    state = link_state(root)
    if state.kind == "linked":
        link_row = Row("extension link", OK, state.detail)
    else:  # launch.py cannot load a broken link or a file; another link or a copy loads another version
        status = FAIL if state.kind in ("broken", "file") else WARN
        link_row = Row("extension link", status, f"{state.detail}; fix: {state.fix}")
    return [row, link_row]


def _git_commit(root: str) -> Optional[str]:
    if not os.path.exists(os.path.join(root, ".git")) or shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    return r.stdout.strip() if r.returncode == 0 else None


def check_torch() -> List[Row]:
    """torch (version, CUDA build, GPU visible) and the torchvision built for it."""
    have = dist_version("torch")
    if have is None:
        return [Row("torch", FAIL, "not installed; fix: pip install torch (CUDA build on GPU machines; "
                                   "CPU: --index-url https://download.pytorch.org/whl/cpu)")]
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    gpu = f"{torch.cuda.device_count()} GPU(s) visible" if torch.cuda.is_available() else "no GPU visible"
    status = OK if public(have) >= Version(envset.MIN_TORCH) else FAIL
    too_old = "" if status == OK else f"; needs >= {envset.MIN_TORCH}"
    rows = [Row("torch", status, f"{have} ({build}, {gpu}){too_old}")]
    tv = dist_version("torchvision")
    wanted = envset.TORCHVISION_FOR_TORCH.get(str(public(have)))
    fix = f"pip install torchvision=={wanted}" if wanted else "install the torchvision release made for your torch"
    if tv is None:
        rows.append(Row("torchvision", FAIL, f"not installed; fix: {fix}"))
        return rows
    built_for = [Requirement(r) for r in metadata.requires("torchvision") or [] if r.startswith("torch")]
    pins = [r for r in built_for if r.name == "torch"]
    if pins and not pins[0].specifier.contains(have, prereleases=True):  # full version: "==2.14.1+cu130" too
        rows.append(Row("torchvision", FAIL, f"{tv} was built for torch {pins[0].specifier}, not {have}; fix: {fix}"))
    else:
        rows.append(Row("torchvision", OK, tv))
    return rows


def no_gpu_reason() -> Optional[str]:
    """None where torch can use a GPU, else why not."""
    import torch

    if not torch.version.cuda:
        return "no CUDA: torch is a CPU build"
    if not torch.cuda.is_available():
        return "no CUDA: no GPU visible"
    return None


def jit_extension_built(prebuilt: str, build_name: str) -> bool:
    """Whether a compiled-on-first-use CUDA extension is there (a prebuilt binary module such as
    ``nerfacc.csrc`` in the installed package, or a finished JIT build ``<build_name>*.so``), read
    from disk: nothing is imported or built."""
    import importlib.util

    package, _, name = prebuilt.partition(".")
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: the package is not imported
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    for folder in spec.submodule_search_locations or ():
        if any(f.startswith(name + ".") and f.endswith((".so", ".pyd")) for f in os.listdir(folder)):
            return True
    import torch

    if not torch.cuda.is_available():  # a JIT build needs CUDA (and importing cpp_extension warns without it)
        return False
    from torch.utils.cpp_extension import get_default_build_root

    root = get_default_build_root()
    for dirpath, _dirs, files in os.walk(root):
        if build_name in dirpath and any(f.startswith(build_name) and f.endswith(".so") for f in files):
            return True
    return False


def build_row(b: envset.CudaBuild, no_gpu: Optional[str], optional: bool = False) -> Row:
    """ok when built; without CUDA (or for an optional extension) a warning with the command; else a failure."""
    built = jit_extension_built(*b.jit) if b.jit else dist_version(b.dist) is not None
    if built:
        return Row(b.name, OK, "built" if b.jit else dist_version(b.dist))
    if no_gpu:
        return Row(b.name, WARN, f"not built ({no_gpu}); needed for {b.why}, so training will not run here; "
                                 f"on a CUDA machine: {b.command}")
    if optional:
        return Row(b.name, WARN, f"not built; needed for {b.why}; fix (needs nvcc): {b.command}")
    return Row(b.name, FAIL, f"not built; needed for {b.why}; fix (needs nvcc): {b.command}")


def check_cuda_builds() -> List[Row]:
    """tinycudann, nvdiffrast, nerfacc's and gsplat's kernels: warnings without CUDA, failures with it."""
    no_gpu = no_gpu_reason()
    return [build_row(b, no_gpu) for b in envset.CUDA_BUILDS]


def check_threestudio_3dgs(root: str) -> List[Row]:
    """threestudio-3dgs is optional: a note when it is not in custom/, else its CUDA builds (warnings)."""
    if not os.path.isdir(os.path.join(root, "custom", envset.THREESTUDIO_3DGS)):
        return [Row(envset.THREESTUDIO_3DGS, OK, "not in custom/ (optional; rfds-gaussian-system needs only gsplat)")]
    no_gpu = no_gpu_reason()
    return [Row(envset.THREESTUDIO_3DGS, OK, f"in {os.path.join(root, 'custom', envset.THREESTUDIO_3DGS)}")] + [
        build_row(b, no_gpu, optional=True) for b in envset.THREESTUDIO_3DGS_BUILDS]


def check_hub() -> Row:
    """Where models are cached, whether offline mode is on and whether the ``hf`` CLI is there."""
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    repos = len([d for d in os.listdir(cache) if d.startswith("models--")]) if os.path.isdir(cache) else 0
    offline = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "online mode"
    hf = shutil.which("hf") or shutil.which("hf", path=os.path.dirname(sys.executable))
    detail = f"cache {cache} ({repos} model(s)), {offline}, endpoint {constants.ENDPOINT}"
    probe = cache if os.path.isdir(cache) else os.path.dirname(cache.rstrip(os.sep)) or "."
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK) and not constants.HF_HUB_OFFLINE:
        return Row("hub cache", FAIL, f"{detail}: {probe} is not writable; fix: set HF_HOME to a writable folder")
    if hf is None:
        return Row("hub cache", WARN, f"{detail}; the `hf` CLI is not on PATH (pip install 'huggingface_hub>=1.0')")
    return Row("hub cache", OK, f"{detail}; CLI {hf}")


PURPOSES = ("libraries", "training")
NO_CUDA = "this machine has no CUDA; training needs a GPU"
TRAINING_NEEDS = ("extension link", *(b.name for b in envset.CUDA_BUILDS))  # warnings that stop launch.py --train


def no_cuda_line() -> str:
    """The line for a machine where torch cannot use a GPU: "this machine has no CUDA; training needs a GPU (why)"."""
    return f"{NO_CUDA} ({no_gpu_reason().split(': ', 1)[-1]})"


def check_environment(root: Optional[str], purpose: str = "libraries") -> List[Row]:
    """All rows, in table order (threestudio rows only when ``root`` is given).  For ``purpose``
    "training" the warnings that stop ``launch.py --train`` (:data:`TRAINING_NEEDS`) are failures,
    and a machine without a usable GPU gets a failing "GPU" row."""
    rows = check_threestudio(os.path.abspath(root)) if root else []
    rows += check_torch()
    rows += [check_component(c) for c in envset.COMPONENTS if c.dist != "torchvision"]
    rows += check_cuda_builds()
    if root:
        rows += check_threestudio_3dgs(os.path.abspath(root))
    rows.append(check_hub())
    if purpose == "training":
        rows = [Row(r.component, FAIL, r.detail) if r.status == WARN and r.component in TRAINING_NEEDS else r
                for r in rows]
        if no_gpu_reason() is not None:
            rows.append(Row("GPU", FAIL, no_cuda_line()))
    return rows


def format_table(rows: List[Row]) -> str:
    width = max(len(r.component) for r in rows)
    return "\n".join(f"{r.component:<{width}}  {r.status:<4}  {r.detail}" for r in rows)


def report(root: Optional[str], out=None, purpose: str = "libraries") -> int:
    """Print the table, the no-CUDA line where it applies and a summary line (to ``out``, default
    stdout); 1 if any row failed, else 0 (``purpose``: :func:`check_environment`)."""
    out = out or sys.stdout
    rows = check_environment(root, purpose)
    print(format_table(rows), file=out)
    if no_gpu_reason() is not None and purpose != "training":  # there the "GPU" row says it
        print(f"{no_cuda_line()}; the guidance, the prompt processors, rfds-2d/rfds-edit and the tests run here "
              "(the training check, --for training, exits 1)", file=out)
    failed = [r.component for r in rows if r.status == FAIL]
    warned = [r.component for r in rows if r.status == WARN]
    if failed:
        print(f"environment check: FAILED ({', '.join(failed)})", file=out)
        return 1
    print("environment check: ok" + (f" with warnings ({', '.join(warned)})" if warned else ""), file=out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m threestudio_rfds.adapter.envcheck",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", default=os.environ.get("THREESTUDIO_ROOT"),
                   help="threestudio checkout (default: $THREESTUDIO_ROOT; omitted: libraries only)")
    add_purpose_arg(p)
    args = p.parse_args(argv)
    return report(args.root, purpose=args.purpose)


def add_purpose_arg(p) -> None:
    p.add_argument("--for", dest="purpose", choices=PURPOSES, default="libraries",
                   help="libraries (default): what the guidance, prompt processors and tests need, no-CUDA rows are "
                        "warnings; training: what launch.py --train needs, exit 1 where it cannot run (no GPU, "
                        "CUDA extensions not built, extension not linked)")


if __name__ == "__main__":
    sys.exit(main())
