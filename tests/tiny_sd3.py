"""A tiny, randomly initialised Stable Diffusion 3 pipeline of the real architectures.

``build_tiny_sd3(dir)`` saves it with ``save_pretrained`` in the diffusers layout, so
``StableDiffusion3Pipeline.from_pretrained(dir)`` and every component's
``from_pretrained(dir, subfolder=...)`` load it.  Nothing is downloaded: the tokenizers are
built from a byte-level CLIP vocabulary and a small T5 unigram vocabulary written here.

Sizes (a few MB, built in about a second):
  * transformer: SD3Transformer2DModel, patch 2, 2 layers, 2 heads × 8, 16 latent channels,
    joint_attention_dim = T5 d_model = 48, pooled_projection_dim = 16 + 24 = 40,
    pos_embed_max_size 32 (latents up to 64×64).
  * vae: AutoencoderKL with 2 blocks → **downsampling factor 2** (the real SD3 VAE has 8),
    16 latent channels, shift_factor 0.0609, scaling_factor 1.5305, no quant convs (as SD3).
  * text_encoder / text_encoder_2: CLIPTextModelWithProjection, hidden = projection = 16 / 24.
  * text_encoder_3: T5EncoderModel, d_model 48 (> 16 + 24, so CLIP states are zero-padded as in SD3).
  * scheduler: FlowMatchEulerDiscreteScheduler(shift=3.0).

``variant`` builds the SD3.5 architectures at the same widths (SD3_VARIANTS): "sd35-large" and
"sd35-large-turbo" (MMDiT with RMS QK-norm; Turbo differs from Large only in its weights and use),
"sd35-medium" (MMDiT-X: QK-norm and a dual-attention first layer).
"""
from __future__ import annotations

import os

import torch

VAE_SCALE_FACTOR = 2  # 2 ** (len(block_out_channels) - 1)
T5_DIM = 48
CLIP_DIMS = (16, 24)
SD3_VARIANTS = {  # transformer options of each architecture (diffusers' SD3Transformer2DModel arguments)
    "sd3": {},
    "sd35-large": {"qk_norm": "rms_norm"},
    "sd35-large-turbo": {"qk_norm": "rms_norm"},
    "sd35-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
}


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"), ("t", "h"), ("th", "e</w>")]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "cat", "dog", "photo", "of", "on", "in", "red", "blue")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=600, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=64, d_model=T5_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return T5EncoderModel(cfg).eval()


def build_tiny_sd3(directory: str, variant: str = "sd3") -> str:
    """Build, save and return the path of the tiny SD3 (or SD3.5 ``variant``) pipeline folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=sum(CLIP_DIMS), pos_embed_max_size=32, **SD3_VARIANTS[variant],
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=32, shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip_encoder(CLIP_DIMS[0]), tokenizer=_clip_tokenizer("<|endoftext|>"),
        text_encoder_2=_clip_encoder(CLIP_DIMS[1]), tokenizer_2=_clip_tokenizer("!"),
        text_encoder_3=_t5_encoder(), tokenizer_3=_t5_tokenizer(),
    )
    os.makedirs(directory, exist_ok=True)
    pipe.save_pretrained(directory)
    return directory


if __name__ == "__main__":  # python tests/tiny_sd3.py OUT_DIR
    import sys

    print(build_tiny_sd3(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd3"))
