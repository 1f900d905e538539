"""Perp-Neg guidance (Armandpour et al. 2023, as threestudio applies it) on velocities.

    v̂ = v_∅ + w·(e_pos + Σ_i w_i·perp(v_neg_i − v_∅, e_pos)),   e_pos = v_pos − v_∅,
    perp(x, y) = x − (⟨x, y⟩ / max(⟨y, y⟩, 1e-6))·y   per sample.

For the linear flow, velocity differences at one x_t are noise-prediction differences divided
by a(t), and perp() is invariant to a per-sample scale, so this equals threestudio's ε-space
Perp-Neg.  :class:`PerpNegModel` is a :class:`~threestudio_rfds.protocol.VelocityModel` whose
condition packs the positive, unconditional and K negative embeddings (:func:`perp_neg_cond`);
use it with guidance scale 1 in :func:`threestudio_rfds.rfds.rfds` (it applies w itself).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..flow import append_dims
from ..protocol import Cond, VelocityModel, cat_cond, expand_cond

WEIGHTS_KEY = "perp_neg_weights"


def perpendicular_component(x: Tensor, y: Tensor) -> Tensor:
    """x − proj_y(x), per sample over all non-batch dimensions."""
    dims = tuple(range(1, x.ndim))
    coef = (x * y).sum(dims) / torch.clamp((y * y).sum(dims), min=1e-6)
    return x - append_dims(coef, x.ndim) * y


def perp_neg_cond(pos: Cond, uncond: Cond, neg: Cond, weights: Tensor) -> Cond:
    """Pack (positive [B,…], uncond [B,…], negatives [B,K,…], weights [B,K]) into one batch-first Cond."""
    if set(pos) != set(uncond) or set(pos) != set(neg):
        raise ValueError(f"perp-neg conditions must share keys, got {sorted(pos)}, {sorted(uncond)}, {sorted(neg)}")
    b, k = weights.shape
    for name, v in neg.items():
        if v.shape[:2] != (b, k):
            raise ValueError(f"negative {name!r} must have shape [B={b}, K={k}, ...], got {tuple(v.shape)}")
    out = {WEIGHTS_KEY: weights}
    out.update({f"pos:{n}": v for n, v in pos.items()})
    out.update({f"unc:{n}": v for n, v in uncond.items()})
    out.update({f"neg:{n}": v for n, v in neg.items()})
    return out


def _unpack(cond: Cond, prefix: str) -> Cond:
    return {n[len(prefix):]: v for n, v in cond.items() if n.startswith(prefix)}


class PerpNegModel:
    """Velocity with Perp-Neg CFG at scale ``guidance_scale`` for a packed condition.

    ``batched``: one model call on 2+K stacked copies of x_t (else one call per condition)."""

    def __init__(self, model: VelocityModel, guidance_scale: float, batched: bool = True):
        self.model, self.guidance_scale, self.batched = model, float(guidance_scale), batched
        self.convention = model.convention

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if WEIGHTS_KEY not in cond:
            raise ValueError(f"PerpNegModel needs a condition built by perp_neg_cond (key {WEIGHTS_KEY!r})")
        b = x_t.shape[0]
        weights = cond[WEIGHTS_KEY].to(x_t.device, x_t.dtype)
        neg = _unpack(cond, "neg:")
        k = weights.shape[1]
        conds = [expand_cond(_unpack(cond, "pos:"), b), expand_cond(_unpack(cond, "unc:"), b)]
        conds += [{n: v[:, i] for n, v in neg.items()} for i in range(k)]
        if self.batched:
            n = len(conds)
            v = self.model.velocity(torch.cat([x_t] * n), torch.cat([t] * n), cat_cond(*conds))
            vs = list(v.chunk(n))
        else:
            vs = [self.model.velocity(x_t, t, c) for c in conds]
        v_pos, v_unc, v_negs = vs[0], vs[1], vs[2:]
        e_pos = v_pos - v_unc
        accum = torch.zeros_like(e_pos)
        for i, v_neg in enumerate(v_negs):
            accum = accum + append_dims(weights[:, i], x_t.ndim) * perpendicular_component(v_neg - v_unc, e_pos)
        return v_unc + self.guidance_scale * (e_pos + accum)
