"""What the text encoders produce per prompt, read from the model's config files, so that the
embedding cache can reject an entry of the wrong shape or dtype (text/cache.py ``expect``).

Only files already on disk are read (a local folder or the Hugging Face cache); when one is
missing the answer is None and the cache falls back to the model's own rows.
"""
from __future__ import annotations

from typing import Optional

from ..backends.family import read_config
from .cache import Expect
from .flux import MAX_SEQUENCE_LENGTH


def _config(path: str, subfolder: str, name: str, revision: Optional[str]) -> Optional[dict]:
    return read_config(path, f"{subfolder}/{name}", revision)


def _max_length(path: str, subfolder: str, revision: Optional[str]) -> Optional[int]:
    """The tokenizer's padded length (CLIP: 77), or None (any length) when not recorded."""
    n = (_config(path, subfolder, "tokenizer_config.json", revision) or {}).get("model_max_length")
    return n if isinstance(n, int) and 0 < n < 100_000 else None


def expected_embeddings(family: str, path: str, options: dict, dtype: str) -> Optional[Expect]:
    """{name: (per-prompt shape, dtype)} of :func:`threestudio_rfds.text.encode_prompts`, or None."""
    rev = options.get("revision")
    if family == "instaflow":
        enc = _config(path, "text_encoder", "config.json", rev)
        if not enc or "hidden_size" not in enc:
            return None
        return {"encoder_hidden_states": ((_max_length(path, "tokenizer", rev), enc["hidden_size"]), dtype)}
    if family == "flux":
        return _flux_embeddings(path, options, dtype, rev)
    clip = [_config(path, sub, "config.json", rev) for sub in ("text_encoder", "text_encoder_2")]
    if options.get("use_t5", True):
        width = (_config(path, "text_encoder_3", "config.json", rev) or {}).get("d_model")
    else:
        width = (_config(path, "transformer", "config.json", rev) or {}).get("joint_attention_dim")
    if not all(c and "projection_dim" in c for c in clip) or not isinstance(width, int):
        return None
    clip_len = _max_length(path, "tokenizer", rev)
    seq = None if clip_len is None else clip_len + int(options.get("max_sequence_length", 256))
    return {"prompt_embeds": ((seq, width), dtype),
            "pooled_prompt_embeds": ((sum(c["projection_dim"] for c in clip),), dtype)}


def _flux_embeddings(path: str, options: dict, dtype: str, rev: Optional[str]) -> Optional[Expect]:
    """T5 [T, d_model] (T = max_sequence_length, or 512 / 256 by the transformer's guidance embedding) and
    CLIP-L's pooled [hidden_size]."""
    clip, t5 = (_config(path, sub, "config.json", rev) for sub in ("text_encoder", "text_encoder_2"))
    seq = options.get("max_sequence_length")
    if seq is None:
        transformer = _config(path, "transformer", "config.json", rev)
        seq = None if transformer is None else MAX_SEQUENCE_LENGTH[bool(transformer.get("guidance_embeds"))]
    if not (clip and "hidden_size" in clip and t5 and "d_model" in t5):
        return None
    return {"prompt_embeds": ((seq, t5["d_model"]), dtype), "pooled_prompt_embeds": ((clip["hidden_size"],), dtype)}


__all__ = ["expected_embeddings"]
