"""``rf-system``: the system name the paper's configs use, so they run unchanged.

The paper's ``rf-system`` is threestudio's ``prolificdreamer-system`` (stages coarse / geometry /
texture, the same losses and schedules) except for the sample panel: with ``visualize_samples``
it shows the flow model's own sample, where ProlificDreamer adds a LoRA sample that flow
guidances do not have.  Our configs use the stock ``dreamfusion-system`` instead.
"""
from __future__ import annotations

from typing import Any, Dict

from .compat import require_threestudio

require_threestudio()
from threestudio.systems.prolificdreamer import ProlificDreamer  # noqa: E402


class ReferenceRFSystem(ProlificDreamer):
    """threestudio's ProlificDreamer system; ``visualize_samples`` saves ``guidance.sample`` only."""

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        show = self.cfg.visualize_samples
        self.cfg.visualize_samples = False  # ProlificDreamer's panel calls guidance.sample_lora
        try:
            super().validation_step(batch, batch_idx)
        finally:
            self.cfg.visualize_samples = show
        if show:
            self.save_sample_panel(batch)

    def save_sample_panel(self, batch: Dict[str, Any]) -> None:
        """``it{step}-{index}-sample.png``: the guidance's ODE sample for the batch's first view."""
        image = self.guidance.sample(self.prompt_utils, **batch, seed=self.global_step)[0]
        self.save_image_grid(f"it{self.true_global_step}-{batch['index'][0]}-sample.png",
                             [{"type": "rgb", "img": image, "kwargs": {"data_format": "HWC"}}],
                             name="validation_step_samples", step=self.true_global_step)


SYSTEMS = {"rf-system": ReferenceRFSystem}
