"""The small velocity-model protocol every algorithm runs on (docs/math.md §3).

A *condition* is a dict of tensors whose first dimension is the batch, e.g. SD3's
``{"prompt_embeds": [B,333,4096], "pooled_prompt_embeds": [B,2048]}``.  Classifier-free
guidance needs a conditional and an unconditional one of the same structure.
"""
from __future__ import annotations

from typing import Dict, Protocol, runtime_checkable

import torch
from torch import Tensor

from .checks import check_batch, check_guidance_scale
from .flow import FlowConvention

Cond = Dict[str, Tensor]


@runtime_checkable
class VelocityModel(Protocol):
    """Anything that predicts v_t = dx_t/dt (the project's notation) at noise level t [B]."""

    convention: FlowConvention

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


@runtime_checkable
class LatentBackend(VelocityModel, Protocol):
    """A velocity model with a differentiable image codec (the diffusers backends)."""

    latent_channels: int

    def encode(self, rgb: Tensor) -> Tensor: ...  # B×3×H×W in [0, 1] → latents (diffusers backends: checks=)

    def decode(self, latents: Tensor) -> Tensor: ...  # latents → B×3×H×W in [0, 1]


def for_latents(model: VelocityModel, x: Tensor) -> VelocityModel:
    """``model`` with the convention that fits latents shaped like ``x``.  A backend whose time shift
    depends on the latent size (FLUX.1 [dev]'s resolution-dependent shift) provides ``for_latents(x)``
    and has no single convention; every other model is returned unchanged."""
    fit = getattr(model, "for_latents", None)
    return model if fit is None else fit(x)


def cat_cond(*conds: Cond) -> Cond:
    """Stack conditions along the batch: the keys, and each tensor's shape after the batch
    dimension, must agree (empty conditions stay empty)."""
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            raise ValueError(f"conditions have different keys: {sorted(keys)} vs {sorted(c)}")
        for k in keys:
            if c[k].shape[1:] != conds[0][k].shape[1:]:
                raise ValueError(
                    f"conditions differ in {k!r}: {tuple(conds[0][k].shape)} vs {tuple(c[k].shape)}; batched CFG "
                    "stacks cond and uncond, so all but the batch dimension must agree (encode them with the same "
                    "settings, e.g. text.encode_prompt_pair, or pass cfg_batched=False)")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_batch_size(cond: Cond) -> int:
    sizes = {int(v.shape[0]) for v in cond.values()}
    if len(sizes) != 1:
        raise ValueError(f"condition tensors disagree on batch size: { {k: tuple(v.shape) for k, v in cond.items()} }")
    return sizes.pop()


def expand_cond(cond: Cond, batch_size: int, name: str = "cond") -> Cond:
    """Broadcast a batch-1 condition to ``batch_size`` (or check that the sizes agree).

    An empty condition (an unconditional model) is returned as is."""
    if not cond:
        return cond
    n = cond_batch_size(cond)
    if n == batch_size:
        return cond
    if n == 1:
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in cond.items()}
    raise ValueError(f"{name} has batch size {n}; it must be 1 or match the latent batch size {batch_size}")


def cfg_velocity(
    model: VelocityModel,
    x_t: Tensor,
    t: Tensor,
    cond: Cond,
    uncond: Cond,
    guidance_scale: float,
    *,
    batched: bool = True,
) -> Tensor:
    """v̂_cfg = v(x_t, ∅) + w·(v(x_t, c) − v(x_t, ∅))  (diffusers' definition of the scale w).

    ``batched`` runs cond and uncond in one call of batch 2B; otherwise two calls (less memory).
    ``guidance_scale == 1`` skips the unconditional pass.
    """
    check_guidance_scale(guidance_scale)
    b = check_batch(("x_t", "t"), x_t, t)
    cond, uncond = expand_cond(cond, b, "cond"), expand_cond(uncond, b, "uncond")
    check_cond = getattr(model, "check_cond", None)  # a backend names a key of the wrong shape, and what it needs
    if check_cond is not None:
        check_cond(cond, "cond")
        if guidance_scale != 1.0:
            check_cond(uncond, "uncond")
    if guidance_scale == 1.0:
        return model.velocity(x_t, t, cond)
    if batched:
        v = model.velocity(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, uncond))
        v_c, v_u = v.chunk(2)
    else:
        v_c = model.velocity(x_t, t, cond)
        v_u = model.velocity(x_t, t, uncond)
    return v_u + guidance_scale * (v_c - v_u)
