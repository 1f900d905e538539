"""Which model family a diffusers folder (or cached hub repository) holds, read from its
config files before any weights load, so that a folder of another family is refused where it
is opened instead of giving embeddings or latents of the wrong model.

A family is one row of :data:`FAMILIES`: the pipeline classes its ``model_index.json`` names
(``_class_name``) and, for folders without one, a component config that identifies it.  A new
backend adds itself with one row.  The pipeline class decides when it is in the table; otherwise
the first family whose component config matches; otherwise the family is unknown and nothing is
refused (a custom pipeline, a hub model not downloaded yet).
"""
from __future__ import annotations

import json
import os
from typing import Dict, NamedTuple, Optional, Tuple


class Family(NamedTuple):
    label: str  # for messages
    pipelines: Tuple[str, ...]  # model_index.json "_class_name"
    component: Optional[Tuple[str, str]] = None  # (subfolder, its config's "_class_name")


FAMILIES: Dict[str, Family] = {
    "sd3": Family("SD3 / SD3.5", ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
                  ("transformer", "SD3Transformer2DModel")),
    # InstaFlow is an SD1.5 UNet (its fine-tunes and SD1.5 itself are the merge's sources)
    "instaflow": Family("InstaFlow / SD1.5", ("StableDiffusionPipeline", "RectifiedFlowPipeline"),
                        ("unet", "UNet2DConditionModel")),
    "flux": Family("FLUX.1", ("FluxPipeline",), ("transformer", "FluxTransformer2DModel")),
    # families without a backend here, named so that their folders are recognised
    "sdxl": Family("SDXL", ("StableDiffusionXLPipeline",)),
}


def read_config(path: str, file: str, revision: Optional[str] = None) -> Optional[dict]:
    """The JSON file ``file`` (e.g. "vae/config.json") of a local folder or of a hub repository
    already in the local Hugging Face cache; None when it is not on disk or not JSON."""
    if os.path.isdir(path):
        found: object = os.path.join(path, file)
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(path, file, revision=revision)
        except Exception:  # an id that is not a repository name, an old huggingface_hub
            return None
    if not isinstance(found, str) or not os.path.isfile(found):
        return None
    try:
        with open(found, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def detect_family(path: str, revision: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """(family, evidence) for the model at ``path``, e.g. ("sd3", "model_index.json names
    StableDiffusion3Pipeline"), or None when its files do not say (or are not on disk)."""
    index = read_config(path, "model_index.json", revision) or {}
    pipeline = index.get("_class_name")
    for name, fam in FAMILIES.items():
        if pipeline in fam.pipelines:
            return name, f"its model_index.json names {pipeline}"
    for name, fam in FAMILIES.items():
        if fam.component is not None:
            sub, cls = fam.component
            if (read_config(path, f"{sub}/config.json", revision) or {}).get("_class_name") == cls:
                return name, f"its {sub}/config.json names {cls}"
    return None


def fetch_model_index(path: str, revision: Optional[str], local_files_only: Optional[bool]) -> None:
    """Download a hub repository's ``model_index.json`` (a few hundred bytes) into the local cache
    when it is not there, the hub answers and offline mode is off; failures (a gated repository
    without a login, no such file) are ignored: the family then stays unknown."""
    from .hub import looks_like_path, offline, unreachable

    if looks_like_path(path) or os.path.isdir(path) or offline(local_files_only) \
            or read_config(path, "model_index.json", revision):
        return
    from huggingface_hub import constants, hf_hub_download

    if unreachable(constants.ENDPOINT) is None:
        try:
            hf_hub_download(path, "model_index.json", revision=revision)
        except Exception:
            pass


def check_family(family: str, path: str, revision: Optional[str] = None,
                 local_files_only: Optional[bool] = None, fetch: bool = True) -> None:
    """Refuse ``path`` when its config files say it is a model of another family (one line
    naming both); a model whose files do not say is let through.  With ``fetch`` a hub id's
    ``model_index.json`` is fetched first when missing (:func:`fetch_model_index`)."""
    if fetch:
        fetch_model_index(path, revision, local_files_only)
    found = detect_family(path, revision)
    if found is None or found[0] == family:
        return
    other, why = found
    want = f" ({FAMILIES[family].label})" if family in FAMILIES else ""
    fix = f"load it as {other!r}" if other in _backends() else f"family {other!r} has no backend here"
    raise ValueError(f"{path!r} holds a model of family {other!r} ({FAMILIES[other].label}: {why}), not of family "
                     f"{family!r}{want}: pass a folder or hub id of family {family!r}, or {fix}")


def _backends():
    from . import BACKENDS

    return BACKENDS


def vae_scale_factor(path: str, revision: Optional[str] = None, subfolder: str = "vae") -> Optional[int]:
    """2^(len(block_out_channels) − 1) from ``<subfolder>/config.json`` without loading the VAE
    (as ``backend.vae_scale_factor``), or None when the config is not on disk."""
    blocks = (read_config(path, f"{subfolder}/config.json", revision) or {}).get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None


__all__ = ["FAMILIES", "Family", "check_family", "detect_family", "read_config", "vae_scale_factor"]
