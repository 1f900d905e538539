"""``rfds-gsplat-renderer``: threestudio's renderer contract on ``gsplat.rasterization``
(docs/gaussians.md §3).

Takes threestudio's camera batch (``c2w`` [B,4,4] OpenGL camera-to-world, ``fovy`` [B] in
radians, ``height``, ``width``, ``rays_d`` for the background) and returns what its systems
consume: ``comp_rgb`` [B,H,W,3] (splats over the background module's colour), ``comp_rgb_fg``
(premultiplied splat colour), ``comp_rgb_bg``, ``opacity`` [B,H,W,1], ``depth`` [B,H,W,1] (expected
depth along the camera axis) and ``gsplat_info`` (for the densification strategies)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from torch import Tensor

from ...checks import check_choice, check_positive
from ...splats.cameras import intrinsics_from_fovy, viewmats_from_c2w
from ...splats.render import RASTERIZE_MODES, rasterize
from ..compat import require_threestudio
from ..config_keys import KnownKeys

require_threestudio()
from threestudio.models.renderers.base import Rasterizer  # noqa: E402


class GsplatRenderer(KnownKeys, Rasterizer):
    registered_name = "rfds-gsplat-renderer"

    @dataclass
    class Config(Rasterizer.Config):
        near_plane: float = 0.01
        far_plane: float = 100.0
        rasterize_mode: str = "classic"  # classic | antialiased (gsplat's Mip-Splatting compensation)
        eps2d: float = 0.3  # added to the 2D covariance (pixels²), gsplat's default

    cfg: Config

    def configure(self, *args, **kwargs) -> None:
        super().configure(*args, **kwargs)
        check_choice("renderer.rasterize_mode", self.cfg.rasterize_mode, RASTERIZE_MODES)
        check_positive("renderer.near_plane", self.cfg.near_plane)
        if not self.cfg.far_plane > self.cfg.near_plane:
            raise ValueError(f"renderer.far_plane must exceed near_plane {self.cfg.near_plane}, "
                             f"got {self.cfg.far_plane!r}")

    def forward(self, c2w: Tensor, fovy: Tensor, height: int, width: int, rays_d: Tensor,
                absgrad: bool = False, **kwargs: Any) -> Dict[str, Any]:
        geometry = self.geometry
        rgb, alpha, depth, info = rasterize(
            geometry.tensors(), viewmats_from_c2w(c2w), intrinsics_from_fovy(fovy, width, height), width, height,
            sh_degree=geometry.sh_degree, near_plane=self.cfg.near_plane, far_plane=self.cfg.far_plane,
            rasterize_mode=self.cfg.rasterize_mode, eps2d=self.cfg.eps2d, absgrad=absgrad)
        bg = self.background(dirs=rays_d)
        return {"comp_rgb": rgb + (1 - alpha) * bg, "comp_rgb_fg": rgb, "comp_rgb_bg": bg, "opacity": alpha,
                "depth": depth, "gsplat_info": info}


RENDERERS = {GsplatRenderer.registered_name: GsplatRenderer}
