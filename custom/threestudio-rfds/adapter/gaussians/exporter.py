"""``rfds-gaussian-exporter``: what threestudio's ``--export`` writes for a splat set
(docs/gaussians.md §4–5): the standard 3DGS PLY and, with ``mesh: true``, a vertex-coloured OBJ of
the level set ρ = ``mesh_threshold`` of the splats' density (marching cubes through threestudio's
``MarchingCubeCPUHelper``).  The system's ``save_splat_ply`` / ``save_vertex_color_obj`` write
them atomically."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from ...checks import check_int, check_positive
from ...splats.density import grid_points, splat_density
from ..compat import require_threestudio
from ..config_keys import KnownKeys

require_threestudio()
from threestudio.models.exporters.base import Exporter, ExporterOutput  # noqa: E402
from threestudio.models.isosurface import MarchingCubeCPUHelper  # noqa: E402


class GaussianExporter(KnownKeys, Exporter):
    registered_name = "rfds-gaussian-exporter"

    @dataclass
    class Config(Exporter.Config):
        ply: bool = True  # gaussians.ply (3DGS layout)
        mesh: bool = False  # mesh.obj from the density level set
        mesh_resolution: int = 128  # grid vertices per axis over [-radius, radius]³
        mesh_threshold: float = 0.5  # the density level ρ of the surface (ρ of one splat peaks at its opacity)

    cfg: Config

    def configure(self, *args, **kwargs) -> None:
        super().configure(*args, **kwargs)
        check_int("exporter.mesh_resolution", self.cfg.mesh_resolution, 2)
        check_positive("exporter.mesh_threshold", self.cfg.mesh_threshold)

    def __call__(self) -> List[ExporterOutput]:
        out = []
        if self.cfg.ply:
            out.append(ExporterOutput("gaussians.ply", "splat_ply", {"splats": self.geometry.tensors()}))
        if self.cfg.mesh:
            out.append(self.mesh())
        return out

    @torch.no_grad()
    def mesh(self) -> ExporterOutput:
        radius, res = self.geometry.cfg.radius, self.cfg.mesh_resolution
        splats = self.geometry.tensors()
        device = splats["means"].device
        density, _ = splat_density(grid_points(radius, res, device), splats)
        helper = MarchingCubeCPUHelper(res).to(device)
        mesh = helper(-(density - self.cfg.mesh_threshold)[:, None])  # threestudio's level: surface at 0
        if mesh.v_pos.shape[0] == 0:
            raise ValueError(f"the splats' density never reaches exporter.mesh_threshold "
                             f"{self.cfg.mesh_threshold} inside [-{radius}, {radius}]³ (max "
                             f"{float(density.max()):.3g}); lower mesh_threshold")
        v_pos = mesh.v_pos * 2 * radius - radius  # helper's [0, 1]³ → the grid's cube
        _, v_rgb = splat_density(v_pos, splats)
        return ExporterOutput("mesh.obj", "vertex_color_obj",
                              {"vertices": v_pos, "faces": mesh.t_pos_idx, "colors": v_rgb})


EXPORTERS = {GaussianExporter.registered_name: GaussianExporter}
