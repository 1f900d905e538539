"""The density field of a splat set, for mesh export (docs/gaussians.md §5):

    ρ(x) = Σᵢ oᵢ · exp(−½ (x − μᵢ)ᵀ Σᵢ⁻¹ (x − μᵢ)),   Σᵢ = Rᵢ Sᵢ² Rᵢᵀ,
    c(x) = Σᵢ wᵢ(x) rgbᵢ / Σᵢ wᵢ(x)  with wᵢ(x) the i-th term of ρ,

with oᵢ = sigmoid(opacity logit), Sᵢ = diag(exp(log scales)), Rᵢ the rotation of the normalised
quaternion and rgbᵢ the view-independent (DC) colour.  Terms beyond 3σ are dropped."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .params import sh0_to_rgb

_CUTOFF = 9.0  # Mahalanobis² beyond which a term is dropped (3σ)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """R [N,3,3] of (w, x, y, z) quaternions, normalised first."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(quats.shape[:-1] + (3, 3))


def precisions(splats: Dict[str, Tensor]) -> Tensor:
    """Σᵢ⁻¹ = Rᵢ Sᵢ⁻² Rᵢᵀ, [N,3,3]."""
    R = quat_to_rotmat(splats["quats"].float())
    inv_s2 = torch.exp(-2 * splats["scales"].float())
    return (R * inv_s2[:, None, :]) @ R.transpose(1, 2)


@torch.no_grad()
def splat_density(points: Tensor, splats: Dict[str, Tensor], *, point_chunk: int = 8192,
                  splat_chunk: int = 2048) -> Tuple[Tensor, Tensor]:
    """(ρ [M], c [M,3]) at ``points`` [M,3], summed in chunks of points × splats."""
    means = splats["means"].float()
    prec = precisions(splats)
    opac = torch.sigmoid(splats["opacities"].float())
    rgb = sh0_to_rgb(splats["sh0"].float()[:, 0]).clamp(0, 1)
    density = torch.zeros(points.shape[0], device=points.device)
    colour = torch.zeros(points.shape[0], 3, device=points.device)
    for p0 in range(0, points.shape[0], point_chunk):
        p = points[p0:p0 + point_chunk].float()
        for s0 in range(0, means.shape[0], splat_chunk):
            d = p[:, None, :] - means[None, s0:s0 + splat_chunk]  # [m, s, 3]
            m2 = torch.einsum("msi,sij,msj->ms", d, prec[s0:s0 + splat_chunk], d)
            w = torch.where(m2 < _CUTOFF, opac[s0:s0 + splat_chunk] * torch.exp(-0.5 * m2), torch.zeros_like(m2))
            density[p0:p0 + point_chunk] += w.sum(1)
            colour[p0:p0 + point_chunk] += w @ rgb[s0:s0 + splat_chunk]
    return density, colour / density.clamp_min(1e-12)[:, None]


def grid_points(radius: float, resolution: int, device: Optional[torch.device] = None) -> Tensor:
    """The ``resolution``³ vertices of the cube [−radius, radius]³, x-major ([R,R,R,3] flattened)."""
    axis = torch.linspace(-radius, radius, resolution, device=device)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
