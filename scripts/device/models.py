"""Build random-weight SD3-medium-shaped and InstaFlow-shaped pipeline folders with ``save_pretrained``
(no download: the lent GPU machine reaches no hub).

``full``: the denoisers and VAEs of the real diffusers configs (the dicts of
:mod:`threestudio_rfds.steptime.guidance_step`: SD3-medium MMDiT 2.03 B + 16-channel VAE; SD1.5
UNet 860 M + VAE), built on the GPU in bf16.  The text encoders have the real output widths (CLIP-L
768, CLIP-G 1280, T5-XXL 4096; InstaFlow's CLIP 768) but two layers and the tests' small byte-level
tokenizers: threestudio runs them once per prompt and caches the embeddings, so their depth does
not enter a training step.  ``tiny``: the tests' tiny pipelines (tests/tiny_sd3.py, tiny_instaflow.py).

    python scripts/device/models.py {full,tiny} OUT_DIR      # → OUT_DIR/sd3, OUT_DIR/instaflow
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict

import torch

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests")
sys.path.insert(0, TESTS)


def _clip(hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=600, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=hidden,
                         hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=64, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return T5EncoderModel(cfg).eval()


def _on(device: torch.device, dtype: torch.dtype, fn):
    """``fn()`` with new tensors created on ``device`` in ``dtype`` (no CPU init of billions of weights)."""
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            return fn()
    finally:
        torch.set_default_dtype(default)


def full_sd3(out: str, device: torch.device, dtype: torch.dtype) -> str:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny_sd3 import _clip_tokenizer, _t5_tokenizer

    from threestudio_rfds.steptime.guidance_step import SD3_MEDIUM, SD3_VAE

    pipe = _on(device, dtype, lambda: StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD3_MEDIUM).eval(), vae=AutoencoderKL(**SD3_VAE).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(768, True), tokenizer=_clip_tokenizer("<|endoftext|>"),
        text_encoder_2=_clip(1280, True), tokenizer_2=_clip_tokenizer("!"),
        text_encoder_3=_t5(), tokenizer_3=_t5_tokenizer()))
    pipe.save_pretrained(out)
    return out


def full_instaflow(out: str, device: torch.device, dtype: torch.dtype) -> str:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_instaflow import tiny_clip_tokenizer

    from threestudio_rfds.steptime.guidance_step import SD15_UNET, SD15_VAE

    pipe = _on(device, dtype, lambda: StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET).eval(), vae=AutoencoderKL(**SD15_VAE).eval(),
        text_encoder=_clip(768, False), tokenizer=tiny_clip_tokenizer(),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build(size: str, out_dir: str) -> Dict[str, dict]:
    """Write ``out_dir/sd3`` and ``out_dir/instaflow``; per model: path, seconds, size on disk."""
    torch.manual_seed(0)
    device = torch.device("cuda" if size == "full" and torch.cuda.is_available() else "cpu")
    report = {}
    for name in ("sd3", "instaflow"):
        path, t0 = os.path.join(out_dir, name), time.perf_counter()
        if size == "tiny":
            from tiny_instaflow import build_tiny_instaflow
            from tiny_sd3 import build_tiny_sd3

            (build_tiny_sd3 if name == "sd3" else build_tiny_instaflow)(path)
        else:
            (full_sd3 if name == "sd3" else full_instaflow)(path, device, torch.bfloat16)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        report[name] = {"path": path, "seconds": round(time.perf_counter() - t0, 1), "gib": round(disk / 2**30, 3)}
    return report


if __name__ == "__main__":
    print(json.dumps({"phase": "models", "size": sys.argv[1], **build(sys.argv[1], sys.argv[2])}), flush=True)
