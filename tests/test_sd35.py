"""SD3.5 Large (RMS QK-norm), Large Turbo (same architecture) and Medium (MMDiT-X: QK-norm and dual
attention) load through SD3Backend: tiny folders of each architecture (tests/tiny_sd3.py), the sampler
against StableDiffusion3Pipeline, an RFDS-Rev step, and the shipped SD3.5 configs."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from threestudio_rfds.backends.sd3 import SD3Backend
from threestudio_rfds.rfds import rfds_rev
from threestudio_rfds.text import encode_prompt_pair

from tiny_sd3 import SD3_VARIANTS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom", "threestudio-rfds",
                          "configs")
VARIANTS = [v for v in SD3_VARIANTS if v != "sd3"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd35_architecture_loads_samples_like_the_pipeline_and_runs_rfds_rev(tiny_sd35_paths, variant):
    from diffusers import StableDiffusion3Pipeline

    path = tiny_sd35_paths[variant]
    backend = SD3Backend(path, device="cpu", dtype="fp32")
    cfg = backend.transformer.config
    assert cfg.qk_norm == "rms_norm"
    assert tuple(cfg.dual_attention_layers) == ((0,) if variant == "sd35-medium" else ())
    assert backend.convention.shift == 3.0  # read from the scheduler config

    cond, uncond = encode_prompt_pair("sd3", path, "a hamburger", device="cpu", dtype="fp32", max_sequence_length=8)
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               negative_prompt_embeds=uncond["prompt_embeds"], negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"],
               guidance_scale=4.5, num_inference_steps=4, latents=latents, output_type="latent").images
    torch.testing.assert_close(backend.sample(cond, uncond, 4.5, 4, latents=latents), ref, rtol=1e-5, atol=1e-5)

    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = rfds_rev(backend, backend.encode(rgb), cond, uncond, guidance_scale=4.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and rgb.grad.abs().sum() > 0


def test_variants_differ_in_the_transformer():
    """The tiny variants are different architectures (the parameter names of QK-norm and dual attention)."""
    from diffusers import SD3Transformer2DModel

    def keys(variant):
        with torch.device("meta"):
            return set(SD3Transformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                             joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
                                             **SD3_VARIANTS[variant]).state_dict())

    sd3, large, medium = keys("sd3"), keys("sd35-large"), keys("sd35-medium")
    assert any("norm_q" in k for k in large - sd3)
    assert any("attn2" in k for k in medium - large)


@pytest.mark.parametrize("name,model,steps", [("rfds-sd35-large.yaml", "stabilityai/stable-diffusion-3.5-large", None),
                                              ("rfds-sd35-large-turbo.yaml",
                                               "stabilityai/stable-diffusion-3.5-large-turbo", 4)])
def test_sd35_configs(name, model, steps):
    cfg = OmegaConf.load(os.path.join(CONFIG_DIR, name))
    g = cfg.system.guidance
    assert cfg.system.guidance_type == "rfds-sd3-guidance" and g.pretrained_model_name_or_path == model
    assert cfg.system.prompt_processor.pretrained_model_name_or_path == model
    assert g.get("sample_num_steps") == steps and g.get("eval_num_steps") == steps  # Turbo: its 4 steps
    assert g.get("shift") is None  # the scheduler's (3.0 for SD3.5)
