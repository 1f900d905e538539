"""End to end: threestudio's own ``launch.py`` (a subprocess, unchanged) trains Gaussian splats with
each shipped ``*-gs.yaml`` config on the CPU — rfds-gaussian-system, gsplat's real Python code over
the test-only torch stand-in for its CUDA kernels (tests/gsplat_torch.py, installed by the CPU launch
shim), the tiny models — then resumes and exports.

Asserted from what threestudio wrote: exit 0; ``train/loss_rfds`` finite at every step in its CSV
log; ``train/num_gaussians`` changed by gsplat's densification and pruning; the checkpoint holds
the splats, the Adam moments and the strategy state at that count; a resume continues with the
same count; the PLY written at the end of training and the one ``--export`` writes parse with
plyfile, carry the 3DGS fields and finite values, and hold the checkpoint's splats; ``--export``
with ``mesh: true`` also writes a mesh; renders are not constant."""
import glob
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ts_launch import (all_finite, checkpoint, export, gs_overrides, launch, log_tail, logged_metrics, logged_values,
                       make_launch_dir, png_std, trial_dir)
from ts_support import CONFIG_DIR, shipped_configs, threestudio_root

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

GS_CONFIGS = {"rfds-sd3-gs.yaml": "sd3", "rfds-rev-sd3-gs.yaml": "sd3", "rfds-instaflow-gs.yaml": "instaflow",
              "rfds-flux-schnell-gs.yaml": "flux-schnell", "rfds-flux-dev-gs.yaml": "flux-dev"}
PROMPT = "a ceramic vase with peonies"
STEPS, EVERY, REFINE_STOP = 6, 3, 5
PLY_FIELDS = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
              + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def test_every_gaussian_config_is_covered():
    assert {c for c in shipped_configs() if c.endswith("-gs.yaml")} == set(GS_CONFIGS)


@pytest.fixture(scope="module")
def root(ts):
    pytest.importorskip("gsplat", reason="gsplat is a test extra (pip install -e '.[test]')")
    return threestudio_root()


@pytest.fixture(scope="module")
def launch_dir(root, tmp_path_factory):
    return make_launch_dir(root, str(tmp_path_factory.mktemp("ts-gs")))


@pytest.fixture(scope="module")
def models(tiny_sd3_path, tiny_instaflow_path, tiny_flux_paths):
    return {"sd3": tiny_sd3_path, "instaflow": tiny_instaflow_path, "flux-schnell": tiny_flux_paths["schnell"],
            "flux-dev": tiny_flux_paths["dev"]}


def read_ply(path: str) -> dict:
    import plyfile

    v = plyfile.PlyData.read(path)["vertex"]
    return {p.name: np.asarray(v[p.name]) for p in v.properties}


