"""One render entry point on ``gsplat.rasterization`` (docs/gaussians.md §3).

For each camera, gsplat projects every splat (EWA: Σ2D = J W Σ Wᵀ Jᵀ + eps2d·I), evaluates its
colour from the SH coefficients in the viewing direction, and composites front to back:

    C = Σᵢ cᵢ αᵢ Tᵢ,   A = Σᵢ αᵢ Tᵢ,   D = Σᵢ zᵢ αᵢ Tᵢ / A,   Tᵢ = Πⱼ<ᵢ (1 − αⱼ),

with αᵢ = oᵢ · exp(−½ dᵀ Σ2D⁻¹ d).  C is premultiplied by A; the caller composites its background
as C + (1 − A)·bg."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from ..checks import check_choice

RASTERIZE_MODES = ("classic", "antialiased")


def require_gsplat():
    """``gsplat``, or an ImportError that says how to install it."""
    try:
        import gsplat
    except ImportError as e:
        raise ImportError("Gaussian splatting needs gsplat (Apache-2.0): pip install 'gsplat>=1.5,<1.6' "
                          "(or pip install 'threestudio-rfds[gs]'); its CUDA kernels compile on first use") from e
    return gsplat


def splat_colors(splats: Dict[str, Tensor]) -> Tensor:
    """SH coefficients [N,K,3] = sh0 ‖ shN."""
    return torch.cat([splats["sh0"], splats["shN"]], dim=1)


def rasterize(splats: Dict[str, Tensor], viewmats: Tensor, Ks: Tensor, width: int, height: int, *,
              sh_degree: int, near_plane: float = 0.01, far_plane: float = 1e10,
              rasterize_mode: str = "classic", eps2d: float = 0.3,
              absgrad: bool = False) -> Tuple[Tensor, Tensor, Tensor, Dict[str, Any]]:
    """(C [B,H,W,3], A [B,H,W,1], D [B,H,W,1], gsplat's info) for B cameras.

    ``info`` is what gsplat's densification strategies read (``means2d`` with its gradient,
    ``radii``, ``width``/``height``, ``n_cameras``)."""
    check_choice("rasterize_mode", rasterize_mode, RASTERIZE_MODES)
    gsplat = require_gsplat()
    renders, alphas, info = gsplat.rasterization(
        means=splats["means"], quats=splats["quats"], scales=torch.exp(splats["scales"]),
        opacities=torch.sigmoid(splats["opacities"]), colors=splat_colors(splats),
        viewmats=viewmats, Ks=Ks, width=width, height=height, sh_degree=sh_degree,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, packed=False,
        render_mode="RGB+ED", rasterize_mode=rasterize_mode, absgrad=absgrad,
    )
    return renders[..., :3], alphas, renders[..., 3:4], info
