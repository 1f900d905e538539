"""Images for threestudio's ``guidance_evaluation_save`` from one RFDS step (threestudio-free).

For each of the first ``bs`` samples at noise level t with guided velocity v̂:
  imgs_noisy = D(x_t),   imgs_1step = D(x_t + (t' − t)·v̂) with t' = max(t − 1/N, 0),
  imgs_1orig = D(x_t − t·v̂) (the one-step x̂0),   imgs_final = D(Euler ODE from t' to 0),
all [bs, H, W, 3] in [0, 1]; N = ``num_steps`` for the whole range [0, 1].
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

from .. import flow

SliceVelocity = Callable[[Tensor, Tensor, slice], Tensor]  # (x, t, which samples) → v̂


@torch.no_grad()
def guidance_eval_images(decode: Callable[[Tensor], Tensor], velocity: SliceVelocity, x_t: Tensor, t: Tensor,
                         v_pred: Tensor, bs: int, num_steps: int) -> Dict:
    if num_steps < 1:
        raise ValueError(f"eval_num_steps must be >= 1, got {num_steps}")

    def hwc(latents: Tensor) -> Tensor:
        return decode(latents).float().permute(0, 2, 3, 1)

    x_t, t, v_pred = x_t[:bs], t[:bs], v_pred[:bs].to(x_t.dtype)
    t_next = (t - 1.0 / num_steps).clamp(min=0.0)
    x_1step = flow.euler_step(x_t, v_pred, t, t_next)
    x_1orig = flow.x0_from_velocity(x_t, v_pred, t)
    finals = []
    for b in range(bs):
        sl = slice(b, b + 1)
        x = x_1step[sl]
        n = math.ceil(float(t_next[b]) * num_steps - 1e-6)
        if n > 0:
            grid = torch.linspace(float(t_next[b]), 0.0, n + 1, device=x.device)
            x = flow.euler_sample(lambda xx, tt: velocity(xx, tt, sl), x, grid)
        finals.append(x)
    return {
        "bs": bs,
        "noise_levels": [float(v) for v in t.cpu()],
        "imgs_noisy": hwc(x_t),
        "imgs_1step": hwc(x_1step),
        "imgs_1orig": hwc(x_1orig),
        "imgs_final": hwc(torch.cat(finals)),
    }
