"""``rfds-gaussian-system``: text-to-3D Gaussian splats with any of our guidances
(docs/gaussians.md §6).

Each step renders the batch's views with ``rfds-gsplat-renderer``, takes the guidance's
``loss_*`` (weighted by ``system.loss.lambda_*``, as ``dreamfusion-system`` does) plus the optional
regularisers, steps one optimizer whose parameter groups are the splat parameters (each alone, so
gsplat's strategies can resize it with its Adam state), and then lets gsplat's
``DefaultStrategy`` or ``MCMCStrategy`` densify and prune.  Checkpoints hold the splats (any
count), the optimizer and the strategy's running state; training ends by writing the 3DGS PLY."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ...checks import check_positive
from ...splats.obj import write_obj
from ...splats.ply import write_splat_ply
from ..compat import require_threestudio
from ..config_keys import KnownKeys
from .strategy import check_splat_groups, initial_state, make_strategy, post_backward, splat_group_views, state_to

threestudio = require_threestudio()
from threestudio.systems.base import BaseLift3DSystem  # noqa: E402
from threestudio.systems.utils import parse_optimizer  # noqa: E402
from threestudio.utils.config import config_to_primitive  # noqa: E402

CKPT_KEY = "rfds_gaussians"


def default_optimizer() -> Dict[str, Any]:
    """gsplat's simple_trainer learning rates (scene scale 1), one group per splat parameter."""
    lrs = {"means": 1.6e-4, "scales": 5e-3, "quats": 1e-3, "opacities": 5e-2, "sh0": 2.5e-3, "shN": 2.5e-3 / 20}
    return {"name": "Adam", "args": {"eps": 1e-15},
            "params": {f"geometry.splats.{k}": {"lr": v} for k, v in lrs.items()}}


