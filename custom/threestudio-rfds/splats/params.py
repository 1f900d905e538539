"""Splat parameters: spherical-harmonic colour constants and initialisation (docs/gaussians.md §1)."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from ..checks import check_int, check_positive, check_range

SH_C0 = 0.28209479177387814  # Y₀⁰ = 1/(2√π); gsplat's colour is Σ_k c_k Y_k(d) + 0.5
PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")


def num_sh_bases(degree: int) -> int:
    """K = (degree + 1)² coefficients per colour channel."""
    return (degree + 1) ** 2


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """c₀ = (rgb − 0.5) / Y₀⁰: the DC coefficient whose view-independent colour is ``rgb``."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """rgb = Y₀⁰ c₀ + 0.5 (before gsplat's clamp at 0)."""
    return sh0 * SH_C0 + 0.5


def knn_log_scales(xyz: Tensor, k: int = 3, chunk: int = 4096) -> Tensor:
    """log of the mean distance to the ``k`` nearest other points, the same on all three axes
    (the 3DGS initialisation); [N,3]."""
    n = xyz.shape[0]
    if n <= k:
        return torch.full((n, 3), math.log(0.01), dtype=xyz.dtype, device=xyz.device)
    dists = []
    for start in range(0, n, chunk):
        d = torch.cdist(xyz[start:start + chunk], xyz)  # [c, N]
        d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = math.inf  # not itself
        dists.append(d.topk(k, dim=1, largest=False).values.mean(dim=1))
    mean = torch.cat(dists).clamp_min(1e-7)
    return mean.log()[:, None].expand(n, 3).clone()


def splats_from_points(xyz: Tensor, rgb: Optional[Tensor] = None, *, sh_degree: int = 0,
                       opacity: float = 0.1, scale: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
    """Isotropic splats at ``xyz`` [N,3] with colours ``rgb`` [N,3] in [0,1] (random when None),
    opacity σ(o) = ``opacity``, scale ``scale`` (or the 3-nearest-neighbour distance), identity
    rotation and zero higher-order SH."""
    if xyz.ndim != 2 or xyz.shape[-1] != 3 or xyz.shape[0] == 0:
        raise ValueError(f"points must have shape [N, 3] with N >= 1, got {tuple(xyz.shape)}")
    if not torch.isfinite(xyz).all():
        raise ValueError("points hold NaN/inf coordinates; clean the point cloud first")
    check_int("sh_degree", sh_degree)
    check_range("opacity", opacity, 1e-6, 1 - 1e-6)
    n = xyz.shape[0]
    xyz = xyz.float()
    if rgb is None:
        rgb = torch.rand(n, 3, generator=generator, device=xyz.device)
    elif rgb.shape != (n, 3):
        raise ValueError(f"colours must have shape [{n}, 3] like the points, got {tuple(rgb.shape)}")
    if scale is None:
        log_scales = knn_log_scales(xyz)
    else:
        check_positive("scale", scale)
        log_scales = torch.full((n, 3), math.log(scale), device=xyz.device)
    quats = torch.zeros(n, 4, device=xyz.device)
    quats[:, 0] = 1.0
    return {
        "means": xyz.clone(),
        "scales": log_scales,
        "quats": quats,
        "opacities": torch.full((n,), math.log(opacity / (1 - opacity)), device=xyz.device),
        "sh0": rgb_to_sh0(rgb.float().clamp(0, 1))[:, None, :],
        "shN": torch.zeros(n, num_sh_bases(sh_degree) - 1, 3, device=xyz.device),
    }


def points_in_ball(n: int, radius: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` points uniform in the ball of ``radius``: direction ~ N(0, I)/‖·‖, radius ∝ U^(1/3)."""
    check_int("num_gaussians", n, 1)
    check_positive("radius", radius)
    d = torch.randn(n, 3, generator=generator)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return d * radius * torch.rand(n, 1, generator=generator) ** (1 / 3)
