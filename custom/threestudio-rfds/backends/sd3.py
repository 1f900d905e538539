"""Stable Diffusion 3 / 3.5 (MMDiT rectified flow) as a :class:`~threestudio_rfds.protocol.LatentBackend`.

The transformer is fed ``timestep = 1000·t`` (t = σ, the noise level) and predicts ε − x0 = v_t
(flow.sd3_convention).  Latents: 16 channels, z = (E(x) − shift_factor)·scaling_factor.
Only ``transformer``, ``vae`` and the ``scheduler`` config are loaded; prompts are encoded
separately (:mod:`threestudio_rfds.text.sd3`), so the text encoders never share memory with
the transformer.  SD3-medium, SD3.5-medium and SD3.5-large load through this class.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import flow
from ..checks import DeferredChecks, check_choice, check_shape
from ..protocol import Cond, cfg_velocity, expand_cond
from .base import (COMPILE_MODES, JOINT_COND_KEYS, check_joint_cond, configure_vae, freeze, hub_kwargs,
                   latent_noise_shape, load_component, maybe_compile, prepare_rgb, resolve_device, resolve_dtype,
                   vae_input)
from .family import check_family

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
LATENT_CHANNELS = 16
ENCODE_MODES = ("sample", "mean")
COND_KEYS = JOINT_COND_KEYS


def sd3_sigmas(num_inference_steps: int, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """Noise levels [n + 1] of FlowMatchEulerDiscreteScheduler.set_timesteps (no dynamic shift).

    u_i = linspace(1, u_min, n) with u_min = shift(1/N) (the scheduler's σ_min, itself shifted),
    t_i = shift(u_i) = s·u/(1 + (s − 1)·u), then t_n = 0 is appended.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    u_min = float(flow.shift_time(torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps, shift))
    if num_inference_steps == 1:
        t = torch.ones(1)
    else:
        t = flow.time_grid(num_inference_steps - 1, shift, t_max=1.0, t_min=u_min)
    return torch.cat([t, torch.zeros(1)])


def _check_options(compile, latent_rule, latent_size, encode_mode) -> None:
    check_choice("compile", compile, COMPILE_MODES)
    check_choice("latent_rule", latent_rule, ("native", "resize"))
    check_choice("encode_mode", encode_mode, ENCODE_MODES)
    if latent_rule == "resize" and latent_size is None:
        raise ValueError("latent_rule 'resize' needs latent_size=(height, width), e.g. (512, 512)")


class SD3Backend:
    """SD3 transformer + VAE; ``velocity`` in the project's notation (v = ε − x0).

    Condition: ``{"prompt_embeds": [B, 77 + T, 4096], "pooled_prompt_embeds": [B, 2048]}``
    (widths from the transformer config), see :func:`threestudio_rfds.text.sd3.encode_sd3_prompts`.

    Args:
        pretrained_model_name_or_path: hub id or local diffusers folder.
        device, dtype: "auto" → cuda/bf16 when available, else cpu/fp32; "fp16"/"fp32"/"bf16".
        time_convention: "model" or "reference" (step percents index the descending sigma table,
            as the paper's code; flow.sd3_convention).
        shift: time shift for sampling t; None reads the scheduler config (3.0 for SD3/3.5).
        latent_rule: "native" encodes renders at their own size (multiple of the VAE factor,
            8 for SD3: 256² → 32²); "resize" resizes to ``latent_size`` (H, W) first.
        encode_mode: "sample" draws z from the VAE posterior (as the paper's code), "mean" uses its mean.
        compile: ``torch.compile`` the transformer in place (True or "max-autotune-no-cudagraphs";
            docs/performance.md gives the gain and the warm-up cost).
        vae_channels_last: channels-last VAE (off: no measured gain on an H100, docs/performance.md).
        vae_checkpointing: gradient checkpointing in the VAE encoder (memory-lean mode).
    """

    latent_channels = LATENT_CHANNELS

    def __init__(
        self,
        pretrained_model_name_or_path: str = DEFAULT_MODEL,
        *,
        device: Union[str, torch.device] = "auto",
        dtype: Union[str, torch.dtype] = "auto",
        time_convention: str = "model",
        shift: Optional[float] = None,
        latent_rule: str = "native",
        latent_size: Optional[Tuple[int, int]] = None,
        encode_mode: str = "sample",
        local_files_only: Optional[bool] = None,
        revision: Optional[str] = None,
        compile: Union[bool, str] = False,
        vae_channels_last: bool = False,
        vae_checkpointing: bool = False,
    ):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        _check_options(compile, latent_rule, latent_size, encode_mode)  # before any download
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        kw = hub_kwargs(revision, local_files_only)
        path = pretrained_model_name_or_path
        check_family("sd3", path, revision, local_files_only)
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, path, "scheduler", **kw)
        if scheduler.config.get("use_dynamic_shifting", False) and shift is None:
            raise ValueError(f"{path!r} uses resolution-dependent (dynamic) shifting; pass a fixed shift=")
        self._setup(
            load_component(SD3Transformer2DModel, path, "transformer", torch_dtype=dtype, **kw),
            load_component(AutoencoderKL, path, "vae", torch_dtype=dtype, **kw),
            device, dtype, float(scheduler.config.shift if shift is None else shift),
            int(scheduler.config.num_train_timesteps), time_convention, latent_rule, latent_size, encode_mode, path,
            compile, vae_channels_last, vae_checkpointing,
        )

    @classmethod
    def from_modules(
        cls,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        *,
        shift: float = 3.0,
        num_train_timesteps: int = 1000,
        time_convention: str = "model",
        latent_rule: str = "native",
        latent_size: Optional[Tuple[int, int]] = None,
        encode_mode: str = "sample",
        model_id: str = "modules",
        compile: Union[bool, str] = False,
        vae_channels_last: bool = False,
        vae_checkpointing: bool = False,
    ) -> "SD3Backend":
        """Wrap already-built modules (benchmarks, tests); device and dtype are the transformer's."""
        _check_options(compile, latent_rule, latent_size, encode_mode)
        self = cls.__new__(cls)
        p = next(transformer.parameters())
        self._setup(transformer, vae, p.device, p.dtype, float(shift), num_train_timesteps, time_convention,
                    latent_rule, latent_size, encode_mode, model_id, compile, vae_channels_last, vae_checkpointing)
        return self

    def _setup(self, transformer, vae, device, dtype, shift, num_train_timesteps, time_convention, latent_rule,
               latent_size, encode_mode, model_id, compile, vae_channels_last, vae_checkpointing) -> None:
        """What both constructors share: frozen modules, conventions, codec constants, speed options."""
        channels = transformer.config.in_channels
        if channels != LATENT_CHANNELS or vae.config.latent_channels != LATENT_CHANNELS:
            raise ValueError(f"{model_id!r} is not an SD3 model: transformer/VAE have {channels}/"
                             f"{vae.config.latent_channels} latent channels, SD3 has {LATENT_CHANNELS}")
        self.device, self.dtype, self.model_id = torch.device(device), dtype, model_id
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        self.convention = flow.sd3_convention(shift, time_convention)
        self.transformer, self.vae = freeze(transformer, self.device, dtype), freeze(vae, self.device, dtype)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.latent_rule, self.latent_size, self.encode_mode = latent_rule, latent_size, encode_mode
        self.vae_channels_last = bool(vae_channels_last)
        configure_vae(self.vae, channels_last=self.vae_channels_last, checkpointing=vae_checkpointing)
        maybe_compile(self.transformer, compile)

    # ------------------------------------------------------------------ velocity
    def _check_latents(self, name: str, x: Tensor) -> None:
        check_shape(name, x, ndim=4, channels=LATENT_CHANNELS)
        p, m = self.transformer.config.patch_size, self.transformer.config.pos_embed_max_size
        h, w = x.shape[-2:]
        if h % p or w % p or h > p * m or w > p * m:
            raise ValueError(f"{name} spatial size {h}x{w} must be a multiple of the patch size {p} and at most "
                             f"{p * m} (latents of renders up to {p * m * self.vae_scale_factor} px)")

    def check_cond(self, cond: Cond, name: str = "cond") -> None:
        """The keys and widths the transformer needs; one line naming ``name``, the key, the shape
        given and the shape needed (called by ``cfg_velocity`` for cond and uncond)."""
        check_joint_cond(cond, name, "SD3", self.transformer.config)

    def _check_cond(self, cond: Cond, batch: int) -> Cond:
        self.check_cond(cond)
        return expand_cond({k: cond[k] for k in COND_KEYS}, batch)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v_t = transformer(x_t, 1000·t, c) (SD3 predicts ε − x0), in x_t's dtype."""
        self._check_latents("x_t", x_t)
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape [B] = [{x_t.shape[0]}], got {tuple(t.shape)}")
        cond = self._check_cond(cond, x_t.shape[0])
        out = self.transformer(
            hidden_states=x_t.to(self.device, self.dtype),
            timestep=self.convention.model_timestep(t.to(self.device, torch.float32)),
            encoder_hidden_states=cond["prompt_embeds"].to(self.device, self.dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(self.device, self.dtype),
            return_dict=False,
        )[0]
        return self.convention.to_velocity(out).to(x_t.dtype)

    # ------------------------------------------------------------------ codec
    def latent_shape(self, height: int, width: int) -> Tuple[int, int]:
        """Latent (h, w) of a render of the given size under the latent rule."""
        if self.latent_rule == "resize":
            height, width = self.latent_size
        f = self.vae_scale_factor
        return height // f, width // f

    def encode(self, rgb: Tensor, generator: Optional[torch.Generator] = None,
               checks: Optional[DeferredChecks] = None) -> Tensor:
        """rgb [B,3,H,W] in [0,1] → z = (E(2·rgb − 1) − shift_factor)·scaling_factor, differentiable.

        E draws from the VAE posterior (``encode_mode="sample"``, with ``generator``) or takes its mean.
        NaN or values beyond [0, 1] ± RGB_TOLERANCE are an error (base.check_rgb), queued on
        ``checks`` for the step's one host sync, else checked at once."""
        x = prepare_rgb(rgb, self.latent_rule, self.latent_size, self.vae_scale_factor, checks)
        posterior = self.vae.encode(vae_input(x.to(self.device, self.dtype), self.vae_channels_last)).latent_dist
        z = posterior.sample(generator) if self.encode_mode == "sample" else posterior.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(rgb.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """z → rgb [B,3,h·f,w·f] in [0,1]: D(z/scaling_factor + shift_factor)."""
        check_shape("latents", latents, ndim=4, channels=LATENT_CHANNELS)
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        img = self.vae.decode(z, return_dict=False)[0]
        return ((img + 1.0) / 2.0).clamp(0, 1).to(latents.dtype)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        uncond: Optional[Cond] = None,
        guidance_scale: float = 7.0,
        num_inference_steps: int = 28,
        *,
        latents: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: Optional[int] = None,
    ) -> Tensor:
        """Euler ODE sampling with CFG from t = 1 to 0 on the scheduler's shifted sigmas (sd3_sigmas);
        returns latents, as ``StableDiffusion3Pipeline(..., output_type="latent")``.

        Initial latents are drawn like the pipeline (diffusers ``randn_tensor`` in the condition's
        dtype) unless given.  ``guidance_scale == 1`` (or ``uncond=None``) uses the condition only.
        """
        from diffusers.utils.torch_utils import randn_tensor

        if latents is None:
            shape = latent_noise_shape(batch_size or int(cond["prompt_embeds"].shape[0]), LATENT_CHANNELS, height, width,
                                       self.transformer.config.sample_size, self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=cond["prompt_embeds"].dtype)
        self._check_latents("latents", latents)
        if uncond is None:
            uncond, guidance_scale = cond, 1.0
        sigmas = sd3_sigmas(num_inference_steps, self.shift, self.num_train_timesteps)
        velocity = lambda x, t: cfg_velocity(self, x, t, cond, uncond, guidance_scale)  # noqa: E731
        return flow.euler_sample(velocity, latents.to(self.device), sigmas)


__all__ = ["SD3Backend", "sd3_sigmas", "DEFAULT_MODEL", "LATENT_CHANNELS"]
