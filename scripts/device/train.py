"""One short ``launch.py --train`` of a shipped NeRF config with threestudio's unchanged launch.py,
timed per step by ts_site/sitecustomize.py; returns s/iteration per render size and peak memory.

GPU: the config's render sizes and samples per ray, its resolution milestone moved to the middle
of the run, threestudio's pure-torch encodings (``ProgressiveBandFrequency`` + ``VanillaMLP``:
tiny-cuda-nn does not install there).  ``smoke``: renders /8, 64 samples per ray, the tiny models.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PACKAGE_DIR = os.path.join(REPO, "custom", "threestudio-rfds")
CONFIG_DIR = os.path.join(PACKAGE_DIR, "configs")
PROMPT = "a DSLR photo of a hamburger"
sys.path.insert(0, os.path.join(REPO, "tests"))
from ts_launch import make_launch_dir  # noqa: E402,F401  (one launch-dir builder for the tests and the device runs)


def wait_or_kill(proc: subprocess.Popen, timeout: float):
    """The exit code of ``proc`` (started with ``start_new_session=True``), or "timeout" after
    killing its whole process group."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return "timeout"


def overrides(config: str, model_path: str, steps: int, exp_root: str, smoke: bool) -> List[str]:
    """Command-line overrides of ``config`` (a file name in the package's configs/)."""
    from omegaconf import ListConfig, OmegaConf

    cfg = OmegaConf.load(os.path.join(CONFIG_DIR, config))
    div = 8 if smoke else 1
    two_stage = isinstance(cfg.data.width, (list, tuple, ListConfig))

    def size(v) -> str:
        return f"[{','.join(str(x // div) for x in v)}]" if two_stage else str(v // div)

    eval_size = 32 if smoke else 256
    out = [f"data.width={size(cfg.data.width)}", f"data.height={size(cfg.data.height)}",
           f"data.eval_width={eval_size}", f"data.eval_height={eval_size}", "data.n_val_views=1", "data.n_test_views=2",
           "system.geometry.pos_encoding_config.otype=ProgressiveBandFrequency",
           f"system.geometry.pos_encoding_config.n_frequencies={4 if smoke else 10}",
           f"system.guidance.pretrained_model_name_or_path={model_path}",
           f"system.prompt_processor.pretrained_model_name_or_path={model_path}",
           f"system.prompt_processor.prompt={PROMPT}",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=10",
           "trainer.num_sanity_val_steps=0",
           f"checkpoint.every_n_train_steps={steps}", f"exp_root_dir={exp_root}", "use_timestamp=false"]
    if two_stage:
        out.append(f"data.resolution_milestones=[{max(1, steps * 3 // 10)}]")  # 512² reached even if cut early
    if cfg.system.background_type == "neural-environment-map-background":
        out += ["system.background.dir_encoding_config.otype=ProgressiveBandFrequency",
                "system.background.dir_encoding_config.n_frequencies=2"]
    if smoke:
        out.append("system.renderer.num_samples_per_ray=64")
        if "instaflow" in cfg.system.guidance_type:
            out.append("system.guidance.latent_size=[64,64]")  # the tiny UNet: 8×8 latents
    return out


def summarize(step_log: str, skip: int = 3) -> Dict:
    """Median s/iteration per render height (the first ``skip`` steps at each height left out when
    more remain), steps done, peak GPU memory."""
    rows = []
    if os.path.isfile(step_log):
        with open(step_log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    by_height: Dict[str, List[float]] = {}
    for r in rows:
        by_height.setdefault(str(r.get("height")), []).append(r["s"])
    s_per_it = {h: round(statistics.median(v[skip:] if len(v) > skip else v), 4) for h, v in by_height.items()}
    peaks = [r["peak_gib"] for r in rows if r.get("peak_gib") is not None]
    return {"steps_done": len(rows), "s_per_it": s_per_it, "peak_gib": max(peaks) if peaks else None}


def train(config: str, model_path: str, launch_dir: str, work: str, steps: int, timeout: float, smoke: bool,
          nerfacc: str, log) -> Dict:
    """Run one training; returns its record (partial if it timed out)."""
    name = config.rsplit(".", 1)[0]
    step_log = os.path.join(work, f"{name}.steps.jsonl")
    if os.path.exists(step_log):
        os.remove(step_log)
    env = dict(os.environ, RFDS_STEP_LOG=step_log, RFDS_NERFACC=nerfacc, PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "ts_site")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if smoke:
        env.update(RFDS_CPU_SMOKE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "launch.py", "--config", os.path.join("custom", "threestudio-rfds", "configs", config),
           "--train", "--gpu", "0", *overrides(config, model_path, steps, os.path.join(work, "outputs"), smoke)]
    own_log = os.path.join(work, f"{name}.log")
    t0 = time.perf_counter()
    with open(own_log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=launch_dir, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        rc = wait_or_kill(proc, timeout)
    rec = {"config": config, "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1), "max_steps": steps,
           "nerfacc": nerfacc, **summarize(step_log)}
    with open(own_log, errors="replace") as f:
        lines = f.readlines()
    log.write(f"==== {config}\n" + "".join(lines))
    if rc not in (0, "timeout"):
        rec["log_tail"] = "".join(lines[-12:])[-2000:]
    return rec
