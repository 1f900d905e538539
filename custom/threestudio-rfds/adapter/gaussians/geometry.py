"""``rfds-gaussians``: a splat set as threestudio geometry (docs/gaussians.md §1).

The parameters live in one ``nn.ParameterDict`` (``geometry.splats.<name>``, gsplat's names), so
gsplat's strategies can replace them when they densify or prune.  Loading a state dict of another
size (a checkpoint after densification, ``system.weights``, ``--export``) first resizes them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ...checks import check_choice, check_int, check_positive, check_range
from ...splats.params import PARAM_NAMES, points_in_ball, splats_from_points
from ...splats.ply import read_point_cloud, read_splat_ply, sh_degree_of
from ..compat import require_threestudio
from ..config_keys import KnownKeys

require_threestudio()
from threestudio.models.geometry.base import BaseGeometry  # noqa: E402

INITS = ("sphere", "point-cloud", "splats")


class GaussianGeometry(KnownKeys, BaseGeometry):
    """Splats initialised in a ball, from a point cloud, or from a 3DGS PLY (``init``)."""

    registered_name = "rfds-gaussians"

    @dataclass
    class Config(BaseGeometry.Config):
        init: str = "sphere"  # sphere | point-cloud (.ply/.npy/.npz points) | splats (a 3DGS PLY)
        num_gaussians: int = 4096  # for init: sphere
        init_radius: float = 0.5  # ball radius for init: sphere
        init_path: Optional[str] = None  # the file for init: point-cloud / splats
        sh_degree: int = 0  # colour SH degree (0 = view-independent)
        init_opacity: float = 0.1
        init_scale: Optional[float] = None  # None: mean distance to the 3 nearest points
        radius: float = 1.0  # half-size of the scene cube (mesh export grid)

    cfg: Config

    def configure(self) -> None:
        super().configure()
        cfg = self.cfg
        check_choice("geometry.init", cfg.init, INITS)
        check_int("geometry.sh_degree", cfg.sh_degree)
        check_positive("geometry.radius", cfg.radius)
        if cfg.init != "sphere" and not cfg.init_path:
            raise ValueError(f"geometry.init {cfg.init!r} needs geometry.init_path (a file), got {cfg.init_path!r}")
        if cfg.init == "splats":
            splats = read_splat_ply(cfg.init_path)
            if sh_degree_of(splats) != cfg.sh_degree:
                raise ValueError(f"geometry.init_path {cfg.init_path!r} has SH degree {sh_degree_of(splats)}, "
                                 f"geometry.sh_degree is {cfg.sh_degree}; set them equal")
        else:
            if cfg.init == "point-cloud":
                xyz, rgb = read_point_cloud(cfg.init_path)
            else:
                check_range("geometry.init_radius", cfg.init_radius, 1e-6, cfg.radius)
                xyz, rgb = points_in_ball(cfg.num_gaussians, cfg.init_radius), None
            splats = splats_from_points(xyz, rgb, sh_degree=cfg.sh_degree, opacity=cfg.init_opacity,
                                        scale=cfg.init_scale)
        self.splats = nn.ParameterDict({k: nn.Parameter(splats[k].contiguous()) for k in PARAM_NAMES})

    @property
    def num_gaussians(self) -> int:
        return self.splats["means"].shape[0]

    @property
    def sh_degree(self) -> int:
        return self.cfg.sh_degree

    def tensors(self) -> Dict[str, Tensor]:
        """The splat set as {name: tensor} (what :mod:`threestudio_rfds.splats` functions take)."""
        return {k: self.splats[k] for k in PARAM_NAMES}

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        """Resize the parameters in place to the incoming ones (same ``Parameter`` objects, so an
        optimizer built on them stays valid), then load as usual."""
        for name in PARAM_NAMES:
            incoming = state_dict.get(f"{prefix}splats.{name}")
            param = self.splats[name]
            if incoming is not None and incoming.shape != param.shape:
                if incoming.shape[1:] != param.shape[1:]:
                    raise ValueError(f"checkpoint splats.{name} has shape {tuple(incoming.shape)}, this geometry "
                                     f"{tuple(param.shape)}: sh_degree differs (set geometry.sh_degree as trained)")
                with torch.no_grad():
                    param.data = torch.empty(incoming.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


GEOMETRIES = {GaussianGeometry.registered_name: GaussianGeometry}
