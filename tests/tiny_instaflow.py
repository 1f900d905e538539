"""A tiny randomly-initialised InstaFlow (SD1.5-layout) pipeline folder for the tests.

Same classes and folder layout as ``XCLIU/2_rectified_flow_from_sd_1_5`` (unet, vae, text_encoder,
tokenizer, scheduler, model_index.json), written by ``save_pretrained`` so that
``StableDiffusionPipeline.from_pretrained(dir)`` and the backends load it like the real model.
Sizes are tiny; shapes follow the config: CLIP embeddings are [B, 77, HIDDEN] (768 for the real
model), latents have 4 channels and the VAE downsamples by 8 (four blocks) like SD1.5's.
No downloads: the CLIP tokenizer is built from a byte-level vocabulary made here.
"""
from __future__ import annotations

import os

import torch

HIDDEN = 32  # CLIP hidden size = UNet cross_attention_dim (768 in SD1.5)
SEQ_LEN = 77


def _bytes_to_unicode() -> list:
    """GPT-2/CLIP's reversible byte → printable-unicode table (the alphabet of the BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A CLIPTokenizer over single bytes plus a few merges (vocab ≈ 520 tokens)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=SEQ_LEN)


def tiny_unet(seed: int = 0, **overrides):
    """SD1.5's UNet layout, two blocks of 32/64 channels (overrides: any config entry)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = 4  # downsampling factor 2**(blocks-1) = 8 as in SD1.5
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def tiny_clip_text_model(vocab_size: int, tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def build_tiny_instaflow(dir: str, seed: int = 0) -> str:
    """Write the pipeline folder to ``dir`` (created if needed) and return its path."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    os.makedirs(dir, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_model(len(tokenizer), tokenizer, seed),
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dir, safe_serialization=True)
    return dir
