"""End to end: threestudio's own ``launch.py --train`` (a subprocess, unchanged) trains a NeRF with
every shipped NeRF config and with the paper's config layout, on the CPU with the tiny models.

Each run: small renders (32² then 64² after the resolution milestone at step 3), 6 steps,
validation and a checkpoint every 3 steps, then threestudio's test phase.  Asserted from what
threestudio itself wrote (CSV logs, checkpoints, images), never from our prints: exit code 0;
``train/loss_rfds`` finite at every step; the geometry's parameters changed between the step-3
and the last checkpoint; ``ckpts/last.ckpt`` exists; validation and test renders exist and are
not constant; a second launch with ``resume=…/last.ckpt`` continues the step count — and, with
every transformers model load made to raise, proves the prompts come from the cache written by
the first run (for ``rfds-sd3`` and ``rfds-instaflow`` by threestudio's spawned prompt child).

Out of reach on the CPU (their config-level tests stay in test_threestudio_configs.py):
``rfds-sd3-refine`` (nvdiffrast) and ``rfds-sd3-3dgs`` (threestudio-3dgs' CUDA rasterizer).
"""
import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

from reference_layout import reference_layout
from ts_launch import (all_finite, checkpoint, cpu_overrides, launch, log_tail, logged_metrics, logged_values,
                       make_launch_dir, png_std, trial_dir)
from ts_support import CONFIG_DIR, shipped_configs, threestudio_root

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

NERF_CONFIGS = {  # config → tiny model family
    "rfds-sd3.yaml": "sd3", "rfds-rev-sd3.yaml": "sd3",
    "rfds-sd3-low-memory.yaml": "sd3", "rfds-rev-sd3-low-memory.yaml": "sd3",
    "rfds-instaflow.yaml": "instaflow", "rfds-rev-instaflow.yaml": "instaflow",
    "rfds-sd35-large.yaml": "sd35-large", "rfds-sd35-large-turbo.yaml": "sd35-large-turbo",
}
NOT_ON_CPU = {"rfds-sd3-refine.yaml", "rfds-sd3-3dgs.yaml"}
ELSEWHERE = {"rfds-flux-schnell.yaml", "rfds-flux-dev.yaml", "rfds-flux-schnell-low-memory.yaml",
             "rfds-flux-dev-low-memory.yaml"}  # tests/test_threestudio_e2e_flux.py
SPAWN = {"rfds-sd3.yaml", "rfds-instaflow.yaml"}  # threestudio's prompt subprocess (spawn: true)
PROMPT = "a ceramic vase with peonies"
STEPS, EVERY = 6, 3


def test_every_shipped_config_is_covered():  # the *-gs.yaml configs: test_threestudio_e2e_gs.py
    assert set(NERF_CONFIGS) | NOT_ON_CPU | ELSEWHERE == {c for c in shipped_configs() if not c.endswith("-gs.yaml")}


@pytest.fixture(scope="module")
def root(ts):  # `ts`: threestudio imports in this environment (skips, with the reason, where it is absent)
    return threestudio_root()


@pytest.fixture(scope="module")
def models(tiny_sd3_path, tiny_instaflow_path, tiny_sd35_paths):
    return {"sd3": tiny_sd3_path, "instaflow": tiny_instaflow_path, **tiny_sd35_paths}


def train_and_check(tmp_path, root, config: str, model_path: str, loss_key: str, spawn: bool) -> str:
    """Train, check everything threestudio wrote, resume; returns the trial dir."""
    launch_dir = make_launch_dir(root, str(tmp_path / "threestudio"))
    exp = str(tmp_path / "outputs")
    overrides = cpu_overrides(OmegaConf.load(config), model_path, max_steps=STEPS, milestone=EVERY, every=EVERY) + [
        f"system.prompt_processor.prompt={PROMPT}", f"exp_root_dir={exp}", "use_timestamp=false",
        f"system.prompt_processor.spawn={str(spawn).lower()}",
    ]
    log = str(tmp_path / "train.log")
    proc = launch(launch_dir, config, overrides, log)
    assert proc.returncode == 0, log_tail(log)
    trial = trial_dir(exp)

    loss = logged_values(logged_metrics(trial, 0), f"train/{loss_key}")
    assert sorted(loss) == list(range(STEPS)), f"train/{loss_key} logged at steps {sorted(loss)}"
    assert all_finite(loss.values()), loss

    mid = checkpoint(os.path.join(trial, "ckpts", f"epoch=0-step={EVERY}.ckpt"))
    last = checkpoint(os.path.join(trial, "ckpts", "last.ckpt"))
    assert (mid["global_step"], last["global_step"]) == (EVERY, STEPS)
    geometry = [k for k in last["state_dict"] if k.startswith("geometry.")]
    assert geometry and any(not torch.equal(mid["state_dict"][k], last["state_dict"][k]) for k in geometry), \
        "the geometry did not change between the step-3 and the last checkpoint"

    save = os.path.join(trial, "save")
    for step in (EVERY, STEPS):  # validation renders: it<step>-<view>.png (rgb panel first)
        val = os.path.join(save, f"it{step}-0.png")
        assert os.path.isfile(val), sorted(os.listdir(save))
        assert png_std(val, width=32) > 0, f"{val} is constant"
    tests = sorted(glob.glob(os.path.join(save, f"it{STEPS}-test", "*.png")))
    assert len(tests) == 2 and all(png_std(p, width=32) > 0 for p in tests), tests

    # resume: the step count continues, and prompts come from the cache (no text encoder loads)
    log2 = str(tmp_path / "resume.log")
    proc = launch(launch_dir, config, overrides + [f"resume={trial}/ckpts/last.ckpt", f"trainer.max_steps={STEPS + 2}"],
                  log2, RFDS_TEST_FORBID_TRANSFORMERS="1")
    assert proc.returncode == 0, log_tail(log2)
    assert checkpoint(os.path.join(trial, "ckpts", "last.ckpt"))["global_step"] == STEPS + 2
    resumed = logged_values(logged_metrics(trial, 1), f"train/{loss_key}")
    assert sorted(resumed) == [STEPS, STEPS + 1] and all_finite(resumed.values()), resumed
    return trial


