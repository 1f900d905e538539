"""FLUX.1 [dev] and [schnell] (rectified-flow MMDiT) as a :class:`~threestudio_rfds.protocol.LatentBackend`;
its conventions as pure functions are in :mod:`.flux_convention`.

Convention (docs/math.md §2.4): x_t = (1 − t)·x0 + t·ε with t = σ, the transformer predicts ε − x0 = v
(velocity_sign +1) and is fed ``timestep = t`` (it multiplies by 1000 itself).  Latents: 16 channels,
z = (E(x) − shift_factor)·scaling_factor, packed 2×2 into [B, h/2·w/2, 64] tokens with position ids
(0, row, col); text tokens have id (0, 0, 0).  The time shift σ = s·u/(1 + (s − 1)·u) is static for
[schnell] (s = 1) and resolution-dependent for [dev]: s = e^μ, μ linear in the image token count
(:class:`TimeShift`, as ``FluxPipeline`` computes it), so a [dev] backend has no single convention:
:meth:`FluxBackend.for_latents` returns the backend at one latent size.

Guidance (:func:`guidance_settings`): [dev] is guidance-distilled and takes a number g in its guidance
embedding; "true" CFG needs a second pass with the negative prompt.  [schnell] has no embedding: CFG only.
Only ``transformer``, ``vae`` and the scheduler config are loaded; prompts are encoded separately
(:mod:`threestudio_rfds.text.flux`).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import flow
from ..checks import DeferredChecks, check_choice, check_shape
from ..protocol import Cond, cfg_velocity, expand_cond
from .base import (COMPILE_MODES, JOINT_COND_KEYS, check_joint_cond, configure_vae, freeze, hub_kwargs,
                   load_component, maybe_compile, prepare_rgb, resolve_device, resolve_dtype, vae_input)
from .family import check_family
from .flux_convention import (GUIDANCE_MODES, TimeShift, cfg_scale, flux_convention, flux_sigmas, guidance_settings,
                              image_seq_len, latent_image_ids, pack_latents, text_ids, unpack_latents)
from .quantize import check_quantization, quantization_config

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
LATENT_CHANNELS = 16
ENCODE_MODES = ("sample", "mean")
COND_KEYS = JOINT_COND_KEYS
DEFAULT_STEPS = {True: 28, False: 4}  # sampling steps: [dev] (FluxPipeline's default), [schnell] (its model card)


# ---------------------------------------------------------------- loading checks
def resolve_flux_dtype(dtype, device: torch.device) -> torch.dtype:
    """:func:`.base.resolve_dtype`, but fp16 is refused: FLUX.1's activations overflow it."""
    dt = resolve_dtype(dtype, device)
    if dt == torch.float16:
        raise ValueError(f"dtype {dtype!r}: FLUX.1 overflows in fp16 (non-finite activations); use dtype 'bf16' "
                         "(or 'fp32', or 'auto': bf16 on CUDA)")
    return dt


def load_transformer_config(path: str, kw: dict) -> dict:
    """The transformer's config.json (no weights), after the folder-family check
    (:func:`.family.check_family`: a folder of another family is named in one line)."""
    from diffusers import FluxTransformer2DModel

    check_family("flux", path, kw.get("revision"), kw.get("local_files_only"))
    config = dict(load_component(FluxTransformer2DModel, path, "transformer", config_only=True, **kw))
    if config.get("_class_name") not in (None, "FluxTransformer2DModel"):
        raise ValueError(f"{path!r} is not a FLUX.1 model: its transformer is {config.get('_class_name')!r}")
    return config


def _check_options(compile, latent_rule, latent_size, encode_mode, time_convention) -> None:
    check_choice("compile", compile, COMPILE_MODES)
    check_choice("latent_rule", latent_rule, ("native", "resize"))
    check_choice("encode_mode", encode_mode, ENCODE_MODES)
    check_choice("time_convention", time_convention, ("model",))  # the paper has no FLUX code to reproduce
    if latent_rule == "resize" and latent_size is None:
        raise ValueError("latent_rule 'resize' needs latent_size=(height, width), e.g. (512, 512)")


# ---------------------------------------------------------------- the backend
@dataclass(frozen=True)
class FluxAtLatentSize:
    """A FLUX backend whose convention is fixed for one latent size (a [dev] model's shift depends on it).
    Velocity and every other attribute are the backend's; latents of another size are refused."""

    backend: "FluxBackend"
    convention: flow.FlowConvention
    size: Tuple[int, int]

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if tuple(x_t.shape[-2:]) != self.size:
            raise ValueError(f"x_t is {tuple(x_t.shape[-2:])}, but this view's time shift is for {self.size} latents "
                             "(call backend.for_latents(x) for each latent size)")
        return self.backend.velocity(x_t, t, cond)

    def __getattr__(self, name: str):
        if name == "backend":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)


