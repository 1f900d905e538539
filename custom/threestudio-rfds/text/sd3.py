"""SD3 / SD3.5 prompt embeddings with the semantics of ``StableDiffusion3Pipeline.encode_prompt``.

    c_clip   = [h_L ; h_G]            penultimate hidden states of CLIP-L and CLIP-G, [N, 77, dL + dG]
    prompt   = [pad(c_clip, D) ‖ h_T5]  zero-padded to the T5 width D, concatenated along the sequence
    pooled   = [p_L ; p_G]            projected pooled outputs, [N, dL + dG] (2048 for SD3)

The three encoders are loaded one at a time, used and released, so peak memory is the largest
encoder (T5-XXL) rather than all three.  ``use_t5=False`` puts zeros in the T5 slot, exactly as
the pipeline does when loaded with ``text_encoder_3=None`` (low-memory mode).
"""
from __future__ import annotations

import gc
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.base import hub_kwargs, load_component, resolve_device, resolve_dtype
from ..backends.family import check_family
from ..checks import check_prompts

CLIP_SUBFOLDERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def release(refs: List[weakref.ref]) -> None:
    """After the caller dropped its references: collect if any object is still alive (a cycle),
    then return cached CUDA memory."""
    if any(r() is not None for r in refs):
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _tokenize(tokenizer, prompts: List[str], max_length: int, name: str) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        warnings.warn(f"{name}: prompts longer than {max_length} tokens were truncated")
    return ids


def _clip_embeds(path: str, tok_sub: str, enc_sub: str, prompts: List[str], max_length: Optional[int],
                 clip_skip: Optional[int], dev, dt, kw) -> tuple[Tensor, Tensor, int]:
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = load_component(CLIPTokenizer, path, tok_sub, **kw)
    encoder = load_component(CLIPTextModelWithProjection, path, enc_sub, torch_dtype=dt, **kw).to(dev).eval()
    max_length = max_length or tokenizer.model_max_length  # the pipeline uses tokenizer 1's for both
    out = encoder(_tokenize(tokenizer, prompts, max_length, tok_sub).to(dev), output_hidden_states=True)
    hidden = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
    pooled = out[0]
    refs = [weakref.ref(encoder)]
    del encoder, tokenizer, out
    release(refs)
    return hidden, pooled, max_length


def _t5_embeds(path: str, prompts: List[str], max_sequence_length: int, dev, dt, kw) -> Tensor:
    from transformers import T5EncoderModel, T5TokenizerFast

    tokenizer = load_component(T5TokenizerFast, path, "tokenizer_3", **kw)
    encoder = load_component(T5EncoderModel, path, "text_encoder_3", torch_dtype=dt, **kw).to(dev).eval()
    hidden = encoder(_tokenize(tokenizer, prompts, max_sequence_length, "tokenizer_3").to(dev))[0]
    refs = [weakref.ref(encoder)]
    del encoder, tokenizer
    release(refs)
    return hidden


def _joint_attention_dim(path: str, kw) -> int:
    from diffusers import SD3Transformer2DModel

    try:
        return int(SD3Transformer2DModel.load_config(path, subfolder="transformer", **kw)["joint_attention_dim"])
    except (OSError, ValueError) as e:
        raise ValueError(f"use_t5=False needs the transformer config of {path!r} (subfolder 'transformer') "
                         f"for the T5 width: {e}") from e


@torch.no_grad()
def encode_sd3_prompts(
    pretrained_model_name_or_path: str,
    prompts: Union[str, Sequence[str]],
    *,
    device: Union[str, torch.device, None] = "auto",
    dtype: Union[str, torch.dtype, None] = "auto",
    max_sequence_length: int = 256,
    use_t5: bool = True,
    clip_skip: Optional[int] = None,
    local_files_only: Optional[bool] = None,
    revision: Optional[str] = None,
) -> Dict[str, Tensor]:
    """{"prompt_embeds": [N, 77 + T, D], "pooled_prompt_embeds": [N, dL + dG]} for N prompts
    (T = ``max_sequence_length``; "" gives the unconditional embedding, as the pipeline's default
    negative prompt)."""
    prompts = check_prompts(prompts)
    if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length must be an integer in [1, 512], got {max_sequence_length!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = hub_kwargs(revision, local_files_only)
    path = pretrained_model_name_or_path
    check_family("sd3", path, revision, local_files_only)

    hiddens, pooleds, max_length = [], [], None
    for tok_sub, enc_sub in CLIP_SUBFOLDERS:
        h, p, max_length = _clip_embeds(path, tok_sub, enc_sub, prompts, max_length, clip_skip, dev, dt, kw)
        hiddens.append(h.to(dt))
        pooleds.append(p.to(dt))
    if use_t5:
        t5 = _t5_embeds(path, prompts, max_sequence_length, dev, dt, kw).to(dt)
    else:
        t5 = torch.zeros(len(prompts), max_sequence_length, _joint_attention_dim(path, kw), device=dev, dtype=dt)
    clip = torch.cat(hiddens, dim=-1)
    if clip.shape[-1] > t5.shape[-1]:
        raise ValueError(f"CLIP width {clip.shape[-1]} exceeds the T5 width {t5.shape[-1]} of {path!r}")
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooleds, dim=-1)}


__all__ = ["encode_sd3_prompts", "release"]
