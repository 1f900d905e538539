"""Prompt embeddings for every model family, optionally cached on disk (text/cache.py).

    encode_prompts("sd3", path, prompts)       → {"prompt_embeds", "pooled_prompt_embeds"}
    encode_prompts("flux", path, prompts)      → {"prompt_embeds" (T5), "pooled_prompt_embeds" (CLIP-L)}
    encode_prompts("instaflow", path, prompts) → {"encoder_hidden_states"}
"""
from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..backends.base import resolve_device, resolve_dtype
from ..backends.family import check_family
from ..checks import check_choice, check_finite, check_prompts

FAMILIES = ("sd3", "flux", "instaflow")
NOT_IN_KEY = ("device", "dtype", "local_files_only")  # do not change the embeddings' values


def _encoder(model_family: str) -> Callable[..., Dict[str, Tensor]]:
    check_choice("model_family", model_family, FAMILIES)
    if model_family == "sd3":
        from .sd3 import encode_sd3_prompts

        return encode_sd3_prompts
    if model_family == "flux":
        from .flux import encode_flux_prompts

        return encode_flux_prompts
    from .clip import encode_clip_prompts

    return encode_clip_prompts


def _options(fn: Callable, options: dict) -> dict:
    """The encoder's keyword options with defaults filled in (so equal settings share a key)."""
    params = {n: p for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY and n not in ("device", "dtype")}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {fn.__name__}; allowed: {sorted(params)}")
    full = {n: p.default for n, p in params.items()}
    full.update(options)
    return full


def encode_prompts(
    model_family: str,
    pretrained_model_name_or_path: str,
    prompts: Union[str, Sequence[str]],
    *,
    cache_dir: str | None = None,
    device: Union[str, torch.device, None] = "auto",
    dtype: Union[str, torch.dtype, None] = "auto",
    **options,
) -> Dict[str, Tensor]:
    """Embeddings [N, ...] of N prompts for ``model_family`` ("sd3", "flux" or "instaflow").

    ``options`` go to the family's encoder (sd3: max_sequence_length, use_t5, clip_skip,
    local_files_only, revision; flux: max_sequence_length, local_files_only, revision).  With ``cache_dir`` each prompt's embedding is stored under a
    hash of (family, model, prompt, options, dtype) and reused by later runs.
    """

    fn = _encoder(model_family)
    prompts = check_prompts(prompts)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    opts = _options(fn, options)
    path = pretrained_model_name_or_path
    check_family(model_family, path, opts.get("revision"), opts.get("local_files_only"))  # before any cache hit

    def compute(batch):
        out = fn(path, batch, device=dev, dtype=dt, **options)
        for k, v in out.items():  # never use (or cache) broken embeddings
            for i, p in enumerate(batch if not torch.isfinite(v).all() else []):
                check_finite(f"text embedding {k!r} of prompt {p!r}", v[i],
                             f"the text encoder of {path!r} overflowed or is broken (try dtype fp32)")
        return out

    if cache_dir is None:
        return compute(prompts)
    from .cache import EmbeddingCache, model_fingerprint
    from .shapes import expected_embeddings

    local = os.path.isdir(path)
    spec = {
        "family": model_family,
        "model": os.path.abspath(path) if local else path,
        "fingerprint": model_fingerprint(path),
        "dtype": str(dt),
        "options": {k: v for k, v in opts.items() if k not in NOT_IN_KEY},
    }
    expect = expected_embeddings(model_family, path, opts, str(dt))
    out = EmbeddingCache(cache_dir).get_or_compute(spec, prompts, compute, expect)
    return {k: v.to(dev) for k, v in out.items()}


def encode_prompt_pair(
    model_family: str,
    pretrained_model_name_or_path: str,
    prompt: str,
    negative_prompt: str = "",
    **kwargs,
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """(cond, uncond), each batch 1, encoded in one pass; "" is the pipelines' default negative."""
    emb = encode_prompts(model_family, pretrained_model_name_or_path, [prompt, negative_prompt], **kwargs)
    return {k: v[:1] for k, v in emb.items()}, {k: v[1:] for k, v in emb.items()}


__all__ = ["encode_prompts", "encode_prompt_pair", "FAMILIES"]