@pytest.mark.parametrize("name", sorted(GS_CONFIGS))
def test_gaussian_config_trains_resumes_and_exports(tmp_path, launch_dir, models, name):
    config = f"custom/threestudio-rfds/configs/{name}"
    exp = str(tmp_path / "outputs")
    overrides = gs_overrides(OmegaConf.load(os.path.join(CONFIG_DIR, name)), models[GS_CONFIGS[name]],
                             max_steps=STEPS, every=EVERY, refine_stop=REFINE_STOP) + [
        f"system.prompt_processor.prompt={PROMPT}", f"exp_root_dir={exp}", "use_timestamp=false",
        "system.prompt_processor.spawn=false"]
    log = str(tmp_path / "train.log")
    proc = launch(launch_dir, config, overrides, log)
    assert proc.returncode == 0, log_tail(log)
    trial = trial_dir(exp)

    rows = logged_metrics(trial, 0)
    loss = logged_values(rows, "train/loss_rfds")
    assert sorted(loss) == list(range(STEPS)) and all_finite(loss.values()), loss
    count = logged_values(rows, "train/num_gaussians")
    assert count[0] == 256, count
    assert len(set(count.values())) > 1, f"densify/prune never changed the splat count: {count}"
    final = count[STEPS - 1]

    last = checkpoint(os.path.join(trial, "ckpts", "last.ckpt"))
    sd = last["state_dict"]
    assert last["global_step"] == STEPS and sd["geometry.splats.means"].shape == (final, 3)
    moments = [s["exp_avg"] for s in last["optimizer_states"][0]["state"].values()]
    assert len(moments) == 6 and all(m.shape[0] == final for m in moments)
    strategy_state = last["rfds_gaussians"]["strategy_state"]
    assert strategy_state["grad2d"].shape == (final,) and strategy_state["count"].shape == (final,)
    mid = checkpoint(os.path.join(trial, "ckpts", f"epoch=0-step={EVERY}.ckpt"))
    assert not torch.equal(mid["state_dict"]["geometry.splats.sh0"][:256], sd["geometry.splats.sh0"][:256])

    trained_ply = os.path.join(trial, "save", f"it{STEPS}-export", "gaussians.ply")
    v = read_ply(trained_ply)
    assert [k for k in v if not k.startswith("f_rest")] == PLY_FIELDS
    assert len(v["x"]) == final and all(np.isfinite(a).all() for a in v.values())
    assert np.allclose(np.stack([v["x"], v["y"], v["z"]], 1), sd["geometry.splats.means"].numpy())

    for p in [os.path.join(trial, "save", f"it{EVERY}-0.png"), os.path.join(trial, "save", f"it{STEPS}-0.png")]:
        assert png_std(p, width=32) > 0, p
    tests = sorted(glob.glob(os.path.join(trial, "save", f"it{STEPS}-test", "*.png")))
    assert len(tests) == 2 and all(png_std(p, width=32) > 0 for p in tests), tests

    # resume: same count, the step count continues (densification stopped at REFINE_STOP)
    log2 = str(tmp_path / "resume.log")
    proc = launch(launch_dir, config, overrides + [f"resume={trial}/ckpts/last.ckpt", f"trainer.max_steps={STEPS + 2}"],
                  log2, RFDS_TEST_FORBID_TRANSFORMERS="1")
    assert proc.returncode == 0, log_tail(log2)
    resumed = logged_values(logged_metrics(trial, 1), "train/num_gaussians")
    assert resumed == {STEPS: final, STEPS + 1: final}, resumed
    again = checkpoint(os.path.join(trial, "ckpts", "last.ckpt"))
    assert again["global_step"] == STEPS + 2 and again["state_dict"]["geometry.splats.means"].shape == (final, 3)
    assert not torch.equal(again["state_dict"]["geometry.splats.means"], sd["geometry.splats.means"])

    # threestudio's --export from the checkpoint: the PLY and, asked for, the density mesh
    log3 = str(tmp_path / "export.log")
    out_dir = os.path.join(trial, "save", f"it{STEPS + 2}-export")
    args = (launch_dir, os.path.join(trial, "configs", "parsed.yaml"), os.path.join(trial, "ckpts", "last.ckpt"),
            ["system.exporter.mesh=true", "system.exporter.mesh_resolution=24", "system.exporter.mesh_threshold=0.05"])
    if name == "rfds-sd3-gs.yaml":  # an export folder that is a file: one line, nothing written
        os.rename(out_dir, out_dir + ".kept")
        open(out_dir, "w").close()
        proc = export(*args, log3)
        assert proc.returncode != 0 and "exists and is not a folder; move it away" in log_tail(log3, 3), log_tail(log3)
        os.remove(out_dir)
        os.rename(out_dir + ".kept", out_dir)
    proc = export(*args, log3)
    assert proc.returncode == 0, log_tail(log3)
    exported = read_ply(os.path.join(out_dir, "gaussians.ply"))
    assert np.allclose(np.stack([exported[f"rot_{i}"] for i in range(4)], 1),
                       again["state_dict"]["geometry.splats.quats"].numpy())
    faces = [ln for ln in open(os.path.join(out_dir, "mesh.obj")) if ln.startswith("f ")]
    assert faces, "the exported mesh has no faces"
    assert not [f for f in os.listdir(out_dir) if f.startswith(".tmp-")]


def test_mcmc_strategy_trains_through_launch(tmp_path, launch_dir, models):
    """``system.strategy_type=mcmc``, one override on a shipped config: gsplat's MCMCStrategy
    relocates dead splats and adds new ones up to ``cap_max`` (its ``lr`` is the means' group's)."""
    name = "rfds-instaflow-gs.yaml"
    exp = str(tmp_path / "outputs")
    overrides = gs_overrides(OmegaConf.load(os.path.join(CONFIG_DIR, name)), models["instaflow"], max_steps=5,
                             every=5, refine_stop=5) + [
        "system.strategy_type=mcmc", "system.strategy.mcmc.cap_max=300", f"system.prompt_processor.prompt={PROMPT}",
        f"exp_root_dir={exp}", "use_timestamp=false", "system.prompt_processor.spawn=false",
        "system.export_ply_at_end=false"]
    log = str(tmp_path / "train.log")
    proc = launch(launch_dir, f"custom/threestudio-rfds/configs/{name}", overrides, log)
    assert proc.returncode == 0, log_tail(log)
    trial = trial_dir(exp)
    count = logged_values(logged_metrics(trial, 0), "train/num_gaussians")
    assert count[0] == 256 and 256 < count[4] <= 300, count  # sample_add: +5 % per refine, capped
    assert all_finite(logged_values(logged_metrics(trial, 0), "train/loss_rfds").values())
    assert not os.path.exists(os.path.join(trial, "save", "it5-export"))
