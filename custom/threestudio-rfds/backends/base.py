"""What every diffusers backend shares: dtype and device choice, loading with clear errors,
and the render → latent resolution rule (docs/backends.md)."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import DeferredChecks, check_choice, check_not_meta
from .hub import ModelLoadError, offline, resolve_source

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None``/"auto" → cuda when available, else cpu.  A device this torch cannot use (cuda
    without CUDA, a GPU index beyond those visible, mps without MPS) is refused here, before any
    model loads."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU build (install a CUDA build of torch on a GPU machine)"
                   if torch.version.cuda is None else f"this torch (CUDA {torch.version.cuda} build) sees no GPU")
            raise ValueError(f"device {device!r} is not usable: {why}; use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not usable: {torch.cuda.device_count()} GPU(s) visible "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not usable: MPS is not available; use 'cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """``None``/"auto" → bf16 on CUDA (no consistent speed difference to fp16 measured on an H100,
    and fp32's exponent range; docs/performance.md), fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (*DTYPES.values(), torch.float64):
            raise ValueError(f"dtype must be torch.float32, float16, bfloat16 or float64 (or one of "
                             f"{['auto', *DTYPES]}), got {dtype}: the models compute in these floating-point types")
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    check_choice("dtype", dtype, ["auto", *DTYPES])
    return DTYPES[dtype]


def hub_kwargs(revision: Optional[str] = None, local_files_only: Optional[bool] = None) -> dict:
    """``from_pretrained`` keywords for the hub options users set (unset ones keep diffusers' defaults)."""
    kw = {"revision": revision}
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    return kw


def load_component(cls, path: str, subfolder: Optional[str], *, config_only: bool = False, **kwargs: Any):
    """``cls.from_pretrained(path, subfolder=...)`` after :func:`.hub.resolve_source` (missing
    folder, offline without the cache, unreachable hub: errors in seconds), with an error that
    names the model, the subfolder and how to get the weights.  ``config_only``: ``cls.load_config``
    instead (the component's config dict, no weights)."""
    where = f"{path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        local_only = resolve_source(path, kwargs.get("local_files_only"))
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot load {cls.__name__} from {where}: {e}") from None
    if local_only:
        kwargs["local_files_only"] = True
    try:
        return (cls.load_config if config_only else cls.from_pretrained)(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        if os.path.isdir(path):
            hint = f"the local folder exists but lacks a loadable {cls.__name__} in {subfolder or '.'}"
        elif offline(kwargs.get("local_files_only")):
            hint = (f"offline mode is on (HF_HUB_OFFLINE=1 or local_files_only) and the files are not all in the "
                    f"Hugging Face cache; run `hf download {path}` on a machine with internet, or pass a local folder")
        else:
            hint = (f"pass a local folder or a hub id; download it with `hf download {path}` (gated models such "
                    "as SD3 need `hf auth login` and accepting the licence)")
        raise ModelLoadError(f"cannot load {cls.__name__} from {where}: {hint}. Original error: {e}") from e


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Inference-only weights in ``dtype`` on ``device`` (cast before the move, so the device never
    holds a wider copy).  The cast also covers diffusers loading without ``accelerate``, which can
    leave weights in float32 whatever ``torch_dtype`` asked.  A quantised module (diffusers refuses
    to cast it) keeps the dtypes it was loaded with."""
    if not getattr(module, "is_quantized", False) and any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    module.to(device).eval().requires_grad_(False)
    return module


LATENT_RULES = ("native", "resize")


RGB_TOLERANCE = 0.5  # renders may overshoot [0, 1] a little (e.g. SH colours); further out they are another scale
RGB_HINT = (f"encode takes images in [0, 1] (values up to {RGB_TOLERANCE} outside are clamped to it): divide 0–255 "
            "images by 255, map [−1, 1] images by (x + 1) / 2")


def check_rgb(rgb: Tensor, checks: Optional[DeferredChecks] = None) -> None:
    """rgb is finite and within [−tol, 1 + tol] (tol = :data:`RGB_TOLERANCE`): queued on ``checks``
    without a host sync (the step settles it), or checked now when ``checks`` is None."""
    queue = DeferredChecks() if checks is None else checks
    queue.add_range("rgb", rgb.detach(), -RGB_TOLERANCE, 1.0 + RGB_TOLERANCE, RGB_HINT)
    if checks is None:
        queue()


def prepare_rgb(rgb: Tensor, rule: str, size: Optional[Tuple[int, int]], multiple: int,
                checks: Optional[DeferredChecks] = None) -> Tensor:
    """Render [B,3,H,W] in [0,1] → VAE input in [−1, 1] by the latent resolution rule.

    ``native``: encode at render resolution (SD3 reference: 256² renders → 32² latents);
    H and W must be multiples of ``multiple`` (the VAE's downsampling factor).
    ``resize``: bilinear resize to ``size`` first (InstaFlow reference: 512²).
    Values are checked by :func:`check_rgb` (deferred on ``checks``), then clamped to [0, 1].
    """
    check_choice("latent_rule", rule, LATENT_RULES)
    if not torch.is_tensor(rgb) or rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must have shape [B, 3, H, W] with values in [0, 1], got {tuple(getattr(rgb, 'shape', ()))}")
    check_not_meta("rgb", rgb)
    if rule == "resize":
        if size is None:
            raise ValueError("latent_rule 'resize' needs a size (height, width)")
        if tuple(rgb.shape[-2:]) != tuple(size):
            rgb = F.interpolate(rgb, size=tuple(size), mode="bilinear", align_corners=False)
    h, w = rgb.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"render size {h}x{w} is not a multiple of {multiple} (the VAE's downsampling); "
            f"use latent_rule='resize' with a size that is, or render at a multiple of {multiple}"
        )
    check_rgb(rgb, checks)
    return rgb.clamp(0, 1) * 2.0 - 1.0


def latent_noise_shape(n: int, channels: int, height: Optional[int], width: Optional[int], sample_size: int,
                       factor: int) -> Tuple[int, int, int, int]:
    """[n, C, H/f, W/f] of a sampler's initial noise; H, W default to the denoiser's sample size."""
    h, w = height or sample_size * factor, width or sample_size * factor
    if h % factor or w % factor:
        raise ValueError(f"height x width {h}x{w} must be multiples of the VAE factor {factor}")
    return n, channels, h // factor, w // factor


# ---------------------------------------------------------------- speed / memory options
COMPILE_MODES = (False, True, "default", "max-autotune-no-cudagraphs")


def configure_vae(vae: torch.nn.Module, *, channels_last: bool, checkpointing: bool) -> None:
    """Channels-last weights (tensor-core convolutions without layout transposes on CUDA) and,
    for small GPUs, gradient checkpointing of the encoder (recomputes activations in backward)."""
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    if checkpointing:
        vae.enable_gradient_checkpointing()


def vae_input(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def maybe_compile(module: torch.nn.Module, compile: Union[bool, str]) -> None:
    """``torch.compile`` the denoiser in place: True/"default" or "max-autotune-no-cudagraphs".

    CUDA-graph modes are not offered: RFDS-Rev calls the denoiser at two batch sizes per step and
    keeps the first output, which cudagraph replays would overwrite."""
    check_choice("compile", compile, COMPILE_MODES)
    if compile:
        module.compile(mode=None if compile in (True, "default") else compile)


JOINT_COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds")  # SD3's and FLUX's MMDiT conditions


def check_joint_cond(cond, name: str, family: str, config) -> None:
    """An MMDiT condition (SD3, FLUX.1): ``prompt_embeds`` [B, L, joint_attention_dim] and
    ``pooled_prompt_embeds`` [B, pooled_projection_dim] of the transformer ``config``; one line naming
    ``name``, the key, the shape given and the shape needed."""
    missing = [k for k in JOINT_COND_KEYS if k not in cond]
    if missing:
        raise ValueError(f"{name}: the {family} condition needs keys {list(JOINT_COND_KEYS)}, missing {missing} "
                         f"(got {sorted(cond)})")
    pe, pp = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
    if pe.ndim != 3 or pe.shape[-1] != config.joint_attention_dim:
        raise ValueError(f"{name}['prompt_embeds'] must be [B, L, {config.joint_attention_dim}] (the transformer's "
                         f"joint_attention_dim), got {tuple(pe.shape)}")
    if pp.ndim != 2 or pp.shape[-1] != config.pooled_projection_dim:
        raise ValueError(f"{name}['pooled_prompt_embeds'] must be [B, {config.pooled_projection_dim}] (the "
                         f"transformer's pooled_projection_dim), got {tuple(pp.shape)}")
