"""Tiny, randomly initialised FLUX.1 pipelines of the real architectures ([dev] and [schnell]).

``build_tiny_flux(dir, variant)`` saves a ``FluxPipeline`` with ``save_pretrained`` in the diffusers
layout, so ``FluxPipeline.from_pretrained(dir)`` and every component's ``from_pretrained(dir,
subfolder=...)`` load it as they load ``black-forest-labs/FLUX.1-dev`` / ``-schnell``.  Nothing is
downloaded: the tokenizers are the byte-level CLIP and small T5 vocabularies of tests/tiny_sd3.py.

Sizes (a few MB):
  * transformer: FluxTransformer2DModel, 1 double + 1 single block, 2 heads × 16, rope axes (4, 6, 6),
    in_channels 64 (16 latent channels packed 2×2), joint_attention_dim = T5 d_model = 48,
    pooled_projection_dim = CLIP hidden = 24; ``guidance_embeds`` True for dev, False for schnell.
  * vae: AutoencoderKL with 2 blocks → **downsampling factor 2** (the real FLUX VAE has 8), 16 latent
    channels, shift_factor 0.1159, scaling_factor 0.3611 (FLUX.1's), no quant convs.
  * text_encoder: CLIPTextModel (pooled output used), text_encoder_2: T5EncoderModel.
  * scheduler: FlowMatchEulerDiscreteScheduler as the hub configs: dev shift 3 with dynamic shifting
    (μ from the image token count, base 0.5 at 256 tokens, max 1.15 at 4096), schnell shift 1, static.
"""
from __future__ import annotations

import os

import torch

from tiny_sd3 import T5_DIM, _clip_tokenizer, _t5_encoder, _t5_tokenizer

VAE_SCALE_FACTOR = 2
CLIP_DIM = 24
VARIANTS = ("dev", "schnell")
SCHEDULERS = {
    "dev": dict(shift=3.0, use_dynamic_shifting=True),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
}


def _clip_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=600, hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", bos_token_id=0,
                         eos_token_id=2, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_flux_transformer(variant: str = "dev", **overrides):
    from diffusers import FluxTransformer2DModel

    cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
               guidance_embeds=variant == "dev", axes_dims_rope=(4, 6, 6))
    return FluxTransformer2DModel(**{**cfg, **overrides}).eval()


def tiny_flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=32, shift_factor=0.1159, scaling_factor=0.3611,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def build_tiny_flux(directory: str, variant: str = "dev") -> str:
    """Build, save and return the path of a tiny FLUX.1 [dev] or [schnell] pipeline folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, **SCHEDULERS[variant])
    pipe = FluxPipeline(
        transformer=tiny_flux_transformer(variant), vae=tiny_flux_vae(), scheduler=scheduler,
        text_encoder=_clip_text_model(), tokenizer=_clip_tokenizer("<|endoftext|>"),
        text_encoder_2=_t5_encoder(), tokenizer_2=_t5_tokenizer(),
    )
    os.makedirs(directory, exist_ok=True)
    pipe.save_pretrained(directory)
    return directory


if __name__ == "__main__":  # python tests/tiny_flux.py OUT_DIR [dev|schnell]
    import sys

    print(build_tiny_flux(sys.argv[1] if len(sys.argv) > 1 else "tiny-flux", *(sys.argv[2:3] or ["dev"])))
