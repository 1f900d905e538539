"""The paper's config layout runs unchanged: ``system_type: rf-system`` with ``stage: coarse``,
the ``RFDS*`` guidance and ``sd3-prompt-processor`` names and the paper's loss keys, loaded with
threestudio's ``load_config`` and built as a real system on the CPU (tiny models; the HashGrid /
nerfacc parts, CUDA-only, are swapped for threestudio's torch-only encoding and a solid
background — the layout under test is unchanged)."""
import os

import pytest
import torch

from reference_layout import reference_layout
from ts_support import camera_batch, render_stand_in

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("workdir")]


@pytest.mark.parametrize("guidance_type,loss_key", [("RFDS-sd3", "lambda_rfds"), ("RFDS-Rev-sd3", "lambda_rfds")])
def test_reference_layout_builds_an_rf_system(ts, tiny_sd3_path, tmp_path, guidance_type, loss_key):
    from threestudio.systems.prolificdreamer import ProlificDreamer
    from threestudio.utils.config import load_config

    from threestudio_rfds.adapter.system import ReferenceRFSystem

    path = tmp_path / "reference.yaml"
    path.write_text(reference_layout(tiny_sd3_path, guidance_type, loss_key))
    cfg = load_config(str(path), cli_args=["system.prompt_processor.prompt=a cat", "system.prompt_processor.spawn=false",
                                           "system.prompt_processor.encode_dtype=fp32"], n_gpus=1)
    system_cls = ts.find(cfg.system_type)
    assert system_cls is ReferenceRFSystem and issubclass(system_cls, ProlificDreamer)
    assert system_cls.training_step is ProlificDreamer.training_step  # threestudio's losses and stages

    system = system_cls(cfg.system)  # the real system: geometry, renderer, guidance, prompt processor
    assert type(system.guidance).__name__.startswith("Reference")
    assert system.guidance.cfg.time_convention == "reference"  # the paper code's step-percent semantics

    # every loss the guidance returns has its lambda in the paper's loss block (training_step needs it)
    batch = camera_batch(ts, {"batch_size": 1, "width": 32, "height": 32, "elevation_range": [-10, 45]})
    out = system.guidance(torch.sigmoid(render_stand_in(batch)), system.prompt_utils, **batch)
    losses = [k for k in out if k.startswith("loss_")]
    assert losses and all(k.replace("loss_", "lambda_") in cfg.system.loss for k in losses)

    # visualize_samples: the flow model's own sample, saved by threestudio's saver (no LoRA panel)
    system.set_save_dir(str(tmp_path / "save"))
    batch["index"] = torch.tensor([3])
    system.save_sample_panel(batch)
    saved = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "save") for f in fs]
    assert [os.path.basename(f) for f in saved] == ["it0-3-sample.png"]
    import PIL.Image

    assert PIL.Image.open(saved[0]).size == (32, 32)
