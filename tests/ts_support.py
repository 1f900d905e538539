"""Shared set-up of the threestudio tests (tests/test_threestudio_*.py).

threestudio is found through ``THREESTUDIO_ROOT`` (a checkout; docs/threestudio.md).  Without it,
or when threestudio's own requirements are missing from this environment, every test that asks
for :func:`threestudio_or_skip` is skipped with the reason.  On a machine without CUDA the
import-only placeholders in tests/placeholders (tinycudann, nvdiffrast) are appended to sys.path
here, and only here, so that real installations win.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import List

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PLACEHOLDERS = os.path.join(HERE, "placeholders")
PACKAGE_DIR = os.path.join(os.path.dirname(HERE), "custom", "threestudio-rfds")
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
_state: dict = {}
SKIP_PREFIX = "needs threestudio: "  # every skip for lack of threestudio starts so (conftest checks the marker)


def skip_without_threestudio(reason: str) -> None:
    """Skip with ``reason`` — or fail, where CI requires threestudio (RFDS_REQUIRE_THREESTUDIO=1), so
    a broken threestudio set-up there cannot pass as skips."""
    if os.environ.get("RFDS_REQUIRE_THREESTUDIO") == "1":
        pytest.fail(f"RFDS_REQUIRE_THREESTUDIO=1 but {reason}", pytrace=False)
    pytest.skip(SKIP_PREFIX + reason)


def threestudio_root() -> str:
    root = os.environ.get("THREESTUDIO_ROOT")
    if not root:
        skip_without_threestudio("THREESTUDIO_ROOT is not set (threestudio tests need a threestudio checkout, "
                                 "docs/threestudio.md)")
    if not os.path.isfile(os.path.join(root, "threestudio", "__init__.py")):
        skip_without_threestudio(f"THREESTUDIO_ROOT={root} is not a threestudio checkout (no threestudio/__init__.py)")
    return os.path.abspath(root)


def threestudio_or_skip():
    """threestudio, imported once with this package registered; skips when it cannot be."""
    root = threestudio_root()
    if "error" in _state:
        skip_without_threestudio(_state["error"])
    if "module" not in _state:
        if root not in sys.path:
            sys.path.insert(0, root)
        if PLACEHOLDERS not in sys.path:
            sys.path.append(PLACEHOLDERS)
        try:
            import threestudio
        except ImportError as e:  # a requirement of threestudio is not installed here
            _state["error"] = f"threestudio at {root} cannot be imported in this environment: {e!r}"
            skip_without_threestudio(_state["error"])
        import threestudio_rfds

        threestudio_rfds.register_threestudio()
        _state["module"] = threestudio
    return _state["module"]


def load_custom_module(root: str, path: str) -> bool:
    """threestudio's own ``launch.load_custom_module`` (imports launch.py without running it)."""
    if "launch" not in _state:
        spec = importlib.util.spec_from_file_location("threestudio_launch", os.path.join(root, "launch.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _state["launch"] = mod
    return _state["launch"].load_custom_module(path)


def shipped_configs() -> List[str]:
    return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def camera_batch(threestudio, data_cfg: dict, global_step: int = 0) -> dict:
    """One training batch of threestudio's random-camera-datamodule at ``global_step``."""
    dm = threestudio.find("random-camera-datamodule")(data_cfg)
    dm.setup("fit")
    dm.train_dataset.update_step(0, global_step)
    return next(iter(dm.train_dataloader()))


def render_stand_in(batch: dict, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A learnable image [B, H, W, C] in (0, 1) standing in for the renderer's comp_rgb."""
    g = torch.Generator().manual_seed(seed)
    b = batch["c2w"].shape[0]
    logits = torch.randn(b, batch["height"], batch["width"], channels, generator=g)
    return logits.requires_grad_(True)
