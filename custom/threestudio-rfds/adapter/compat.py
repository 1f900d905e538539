"""threestudio import, version check and device choice for the adapter (the only place that
imports threestudio)."""
from __future__ import annotations

import torch

MIN_THREESTUDIO_VERSION = "0.2.0"


class ThreestudioVersionError(ImportError):
    """threestudio is missing or older than the adapter supports."""


def require_threestudio():
    """Import threestudio and check ``threestudio.__version__ >= 0.2.0`` (as threestudio-3dgs and
    threestudio-mvdream do); raise :class:`ThreestudioVersionError` with the fix otherwise."""
    try:
        import threestudio
    except ImportError as e:
        raise ThreestudioVersionError(
            "threestudio_rfds.adapter needs threestudio: run from a threestudio checkout (or put it on "
            f"PYTHONPATH) with its requirements installed (docs/threestudio.md). Import failed: {e}"
        ) from e
    check_threestudio_version(getattr(threestudio, "__version__", None))
    return threestudio


def check_threestudio_version(found) -> None:
    """Raise :class:`ThreestudioVersionError` unless ``found`` >= MIN_THREESTUDIO_VERSION."""
    from packaging.version import InvalidVersion, Version

    try:
        ok = found is not None and Version(str(found)) >= Version(MIN_THREESTUDIO_VERSION)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ThreestudioVersionError(
            f"threestudio-rfds needs threestudio >= {MIN_THREESTUDIO_VERSION}, found "
            f"{found if found is not None else 'a version without __version__'}; update threestudio "
            "(git pull in your threestudio checkout)"
        )


def adapter_device() -> torch.device:
    """threestudio's device (``cuda:<rank>``) when CUDA is available, else the CPU.

    threestudio's own ``get_device()`` always answers cuda, which fails on CPU-only machines."""
    if torch.cuda.is_available():
        from threestudio.utils.misc import get_rank

        return torch.device(f"cuda:{get_rank()}")
    return torch.device("cpu")
