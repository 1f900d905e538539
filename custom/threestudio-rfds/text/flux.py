"""FLUX.1 prompt embeddings with the semantics of ``FluxPipeline.encode_prompt``.

    pooled = p_L                 CLIP ViT-L's pooled output (``text_encoder``, 77 tokens), [N, 768]
    prompt = h_T5                T5-XXL's last hidden state (``text_encoder_2``), [N, T, 4096]

T = ``max_sequence_length``: 512 for [dev] (FluxPipeline's default), 256 for [schnell] (its limit in the
diffusers documentation), chosen from the transformer config's ``guidance_embeds`` when not given.  The
encoders are loaded one at a time, used and released.  The text position ids are zeros (the backend
makes them).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends.base import hub_kwargs, load_component, resolve_device, resolve_dtype
from ..checks import check_prompts
from .sd3 import _tokenize, release

MAX_SEQUENCE_LENGTH = {True: 512, False: 256}  # [dev] (guidance embedding), [schnell]


def default_max_sequence_length(path: str, kw: dict) -> int:
    """512 for a model with a guidance embedding ([dev]), 256 without ([schnell]), from its transformer config."""
    from ..backends.flux import load_transformer_config

    return MAX_SEQUENCE_LENGTH[bool(load_transformer_config(path, kw).get("guidance_embeds"))]


def _clip_pooled(path: str, prompts, dev, dt, kw) -> Tensor:
    import weakref

    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = load_component(CLIPTokenizer, path, "tokenizer", **kw)
    encoder = load_component(CLIPTextModel, path, "text_encoder", torch_dtype=dt, **kw).to(dev).eval()
    ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length, "tokenizer")
    pooled = encoder(ids.to(dev), output_hidden_states=False).pooler_output
    refs = [weakref.ref(encoder)]
    del encoder, tokenizer
    release(refs)
    return pooled


def _t5_hidden(path: str, prompts, max_sequence_length: int, dev, dt, kw) -> Tensor:
    import weakref

    from transformers import T5EncoderModel, T5TokenizerFast

    tokenizer = load_component(T5TokenizerFast, path, "tokenizer_2", **kw)
    encoder = load_component(T5EncoderModel, path, "text_encoder_2", torch_dtype=dt, **kw).to(dev).eval()
    hidden = encoder(_tokenize(tokenizer, prompts, max_sequence_length, "tokenizer_2").to(dev),
                     output_hidden_states=False)[0]
    refs = [weakref.ref(encoder)]
    del encoder, tokenizer
    release(refs)
    return hidden


@torch.no_grad()
def encode_flux_prompts(
    pretrained_model_name_or_path: str,
    prompts: Union[str, Sequence[str]],
    *,
    device: Union[str, torch.device, None] = "auto",
    dtype: Union[str, torch.dtype, None] = "auto",
    max_sequence_length: Optional[int] = None,
    local_files_only: Optional[bool] = None,
    revision: Optional[str] = None,
) -> Dict[str, Tensor]:
    """{"prompt_embeds": [N, T, D], "pooled_prompt_embeds": [N, P]} for N prompts ("" gives the
    unconditional embedding; T = ``max_sequence_length``, None = 512 [dev] / 256 [schnell])."""
    prompts = check_prompts(prompts)
    if max_sequence_length is not None and (not isinstance(max_sequence_length, int)
                                            or not 1 <= max_sequence_length <= 512):
        raise ValueError(f"max_sequence_length must be an integer in [1, 512] or None, got {max_sequence_length!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = hub_kwargs(revision, local_files_only)
    path = pretrained_model_name_or_path
    n = max_sequence_length or default_max_sequence_length(path, kw)
    pooled = _clip_pooled(path, prompts, dev, dt, kw).to(dt)
    return {"prompt_embeds": _t5_hidden(path, prompts, n, dev, dt, kw).to(dt), "pooled_prompt_embeds": pooled}


__all__ = ["encode_flux_prompts", "default_max_sequence_length", "MAX_SEQUENCE_LENGTH"]
