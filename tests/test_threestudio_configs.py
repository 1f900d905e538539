"""Every shipped config against real threestudio (THREESTUDIO_ROOT): it parses with threestudio's
``load_config`` and CLI-style overrides, every ``*_type`` resolves, and its guidance and prompt
processor, built from it on the tiny models, train a learnable stand-in render on batches of
threestudio's random-camera-datamodule exactly as dreamfusion-/magic3d-/gaussian-splatting-system
call them, with ``loss_*`` weighted by ``lambda_*`` through ``C()`` and schedules over steps."""
import os

import pytest
import torch

from ts_support import CONFIG_DIR, camera_batch, load_custom_module, render_stand_in, shipped_configs

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("workdir")]

CONFIGS = shipped_configs()
GS_TYPES = {"gaussian-splatting-system", "gaussian-splatting", "diff-gaussian-rasterizer", "gaussian-mesh-exporter"}


def test_all_configs_are_listed():
    assert {"rfds-sd3.yaml", "rfds-rev-sd3.yaml", "rfds-instaflow.yaml", "rfds-rev-instaflow.yaml",
            "rfds-sd3-low-memory.yaml", "rfds-rev-sd3-low-memory.yaml", "rfds-sd3-3dgs.yaml",
            "rfds-sd3-refine.yaml", "rfds-flux-schnell.yaml", "rfds-flux-dev.yaml", "rfds-flux-schnell-low-memory.yaml",
            "rfds-flux-dev-low-memory.yaml", "rfds-sd35-large.yaml", "rfds-sd35-large-turbo.yaml"} <= set(CONFIGS)


def _is_instaflow(name):
    return "instaflow" in name


def load(ts, name, workdir, model_path, *extra):
    from threestudio.utils.config import load_config

    args = [
        "system.prompt_processor.prompt=a cat on a table",
        f"exp_root_dir={workdir}/outputs",
        f"system.guidance.pretrained_model_name_or_path={model_path}",
        f"system.prompt_processor.pretrained_model_name_or_path={model_path}",
        "system.prompt_processor.spawn=false",
        "system.guidance.seed=0",
        "system.geometry_convert_from=unused.ckpt",
    ]
    if _is_instaflow(name):
        args.append("system.guidance.latent_size=[64,64]")  # tiny UNet: 8x8 latents
    return load_config(os.path.join(CONFIG_DIR, name), cli_args=args + list(extra))


