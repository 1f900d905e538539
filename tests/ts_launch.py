"""Run threestudio's unchanged ``launch.py`` as a subprocess on the CPU, the way users run it.

* :func:`make_launch_dir` builds a private threestudio work dir: symlinks to every entry of the
  checkout (``THREESTUDIO_ROOT``, which may be read-only) and a ``custom/`` holding only this
  package (``custom/threestudio-rfds`` → the repository's package folder, as ``rfds-link`` does).
* :func:`launch` runs ``python launch.py --config … --train --gpu 0 <overrides>`` there with
  ``tests/cpu_launch`` on ``PYTHONPATH`` (its ``sitecustomize`` forces Lightning and threestudio
  onto the CPU and supplies nerfacc's kernels; test code only) and one torch thread.
* :func:`cpu_overrides` shrinks a shipped config to CPU size: renders /8 (256² → 32², 512² → 64²),
  the resolution milestone at step ``milestone``, torch-only encodings instead of tiny-cuda-nn's,
  64 samples per ray, ``max_steps`` steps with validation and a checkpoint every ``every`` steps.
"""
from __future__ import annotations

import csv
import glob
import math
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LAUNCH = os.path.join(HERE, "cpu_launch")
PACKAGE_DIR = os.path.join(os.path.dirname(HERE), "custom", "threestudio-rfds")


def make_launch_dir(threestudio_root: str, dest: str) -> str:
    """Links to the checkout's entries and ``custom/threestudio-rfds`` → this package (idempotent;
    also used by scripts/device/train.py)."""
    os.makedirs(os.path.join(dest, "custom"), exist_ok=True)
    for entry in os.listdir(threestudio_root):
        if entry not in ("custom", "outputs", ".threestudio_cache") and not os.path.lexists(os.path.join(dest, entry)):
            os.symlink(os.path.join(threestudio_root, entry), os.path.join(dest, entry))
    link = os.path.join(dest, "custom", "threestudio-rfds")
    if not os.path.lexists(link):
        os.symlink(PACKAGE_DIR, link)
    return dest


def cpu_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([CPU_LAUNCH] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launch(launch_dir: str, config: str, overrides: List[str], log: str, timeout: float = 600,
           **env: str) -> subprocess.CompletedProcess:
    """``python launch.py --config CONFIG --train --gpu 0 OVERRIDES`` in ``launch_dir``; output to ``log``."""
    cmd = [sys.executable, "launch.py", "--config", config, "--train", "--gpu", "0", *overrides]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=launch_dir, env=cpu_env(**env), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def log_tail(log: str, n: int = 60) -> str:
    with open(log, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def cpu_overrides(cfg, model_path: str, *, max_steps: int = 6, milestone: int = 3, every: int = 3) -> List[str]:
    """CPU-sized overrides of the loaded config ``cfg`` (see the module docstring)."""
    from omegaconf import ListConfig

    data = cfg.data
    two_stage = isinstance(data.width, (list, tuple, ListConfig))

    def shrink(v) -> str:
        return f"[{','.join(str(x // 8) for x in v)}]" if two_stage else str(v // 8)

    out = [
        f"data.width={shrink(data.width)}", f"data.height={shrink(data.height)}",
        "data.eval_width=32", "data.eval_height=32", "data.n_val_views=1", "data.n_test_views=2",
        "system.geometry.pos_encoding_config.otype=ProgressiveBandFrequency",
        "system.geometry.pos_encoding_config.n_frequencies=4",
        "system.renderer.num_samples_per_ray=64",
        f"system.guidance.pretrained_model_name_or_path={model_path}",
        f"system.prompt_processor.pretrained_model_name_or_path={model_path}",
        "system.guidance.seed=0",
        f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}",
        "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0",
        "checkpoint.save_last=true", "checkpoint.save_top_k=-1", f"checkpoint.every_n_train_steps={every}",
    ]
    if two_stage:
        out.append(f"data.resolution_milestones=[{milestone}]")
    if cfg.system.background_type == "neural-environment-map-background":
        out += ["system.background.dir_encoding_config.otype=ProgressiveBandFrequency",
                "system.background.dir_encoding_config.n_frequencies=2"]
    if "instaflow" in cfg.system.guidance_type or cfg.system.guidance_type in ("RFDS", "RFDS-Rev"):
        out.append("system.guidance.latent_size=[64,64]")  # the tiny UNet: 8×8 latents
    return out


def trial_dir(exp_root: str) -> str:
    """The one trial folder under ``exp_root`` (``<exp_root>/<name>/<tag>``)."""
    found = [d for d in glob.glob(os.path.join(exp_root, "*", "*")) if os.path.isdir(os.path.join(d, "ckpts"))]
    assert len(found) == 1, f"expected one trial dir under {exp_root}, found {found}"
    return found[0]


def logged_metrics(trial: str, version: int) -> List[Dict[str, float]]:
    """Rows of threestudio's CSVLogger output ``csv_logs/version_<version>/metrics.csv``."""
    rows = []
    with open(os.path.join(trial, "csv_logs", f"version_{version}", "metrics.csv")) as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def logged_values(rows: List[Dict[str, float]], key: str) -> Dict[int, float]:
    """{step: value} of one logged quantity."""
    return {int(r["step"]): r[key] for r in rows if key in r}


def checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def png_std(path: str, width: Optional[int] = None) -> float:
    """Pixel standard deviation of an image (of its first ``width`` columns: the rgb panel)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return float(img[:, :width].std() if width else img.std())


def gs_overrides(cfg, model_path: str, *, max_steps: int = 6, every: int = 3, refine_stop: int = 5) -> List[str]:
    """CPU-sized overrides of a shipped Gaussian-splat config: 2 views of 32², 256 splats, densify
    and prune every 2 steps from step 1 to ``refine_stop`` with thresholds every splat passes."""
    out = [
        "data.batch_size=2", "data.width=32", "data.height=32", "data.eval_width=32", "data.eval_height=32",
        "data.n_val_views=1", "data.n_test_views=2", "system.geometry.num_gaussians=256",
        f"system.guidance.pretrained_model_name_or_path={model_path}",
        f"system.prompt_processor.pretrained_model_name_or_path={model_path}", "system.guidance.seed=0",
        "system.strategy.default.refine_start_iter=1", "system.strategy.default.refine_every=2",
        f"system.strategy.default.refine_stop_iter={refine_stop}", "system.strategy.default.grow_grad2d=1e-12",
        "system.strategy.mcmc.refine_start_iter=1", "system.strategy.mcmc.refine_every=2",
        f"system.strategy.mcmc.refine_stop_iter={refine_stop}",
        f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}", "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0", "checkpoint.save_last=true", "checkpoint.save_top_k=-1",
        f"checkpoint.every_n_train_steps={every}",
    ]
    if "instaflow" in cfg.system.guidance_type:
        out.append("system.guidance.latent_size=[64,64]")  # the tiny UNet: 8×8 latents
    return out


def export(launch_dir: str, parsed_config: str, ckpt: str, overrides: List[str], log: str,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """``python launch.py --config CONFIG --export --gpu 0 resume=CKPT OVERRIDES`` (threestudio's export)."""
    cmd = [sys.executable, "launch.py", "--config", parsed_config, "--export", "--gpu", "0", f"resume={ckpt}",
           *overrides]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=launch_dir, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, stdin=subprocess.DEVNULL)