@pytest.mark.parametrize("name", sorted(NERF_CONFIGS))
def test_launch_trains_resumes_and_tests(tmp_path, root, models, name):
    train_and_check(tmp_path, root, f"custom/threestudio-rfds/configs/{name}", models[NERF_CONFIGS[name]],
                    "loss_rfds", spawn=name in SPAWN)
    assert os.path.isfile(os.path.join(CONFIG_DIR, name))


def test_launch_runs_the_papers_config_layout(tmp_path, root, models):
    """``rf-system`` (stage coarse), ``sd3-prompt-processor`` and the ``RFDS-sd3`` alias, as the
    paper's configs name them; its validation shows the flow model's own sample."""
    config = tmp_path / "rfds_sd3_paper.yaml"
    config.write_text(reference_layout(models["sd3"], "RFDS-sd3", "lambda_rfds"))
    trial = train_and_check(tmp_path, root, str(config), models["sd3"], "loss_rfds", spawn=False)
    samples = glob.glob(os.path.join(trial, "save", "*-sample.png"))
    assert samples and all(png_std(p) > 0 for p in samples), samples


def test_rfds_bench_runs_scores_and_reports_real_launches(tmp_path, root, models, tiny_clip_path):
    """``rfds-bench run`` drives the real launch.py on a 2-prompt suite; ``score`` (tiny CLIP) and
    ``report`` then see both runs with finite scores and their renders."""
    import json
    import math
    import subprocess
    import sys

    import yaml

    from ts_launch import cpu_env

    launch_dir = make_launch_dir(root, str(tmp_path / "threestudio"))
    name = "rfds-sd3-low-memory.yaml"
    overrides = cpu_overrides(OmegaConf.load(os.path.join(CONFIG_DIR, name)), models["sd3"], max_steps=2, every=2)
    prompts = ["a red rotary telephone", "a plush dragon toy"]
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "e2e", "seeds": [0], "prompts": prompts,
                                     "configs": [{"path": f"custom/threestudio-rfds/configs/{name}", "label": "lm"}],
                                     "overrides": overrides + ["system.prompt_processor.spawn=false"]}))
    out = str(tmp_path / "bench")

    def bench(*args):
        p = subprocess.run([sys.executable, "-m", "threestudio_rfds.bench.cli", *args], env=cpu_env(),
                           capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    bench("run", str(suite), "--threestudio", launch_dir, "--out", out)
    from threestudio_rfds.bench.ledger import Ledger
    from threestudio_rfds.bench.logs import progress

    for rec in Ledger(os.path.join(out, "ledger.jsonl")).state().values():  # these real logs also hold
        assert progress(os.path.join(out, rec["log"])) == (2, 2)  # transformers' "Loading weights" bars
        with open(os.path.join(out, rec["trial_dir"], "rfds-bench.json")) as f:
            assert json.load(f)["status"] == "done"  # the trial folder's own record
    bench("score", out, "--clip-model", tiny_clip_path, "--device", "cpu")
    with open(os.path.join(out, "scores.json")) as f:
        runs = json.load(f)["runs"]
    assert sorted(r["prompt"] for r in runs.values()) == sorted(prompts)
    for r in runs.values():
        assert r["n_views"] == 2 and math.isfinite(r["clip_score"])
        assert all(os.path.isfile(os.path.join(out, v["file"])) for v in r["views"])
    bench("report", out)
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert all(p in report for p in prompts)


def test_rfds_bench_refuses_a_machine_that_cannot_launch(tmp_path, root):
    """Without the CPU shim, threestudio's own ``import tinycudann`` fails on this machine: rfds-bench says so
    in one line before any run starts (issue: 20 launches each failed after ~22 s)."""
    import subprocess
    import sys

    launch_dir = make_launch_dir(root, str(tmp_path / "threestudio"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no tests/cpu_launch shim
    probe = subprocess.run([sys.executable, "-c", "import tinycudann"], env=env, capture_output=True)
    if probe.returncode == 0:
        pytest.skip("tinycudann imports here, so launches can start: nothing to refuse")
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: e2e\nconfigs: [custom/threestudio-rfds/configs/rfds-sd3.yaml]\nprompts: [a, b]\n")
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "-m", "threestudio_rfds.bench.cli", "run", str(suite), "--threestudio",
                        launch_dir, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stdout + p.stderr
    assert "No module named 'tinycudann'" in p.stderr and "no run was started" in p.stderr, p.stderr
    assert not (out / "logs").exists() and not (out / "runs").exists()


def test_the_no_text_encoder_guard_is_real(tiny_sd3_path):
    """The resume runs above pass with RFDS_TEST_FORBID_TRANSFORMERS=1: that proves cache reuse only
    because, under it, any text-encoder load in a launched process fails."""
    import subprocess
    import sys

    from ts_launch import cpu_env

    code = f"from transformers import CLIPTextModelWithProjection as M; M.from_pretrained({tiny_sd3_path + '/text_encoder'!r})"
    p = subprocess.run([sys.executable, "-c", code], env=cpu_env(RFDS_TEST_FORBID_TRANSFORMERS="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "RFDS_TEST_FORBID_TRANSFORMERS: CLIPTextModelWithProjection" in p.stderr, p.stderr