class FluxBackend:
    """FLUX.1 transformer + VAE; ``velocity`` in the project's notation (v = ε − x0).

    Condition: ``{"prompt_embeds": [B, T, 4096], "pooled_prompt_embeds": [B, 768]}`` (widths from the
    transformer config), see :func:`threestudio_rfds.text.flux.encode_flux_prompts`.

    Args:
        pretrained_model_name_or_path: hub id or local diffusers folder of FLUX.1 [dev] or [schnell].
        device, dtype: "auto" → cuda/bf16 when available, else cpu/fp32; "bf16"/"fp32" (fp16 is refused).
        guidance_mode: "distilled", "cfg" or "distilled+cfg" (:func:`guidance_settings`); with
            ``distilled_guidance`` g (None: 3.5) it sets the number fed to [dev]'s guidance embedding.
        shift: a fixed time shift; None reads the scheduler config ([dev]: resolution-dependent).
        latent_rule, latent_size, encode_mode, compile, vae_channels_last, vae_checkpointing: as SD3Backend.
        quantization: None, "int8-weight-only", "float8-weight-only" (torchao) or "nf4" (bitsandbytes, CUDA):
            the transformer is loaded through diffusers' quantisation config; the VAE is not quantised.
    """

    latent_channels = LATENT_CHANNELS

    def __init__(
        self,
        pretrained_model_name_or_path: str = DEFAULT_MODEL,
        *,
        device: Union[str, torch.device] = "auto",
        dtype: Union[str, torch.dtype] = "auto",
        guidance_mode: str = "cfg",
        distilled_guidance: Optional[float] = None,
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
        quantization: Optional[str] = None,
    ):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        _check_options(compile, latent_rule, latent_size, encode_mode, time_convention)  # before any download
        check_choice("guidance_mode", guidance_mode, GUIDANCE_MODES)
        device = resolve_device(device)
        dtype = resolve_flux_dtype(dtype, device)
        check_quantization(quantization, device)
        kw = hub_kwargs(revision, local_files_only)
        path = pretrained_model_name_or_path
        config = load_transformer_config(path, kw)  # family and guidance checks: no weights yet
        guidance_settings(guidance_mode, bool(config.get("guidance_embeds")), distilled_guidance)
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, path, "scheduler", config_only=True, **kw)
        time_shift = TimeShift.from_scheduler_config(scheduler) if shift is None else TimeShift(float(shift))
        quant = {} if quantization is None else {"quantization_config": quantization_config(quantization, dtype)}
        transformer = load_component(FluxTransformer2DModel, path, "transformer", torch_dtype=dtype, **quant, **kw)
        vae = load_component(AutoencoderKL, path, "vae", torch_dtype=dtype, **kw)
        self._setup(transformer, vae, device, dtype, time_shift, guidance_mode, distilled_guidance, latent_rule,
                    latent_size, encode_mode, path, compile, vae_channels_last, vae_checkpointing, quantization)

    @classmethod
    def from_modules(
        cls,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        *,
        time_shift: Optional[TimeShift] = None,
        guidance_mode: str = "cfg",
        distilled_guidance: Optional[float] = None,
        latent_rule: str = "native",
        latent_size: Optional[Tuple[int, int]] = None,
        encode_mode: str = "sample",
        model_id: str = "modules",
        compile: Union[bool, str] = False,
        vae_channels_last: bool = False,
        vae_checkpointing: bool = False,
    ) -> "FluxBackend":
        """Wrap already-built modules (benchmarks, tests); device and dtype are the transformer's.
        ``time_shift`` None: FLUX.1 [dev]'s dynamic shift for a model with a guidance embedding, else
        [schnell]'s static s = 1."""
        _check_options(compile, latent_rule, latent_size, encode_mode, "model")
        guidance_settings(guidance_mode, bool(transformer.config.guidance_embeds), distilled_guidance)
        if time_shift is None:
            time_shift = TimeShift(3.0, True) if transformer.config.guidance_embeds else TimeShift(1.0)
        self = cls.__new__(cls)
        p = next(transformer.parameters())
        resolve_flux_dtype(p.dtype, p.device)  # fp16 refused here too
        self._setup(transformer, vae, p.device, p.dtype, time_shift, guidance_mode, distilled_guidance, latent_rule,
                    latent_size, encode_mode, model_id, compile, vae_channels_last, vae_checkpointing, None)
        return self

    def _setup(self, transformer, vae, device, dtype, time_shift, guidance_mode, distilled_guidance, latent_rule,
               latent_size, encode_mode, model_id, compile, vae_channels_last, vae_checkpointing, quantization) -> None:
        """What both constructors share: frozen modules, shift, guidance, codec constants, speed options."""
        channels = transformer.config.in_channels
        if channels != 4 * LATENT_CHANNELS or vae.config.latent_channels != LATENT_CHANNELS:
            raise ValueError(f"{model_id!r} is not a FLUX.1 model: transformer/VAE have {channels}/"
                             f"{vae.config.latent_channels} channels, FLUX.1 has {4 * LATENT_CHANNELS} (2×2 packed) / "
                             f"{LATENT_CHANNELS}")
        self.device, self.dtype, self.model_id = torch.device(device), dtype, model_id
        self.time_shift, self.quantization = time_shift, quantization
        self.has_guidance_embedding = bool(transformer.config.guidance_embeds)
        self.transformer, self.vae = freeze(transformer, self.device, dtype), freeze(vae, self.device, dtype)
        self.guidance_mode = guidance_mode
        self.set_distilled_guidance(distilled_guidance)
        self.default_steps = DEFAULT_STEPS[self.has_guidance_embedding]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.latent_rule, self.latent_size, self.encode_mode = latent_rule, latent_size, encode_mode
        self.vae_channels_last = bool(vae_channels_last)
        configure_vae(self.vae, channels_last=self.vae_channels_last, checkpointing=vae_checkpointing)
        maybe_compile(self.transformer, compile)

    # ------------------------------------------------------------------ guidance and conventions
    def set_distilled_guidance(self, distilled_guidance: Optional[float]) -> None:
        """Set g (a schedule's current value) for this backend's guidance mode (:func:`guidance_settings`)."""
        self.embedded_guidance = guidance_settings(self.guidance_mode, self.has_guidance_embedding, distilled_guidance)

    def cfg_scale(self, guidance_scale: float) -> float:
        """The CFG scale the algorithms should use for ``guidance_scale`` under this guidance mode."""
        return cfg_scale(self.guidance_mode, guidance_scale)

    def convention_for(self, height: int, width: int) -> flow.FlowConvention:
        """The convention for h×w latents (its shift from :class:`TimeShift`)."""
        return flux_convention(self.time_shift.at(image_seq_len(height, width)))

    @property
    def convention(self) -> flow.FlowConvention:
        if self.time_shift.dynamic:
            raise AttributeError(f"{self.model_id!r} shifts time by resolution (use_dynamic_shifting): its convention "
                                 "depends on the latent size; use backend.for_latents(x0) (protocol.for_latents)")
        return flux_convention(self.time_shift.shift)

    def for_latents(self, x: Tensor):
        """This backend with the convention of latents shaped like ``x`` (itself for a static shift)."""
        if not self.time_shift.dynamic:
            return self
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return FluxAtLatentSize(self, self.convention_for(h, w), (h, w))

    # ------------------------------------------------------------------ velocity
    def _check_latents(self, name: str, x: Tensor) -> None:
        check_shape(name, x, ndim=4, channels=LATENT_CHANNELS)
        h, w = x.shape[-2:]
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise ValueError(f"{name} spatial size {h}x{w} must be even (FLUX packs 2×2 latent patches); renders "
                             f"must be multiples of {2 * self.vae_scale_factor} px")

    def check_cond(self, cond: Cond, name: str = "cond") -> None:
        """The keys and widths the transformer needs (T5 sequence, CLIP-L pooled); one line naming
        ``name``, the key, the shape given and the shape needed."""
        check_joint_cond(cond, name, "FLUX", self.transformer.config)

    def _check_cond(self, cond: Cond, batch: int) -> Cond:
        self.check_cond(cond)
        return expand_cond({k: cond[k] for k in COND_KEYS}, batch)

    def _velocity(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: Optional[float]) -> Tensor:
        self._check_latents("x_t", x_t)
        b, _, h, w = x_t.shape
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B] = [{b}], got {tuple(t.shape)}")
        cond = self._check_cond(cond, b)
        dev, dt = self.device, self.dtype
        g = None if guidance is None else torch.full((b,), guidance, device=dev, dtype=torch.float32)
        out = self.transformer(
            hidden_states=pack_latents(x_t.to(dev, dt)),
            timestep=t.to(dev, torch.float32),  # flux_convention: timestep = t (×1000 inside the transformer)
            guidance=g,
            pooled_projections=cond["pooled_prompt_embeds"].to(dev, dt),
            encoder_hidden_states=cond["prompt_embeds"].to(dev, dt),
            txt_ids=text_ids(cond["prompt_embeds"].shape[1], dev, dt),
            img_ids=latent_image_ids(h, w, dev, dt),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)  # FLUX predicts ε − x0 = v

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v_t = unpack(transformer(pack(x_t), t, c, g)) with g the guidance mode's embedded guidance."""
        return self._velocity(x_t, t, cond, self.embedded_guidance)

    # ------------------------------------------------------------------ codec
    def latent_shape(self, height: int, width: int) -> Tuple[int, int]:
        """Latent (h, w) of a render of the given size under the latent rule."""
        if self.latent_rule == "resize":
            height, width = self.latent_size
        f = self.vae_scale_factor
        return height // f, width // f

    def encode(self, rgb: Tensor, generator: Optional[torch.Generator] = None,
               checks: Optional[DeferredChecks] = None) -> Tensor:
        """rgb [B,3,H,W] in [0,1] → z = (E(2·rgb − 1) − shift_factor)·scaling_factor, differentiable; the
        value check of rgb is queued on ``checks`` when given (else made at once)."""
        m = 2 * self.vae_scale_factor  # even latents for the 2×2 packing
        h, w = tuple(self.latent_size) if self.latent_rule == "resize" else tuple(rgb.shape[-2:])
        if h % m or w % m:
            raise ValueError(f"{'latent_size' if self.latent_rule == 'resize' else 'render size'} {h}x{w} is not a "
                             f"multiple of {m} (VAE factor {self.vae_scale_factor} × FLUX's 2×2 latent patches)")
        x = prepare_rgb(rgb, self.latent_rule, self.latent_size, m, checks)
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
        guidance_scale: float = 1.0,
        num_inference_steps: Optional[int] = None,
        *,
        distilled_guidance: Optional[float] = None,
        latents: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: Optional[int] = None,
    ) -> Tensor:
        """Euler ODE sampling from t = 1 to 0 on FluxPipeline's schedule (:func:`flux_sigmas`); returns
        latents [B, 16, h, w] (``FluxPipeline(..., output_type="latent")`` packed, unpacked here).

        ``guidance_scale`` is the true-CFG scale (the pipeline's ``true_cfg_scale``: a second pass with
        ``uncond``, sequential as the pipeline); ``distilled_guidance`` the number fed to [dev]'s guidance
        embedding (the pipeline's ``guidance_scale``; None: this backend's).  Steps default to 28 ([dev]) or
        4 ([schnell]); initial latents are drawn like the pipeline unless given."""
        from diffusers.utils.torch_utils import randn_tensor

        g = self.embedded_guidance
        if distilled_guidance is not None:
            g = guidance_settings("distilled", self.has_guidance_embedding, distilled_guidance)
        if latents is None:
            f = self.vae_scale_factor
            h, w = height or 128 * f, width or 128 * f  # FluxPipeline's default_sample_size 128: 1024 px at f = 8
            if h % (2 * f) or w % (2 * f):
                raise ValueError(f"height x width {h}x{w} must be multiples of {2 * f} (VAE factor {f} × 2×2 packing)")
            shape = (batch_size or int(cond["prompt_embeds"].shape[0]), LATENT_CHANNELS, h // f, w // f)
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=cond["prompt_embeds"].dtype)
        self._check_latents("latents", latents)
        h, w = latents.shape[-2:]
        model = SimpleNamespace(convention=self.convention_for(h, w), velocity=lambda x, t, c: self._velocity(x, t, c, g))
        if uncond is None:
            uncond, guidance_scale = cond, 1.0
        sigmas = flux_sigmas(num_inference_steps or self.default_steps, self.time_shift, h, w)
        velocity = lambda x, t: cfg_velocity(model, x, t, cond, uncond, guidance_scale, batched=False)  # noqa: E731
        return flow.euler_sample(velocity, latents.to(self.device), sigmas)


__all__ = ["FluxBackend", "FluxAtLatentSize", "load_transformer_config", "resolve_flux_dtype",
           "DEFAULT_MODEL", "LATENT_CHANNELS"]
