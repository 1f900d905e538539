"""CLIP prompt embeddings for InstaFlow / SD1.5: the text encoder's last hidden state over
prompts padded to the tokenizer's 77 tokens (StableDiffusionPipeline.encode_prompt, clip_skip=None)."""
from __future__ import annotations

import gc
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends.base import hub_kwargs, load_component, resolve_device, resolve_dtype
from ..backends.family import check_family
from ..checks import check_prompts


def _load_tokenizer(path: str, **kwargs):
    """CLIPTokenizer.from_pretrained, but an OSError instead of the empty 2-token tokenizer that
    transformers 5 returns when the vocabulary files are missing."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(path, **kwargs)
    if len(tokenizer) <= len(tokenizer.all_special_tokens) or tokenizer.model_max_length > 100_000:
        raise OSError("no tokenizer vocabulary found (vocab.json/merges.txt or tokenizer.json)")
    return tokenizer


_StrictCLIPTokenizer = type("CLIPTokenizer", (), {"from_pretrained": staticmethod(_load_tokenizer)})


@torch.no_grad()
def encode_clip_prompts(
    pretrained_model_name_or_path: str,
    prompts: Union[str, Sequence[str]],
    *,
    device: Union[str, torch.device, None] = "auto",
    dtype: Union[str, torch.dtype, None] = "auto",
    local_files_only: Optional[bool] = None,
    revision: Optional[str] = None,
) -> Dict[str, Tensor]:
    """{"encoder_hidden_states": [N, 77, D]} for N prompts ("" gives the unconditional embedding).

    Loads the ``tokenizer`` and ``text_encoder`` subfolders and releases them before returning.
    """
    from transformers import CLIPTextModel

    prompts = check_prompts(prompts)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = hub_kwargs(revision, local_files_only)
    path = pretrained_model_name_or_path
    check_family("instaflow", path, revision, local_files_only)
    tokenizer = load_component(_StrictCLIPTokenizer, path, "tokenizer", **kw)
    text_encoder = load_component(CLIPTextModel, path, "text_encoder", torch_dtype=dt, **kw).to(dev).eval()
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    hidden = text_encoder(ids.to(dev))[0]
    del text_encoder, tokenizer
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"encoder_hidden_states": hidden}
