"""The paper's config layout runs unchanged: ``system_type: rf-system`` with ``stage: coarse``,
the ``RFDS*`` guidance and ``sd3-prompt-processor`` names and the paper's loss keys, loaded with
threestudio's ``load_config`` and built as a real system on the CPU (tiny models; the HashGrid /
nerfacc parts, CUDA-only, are swapped for threestudio's torch-only encoding and a solid
background — the layout under test is unchanged)."""
import os

import pytest
import torch

from ts_support import camera_batch, render_stand_in

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("workdir")]

# The paper's configs' layout (configs/rfds_sd3.yaml etc. of yangxiaofeng/rectified_flow_prior),
# written out here with the values a CPU test can run.
REFERENCE_LAYOUT = """
name: "rfds-sd3-3d"
tag: "${rmspace:${system.prompt_processor.prompt},_}"
exp_root_dir: "outputs"
seed: 0
data_type: "random-camera-datamodule"
data:
  batch_size: [1, 1]
  width: [32, 64]
  height: [32, 64]
  resolution_milestones: [5000]
  elevation_range: [-10, 45]
system_type: "rf-system"
system:
  stage: coarse
  visualize_samples: true
  geometry_type: "implicit-volume"
  geometry:
    radius: 1.0
    normal_type: null
    density_bias: "blob_magic3d"
    density_activation: softplus
    pos_encoding_config: {otype: ProgressiveBandFrequency, n_frequencies: 2}
    mlp_network_config: {otype: VanillaMLP, activation: ReLU, output_activation: none, n_neurons: 16, n_hidden_layers: 1}
  material_type: "no-material"
  material: {n_output_dims: 3, color_activation: sigmoid}
  background_type: "solid-color-background"
  renderer_type: "nerf-volume-renderer"
  renderer: {radius: 1.0, num_samples_per_ray: 16}
  prompt_processor_type: "sd3-prompt-processor"
  prompt_processor:
    pretrained_model_name_or_path: MODEL
    prompt: ???
    negative_prompt: "unrealistic, blurry, low quality, oversaturation."
    front_threshold: 30.
    back_threshold: 30.
  guidance_type: "GUIDANCE"
  guidance:
    pretrained_model_name_or_path: MODEL
    guidance_scale: 100
    min_step_percent: [5000, 0.3, 0.3, 5001]
    max_step_percent: [5000, 0.98, 0.98, 5001]
  loggers:
    wandb: {enable: false, project: "threestudio", name: None}
  loss:
    LOSS_KEY: 1
    lambda_orient: 0.
    lambda_sparsity: 0.1
    lambda_opaque: [5000, 0.1, 0.1, 5001]
    lambda_z_variance: 0.
  optimizer:
    name: AdamW
    args: {betas: [0.9, 0.99], eps: 1.e-15}
trainer:
  max_steps: 15000
"""


@pytest.mark.parametrize("guidance_type,loss_key", [("RFDS-sd3", "lambda_rfds"), ("RFDS-Rev-sd3", "lambda_rfds")])
def test_reference_layout_builds_an_rf_system(ts, tiny_sd3_path, tmp_path, guidance_type, loss_key):
    from threestudio.systems.prolificdreamer import ProlificDreamer
    from threestudio.utils.config import load_config

    from threestudio_rfds.adapter.system import ReferenceRFSystem

    path = tmp_path / "reference.yaml"
    path.write_text(REFERENCE_LAYOUT.replace("MODEL", tiny_sd3_path).replace("GUIDANCE", guidance_type)
                    .replace("LOSS_KEY", loss_key))
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