class GaussianSystem(KnownKeys, BaseLift3DSystem):
    registered_name = "rfds-gaussian-system"

    @dataclass
    class Config(BaseLift3DSystem.Config):
        geometry_type: str = "rfds-gaussians"
        renderer_type: str = "rfds-gsplat-renderer"
        material_type: str = "no-material"  # unused: splats carry their colour
        background_type: str = "solid-color-background"
        exporter_type: str = "rfds-gaussian-exporter"
        strategy_type: str = "default"  # gsplat's DefaultStrategy | mcmc: MCMCStrategy
        strategy: dict = field(default_factory=dict)  # {default: {DefaultStrategy options}, mcmc: {MCMCStrategy options}}
        scene_scale: float = 1.0  # DefaultStrategy's size thresholds are relative to it
        export_ply_at_end: bool = True  # it<step>-export/gaussians.ply when training ends
        optimizer: dict = field(default_factory=default_optimizer)

    cfg: Config

    def configure(self) -> None:
        check_positive("system.scene_scale", self.cfg.scene_scale)
        self.strategy = make_strategy(self.cfg.strategy_type, self.cfg.strategy)  # before any model loads
        super().configure()
        self.automatic_optimization = False  # gsplat resizes parameters between steps
        self.strategy_state = initial_state(self.strategy, self.cfg.scene_scale)
        self._lr_schedules: Dict[str, Any] = {}

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return self.renderer(**batch, absgrad=bool(getattr(self.strategy, "absgrad", False)))

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = config_to_primitive(self.cfg.optimizer)
        for name, group in cfg.get("params", {}).items():  # lr schedules: threestudio's C() per group
            if isinstance(group.get("lr"), list):
                self._lr_schedules[name] = OmegaConf.create(group["lr"])  # C() takes config lists
                group["lr"] = self.C(self._lr_schedules[name])
        optimizer = parse_optimizer(OmegaConf.create(cfg), self)
        check_splat_groups(optimizer, self.geometry.tensors())
        self.strategy.check_sanity(self.geometry.splats, splat_group_views(optimizer))
        if self.cfg.scheduler is not None:
            from threestudio.systems.utils import parse_scheduler

            return {"optimizer": optimizer, "lr_scheduler": parse_scheduler(self.cfg.scheduler, optimizer)}
        return optimizer

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.prompt_processor = threestudio.find(self.cfg.prompt_processor_type)(self.cfg.prompt_processor)
        self.guidance = threestudio.find(self.cfg.guidance_type)(self.cfg.guidance)
        if self.cfg.export_ply_at_end:
            self.export_dir(self.trainer.max_steps)

    def on_train_start(self) -> None:
        """The running state on the splats' device (a checkpoint holds it on the CPU)."""
        self.strategy_state = state_to(self.strategy_state, self.geometry.splats["means"].device)

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        step = self.true_global_step
        opt = self.optimizers()
        optimizer = opt.optimizer
        for group in optimizer.param_groups:
            if group.get("name") in self._lr_schedules:
                group["lr"] = self.C(self._lr_schedules[group["name"]])
        views = splat_group_views(optimizer)
        out = self(batch)
        info = out["gsplat_info"]
        self.strategy.step_pre_backward(self.geometry.splats, views, self.strategy_state, step, info)
        loss = self.loss(out, self.guidance(out["comp_rgb"], self.prompt_processor(), **batch, rgb_as_latents=False))
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        post_backward(self.strategy, self.geometry.splats, views, self.strategy_state, step, info)
        self.log("train/num_gaussians", float(self.geometry.num_gaussians))
        return {"loss": loss.detach()}

    def loss(self, out: Dict[str, Any], guidance_out: Dict[str, Any]) -> torch.Tensor:
        """Σ λ·loss over the guidance's ``loss_*`` and the regularisers named in ``system.loss``."""
        total = 0.0
        for name, value in guidance_out.items():
            if not (isinstance(value, torch.Tensor) and value.numel() > 1):
                self.log(f"train/{name}", value)
            if name.startswith("loss_"):
                key = name.replace("loss_", "lambda_")
                if key not in self.cfg.loss:
                    raise ValueError(f"the guidance returns {name}; set system.loss.{key} (its weight)")
                total = total + value * self.C(self.cfg.loss[key])
        splats, opacity = self.geometry.splats, out["opacity"]
        terms = {
            "lambda_sparsity": lambda: (opacity ** 2 + 0.01).sqrt().mean(),
            "lambda_opaque": lambda: F.binary_cross_entropy(opacity.clamp(1e-3, 1 - 1e-3),
                                                            opacity.clamp(1e-3, 1 - 1e-3)),
            "lambda_opacity": lambda: torch.sigmoid(splats["opacities"]).mean(),
            "lambda_scale": lambda: torch.exp(splats["scales"]).mean(),
        }
        for key, term in terms.items():
            if key in self.cfg.loss and self.C(self.cfg.loss[key]) != 0:
                value = term()
                self.log(f"train/{key.replace('lambda_', 'loss_')}", value)
                total = total + value * self.C(self.cfg.loss[key])
        return total

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {"strategy_type": self.cfg.strategy_type,
                                "strategy_state": state_to(self.strategy_state, torch.device("cpu")),
                                "num_gaussians": self.geometry.num_gaussians}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        saved = checkpoint.get(CKPT_KEY)
        if saved is not None and saved["strategy_type"] == self.cfg.strategy_type:
            self.strategy_state = saved["strategy_state"]

    # --- images, export -------------------------------------------------------------------------
    def _panels(self, out: Dict[str, Any]) -> list:
        depth = out["depth"][0, :, :, 0]
        hit = out["opacity"][0, :, :, 0] > 0.5
        lo, hi = (depth[hit].min(), depth[hit].max()) if hit.any() else (depth.min(), depth.max())
        return [{"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}},
                {"type": "grayscale", "img": out["opacity"][0, :, :, 0], "kwargs": {"cmap": None, "data_range": (0, 1)}},
                {"type": "grayscale", "img": ((depth - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1),
                 "kwargs": {"cmap": None, "data_range": (0, 1)}}]

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self.save_image_grid(f"it{self.true_global_step}-{batch['index'][0]}.png", self._panels(self(batch)),
                             name="validation_step", step=self.true_global_step)

    def on_validation_epoch_end(self) -> None:
        pass

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self.save_image_grid(f"it{self.true_global_step}-test/{batch['index'][0]}.png", self._panels(self(batch)),
                             name="test_step", step=self.true_global_step)

    def on_test_epoch_end(self) -> None:
        self.save_img_sequence(f"it{self.true_global_step}-test", f"it{self.true_global_step}-test", r"(\d+)\.png",
                               save_format="mp4", fps=30, name="test", step=self.true_global_step)

    def export_dir(self, step: int) -> str:
        """``save/it<step>-export``, checked before any work: it must be a folder (or absent) in a
        writable save folder."""
        path = os.path.join(self.get_save_dir(), f"it{step}-export")
        if os.path.lexists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"export folder {path!r} exists and is not a folder; move it away")
        existing = path
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        if not os.access(existing, os.W_OK):
            raise PermissionError(f"export folder {path!r} cannot be created: {existing!r} is not writable")
        return path

    def on_train_end(self) -> None:
        if self.cfg.export_ply_at_end:
            self.save_splat_ply(f"it{self.true_global_step}-export/gaussians.ply", self.geometry.tensors())

    def on_predict_start(self) -> None:
        self.export_dir(self.true_global_step)
        super().on_predict_start()

    def save_splat_ply(self, filename: str, splats: Dict[str, torch.Tensor]) -> str:
        return write_splat_ply(self.get_save_path(filename), splats)

    def save_vertex_color_obj(self, filename: str, vertices, faces, colors: Optional[torch.Tensor] = None) -> str:
        return write_obj(self.get_save_path(filename), vertices, faces, colors)


SYSTEMS = {GaussianSystem.registered_name: GaussianSystem}