def _small_sizes(cfg):
    """CPU-sized renders keeping the config's resolution schedule: 512 → 64, 256 → 32."""
    def shrink(v):
        return [x // 8 for x in v] if isinstance(v, (list, tuple)) else v // 8

    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    data["width"], data["height"] = shrink(data["width"]), shrink(data["height"])
    return data


@pytest.fixture(scope="module")
def paths(tiny_sd3_path, tiny_instaflow_path, tiny_flux_paths, tiny_sd35_paths):
    return {"sd3": tiny_sd3_path, "instaflow": tiny_instaflow_path, "flux-dev": tiny_flux_paths["dev"],
            "flux-schnell": tiny_flux_paths["schnell"], **tiny_sd35_paths}


def model_family(name: str) -> str:
    """The tiny model of the architecture a shipped config names (tests/tiny_*.py)."""
    for key in ("flux-dev", "flux-schnell", "sd35-large-turbo", "sd35-large", "instaflow"):
        if key in name:
            return key
    return "sd3"


def _model_path(paths, name):
    return paths[model_family(name)]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_parses_and_types_resolve(ts, workdir, paths, name):
    cfg = load(ts, name, workdir, _model_path(paths, name))
    assert cfg.name.startswith("rfds") and cfg.trainer.max_steps > 0
    gs = cfg.system_type == "gaussian-splatting-system"
    types = {"data_type": cfg.data_type, "system_type": cfg.system_type}
    # every threestudio registry name (strategy_type names a gsplat strategy, checked when the system is built)
    types.update({k: v for k, v in cfg.system.items() if k.endswith("_type") and k != "strategy_type"})
    missing = [f"{k}={v!r}" for k, v in types.items() if v not in ts.__modules__ and not (gs and v in GS_TYPES)]
    assert not missing, f"unresolved types: {missing}"
    assert cfg.system.guidance_type.startswith(("rfds-", "rfds-rev-"))
    assert "lambda_rfds" in cfg.system.loss
    if not gs:  # full (NeRF / mesh) configs: the system's Config accepts the system block
        system_cls = ts.find(cfg.system_type)
        from threestudio.utils.config import parse_structured

        parse_structured(system_cls.Config, cfg.system)


def test_3dgs_types_resolve_with_the_extension(ts, workdir, paths):
    from ts_support import threestudio_root

    ext = os.path.join(threestudio_root(), "custom", "threestudio-3dgs")
    if not os.path.isdir(ext):
        pytest.skip("threestudio-3dgs is not installed in THREESTUDIO_ROOT/custom")
    if "gaussian-splatting-system" not in ts.__modules__ and not load_custom_module(threestudio_root(), ext):
        pytest.skip("threestudio-3dgs is present but cannot be imported here (needs its CUDA rasterizer)")
    from threestudio.utils.config import parse_structured

    cfg = load(ts, "rfds-sd3-3dgs.yaml", workdir, paths["sd3"])
    for t in (cfg.system_type, cfg.system.geometry_type, cfg.system.renderer_type, cfg.system.exporter_type):
        ts.find(t)
    # the extension's Config classes accept every key the config sets (unknown keys raise)
    parse_structured(ts.find(cfg.system_type).Config, cfg.system)
    for part in ("geometry", "renderer", "material", "background", "exporter"):
        if cfg.system.get(f"{part}_type") and cfg.system.get(part) is not None:
            parse_structured(ts.find(cfg.system[f"{part}_type"]).Config, cfg.system[part])


def _system_step(ts, cfg, guidance, prompt_utils, batch, rgb, step):
    """The loss part of dreamfusion-/magic3d-/gaussian-splatting-system.training_step."""
    from threestudio.utils.misc import C

    guidance_out = guidance(rgb, prompt_utils, **batch, rgb_as_latents=False)
    loss = 0.0
    for name, value in guidance_out.items():
        assert torch.is_tensor(value) and value.numel() == 1, f"{name} is not a loggable scalar"
        assert torch.isfinite(value), f"{name} = {value}"
        if name.startswith("loss_"):
            loss = loss + value * C(cfg.system.loss[name.replace("loss_", "lambda_")], 0, step)
    return loss, guidance_out


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_a_render_over_the_schedule(ts, workdir, paths, name):
    cfg = load(ts, name, workdir, _model_path(paths, name))
    processor = ts.find(cfg.system.prompt_processor_type)(cfg.system.prompt_processor)
    guidance = ts.find(cfg.system.guidance_type)(cfg.system.guidance)
    prompt_utils = processor()
    data = _small_sizes(cfg)
    from threestudio.utils.misc import C

    lean = "low-memory" in name  # the memory-lean options reach the backend
    assert guidance.backend.vae.encoder.gradient_checkpointing == lean
    assert (guidance.cfg.cfg_mode == "sequential") == lean
    if "flux" in name:  # the 24 GB FLUX configs load the transformer quantised, the VAE not
        assert guidance.backend.quantization == ("int8-weight-only" if lean else None)
        assert getattr(guidance.backend.transformer, "is_quantized", False) == lean
        assert not getattr(guidance.backend.vae, "is_quantized", False)

    steps = [0, 6000] if isinstance(cfg.data.width, (list, tuple)) or "resolution_milestones" in cfg.data else [0]
    for step in steps:
        guidance.do_update_step(0, step)  # what BaseSystem.on_train_batch_start does
        assert guidance.min_step_percent == pytest.approx(C(cfg.system.guidance.min_step_percent, 0, step))
        assert guidance.max_step_percent == pytest.approx(C(cfg.system.guidance.max_step_percent, 0, step))
        assert guidance.guidance_scale == pytest.approx(C(cfg.system.guidance.guidance_scale, 0, step))
        batch = camera_batch(ts, data, step)
        logits = render_stand_in(batch)
        loss, out = _system_step(ts, cfg, guidance, prompt_utils, batch, torch.sigmoid(logits), step)
        loss.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0
        assert out["min_step"] == int(1000 * guidance.min_step_percent)
    if "resolution_milestones" in cfg.data and cfg.data.resolution_milestones:
        assert batch["height"] == data["height"][-1]  # the second stage's resolution was used


def test_instaflow_schedule_translation(ts, workdir, paths):
    """rfds-instaflow.yaml's noise range equals the reference's: [0.02, 0.98] then [0.3, 0.98]."""
    cfg = load(ts, "rfds-instaflow.yaml", workdir, paths["instaflow"])
    g = ts.find(cfg.system.guidance_type)(cfg.system.guidance)
    from omegaconf import OmegaConf
    from threestudio.utils.misc import C

    for step, lo in ((0, 0.02), (4999, 0.02), (5001, 0.3), (15000, 0.3)):
        g.do_update_step(0, step)
        assert (g.min_step_percent, g.max_step_percent) == pytest.approx((lo, 0.98))
        # the reference: u in [0.02, max(step)], noise level 1 - u
        ref_max = C(OmegaConf.create([5000, 0.98, 0.7, 5001]), 0, step)
        assert (1 - ref_max, 1 - 0.02) == pytest.approx((lo, 0.98))
        t = g.backend.convention.sample_time(4000, g.min_step_percent, g.max_step_percent)
        assert lo - 1e-6 <= t.min() and t.max() <= 0.98 + 1e-6


@pytest.mark.parametrize("name", ["rfds-sd3.yaml", "rfds-rev-instaflow.yaml"])
def test_config_with_batch_of_four(ts, workdir, paths, name):
    cfg = load(ts, name, workdir, _model_path(paths, name), "data.batch_size=[4,4]")
    processor = ts.find(cfg.system.prompt_processor_type)(cfg.system.prompt_processor)
    guidance = ts.find(cfg.system.guidance_type)(cfg.system.guidance)
    data = _small_sizes(cfg)
    batch = camera_batch(ts, data, 0)
    assert batch["c2w"].shape[0] == 4
    logits = render_stand_in(batch)
    loss, out = _system_step(ts, cfg, guidance, processor(), batch, torch.sigmoid(logits), 0)
    loss.backward()
    per_view = logits.grad.abs().flatten(1).sum(1)
    assert (per_view > 0).all() and torch.isfinite(logits.grad).all()
