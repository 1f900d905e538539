"""The paper's config layout (configs/rfds_sd3.yaml etc. of yangxiaofeng/rectified_flow_prior:
``system_type: rf-system`` with ``stage: coarse``, the ``RFDS*`` guidance names, the
``sd3-prompt-processor`` and the paper's loss keys), written out with values a CPU test can run
(torch-only encoding, solid background, 32²/64² renders)."""

LAYOUT = """
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


def reference_layout(model_path: str, guidance_type: str, loss_key: str) -> str:
    """The layout's YAML text with the model folder, guidance name and loss key filled in."""
    return LAYOUT.replace("MODEL", model_path).replace("GUIDANCE", guidance_type).replace("LOSS_KEY", loss_key)
