"""threestudio guidance modules: RFDS and RFDS-Rev from SD3/SD3.5, FLUX.1 and InstaFlow.

Contract (threestudio's ``stable-diffusion-guidance``): ``guidance(rgb [B,H,W,C] in [0,1],
prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents=False, guidance_eval=False,
**batch)`` returns scalar tensors: ``loss_rfds`` (weighted by ``system.loss.lambda_rfds``),
``grad_norm``, ``t_min``/``t_max``/``t_mean`` (noise levels), ``num_nonfinite``,
``min_step``/``max_step`` (1000 × the current step percents) and, with ``guidance_eval``, the
``eval`` dict of ``BaseLift3DSystem.guidance_evaluation_save``.  The update itself is
:func:`threestudio_rfds.rfds.rfds` / :func:`~threestudio_rfds.rfds.rfds_rev` (docs/math.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import rfds as core
from ..backends import backend_class
from ..backends.instaflow import REFERENCE_DELTA
from ..checks import DeferredChecks, check_choice, check_guidance_scale, check_positive, check_range
from ..protocol import Cond, cfg_velocity, for_latents
from .compat import adapter_device, require_threestudio
from .evaluation import guidance_eval_images
from .perp_neg import PerpNegModel, perp_neg_cond

threestudio = require_threestudio()
from threestudio.utils.base import BaseModule  # noqa: E402
from threestudio.utils.misc import C  # noqa: E402

CFG_MODES = ("batched", "sequential")


def _slice(cond: Cond, sl: slice) -> Cond:
    return {k: v[sl] for k, v in cond.items()}


class RFDSGuidanceBase(BaseModule):
    """Shared by the four guidance types; subclasses name the backend and the algorithm."""

    backend_name: ClassVar[str] = ""
    algorithm: ClassVar[str] = "rfds"  # or "rfds-rev"
    loss_key: ClassVar[str] = "rfds"  # → loss_rfds, weighted by lambda_rfds
    cond_keys: ClassVar[Tuple[str, Optional[str]]] = ("", None)  # (sequence key, pooled key)
    prompt_processor: ClassVar[str] = ""  # the prompt processor whose embeddings this guidance takes

    @dataclass
    class Config(BaseModule.Config):
        pretrained_model_name_or_path: str = ""
        dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU; or fp16/bf16/fp32
        guidance_scale: Any = 100.0  # CFG scale w (diffusers' definition); schedules allowed
        min_step_percent: Any = 0.02  # noise-level range (time_convention "model"); schedules allowed
        max_step_percent: Any = 0.98
        grad_clip: Optional[Any] = None  # element-wise clamp of the RFDS gradient; schedules allowed
        nonfinite: str = "error"  # NaN/inf in the model output: error, or zero (replace by 0, log num_nonfinite)
        weighting: str = "none"  # none | sigmoid | sds (docs/math.md §3.2)
        # per-sample: each sample its own w, gradient 2w(v̂ − v)/(n·B); reference: the paper code's
        # mean(w) for every sample and 1/B of that gradient, for comparison runs (docs/math.md §3.4)
        batch_scaling: str = "per-sample"
        time_convention: str = "model"  # model | reference (the paper code's timestep use)
        cfg_mode: str = "batched"  # batched: one 2B call; sequential: two B calls (less memory)
        latent_rule: str = "native"  # native: encode at render size; resize: to latent_size first
        latent_size: Optional[List[int]] = None
        view_dependent_prompting: bool = True
        compile: Any = False  # torch.compile the flow model: true or "max-autotune-no-cudagraphs" (docs/performance.md)
        backend_options: Optional[Dict[str, Any]] = None  # other keyword arguments of the backend class
        local_files_only: Optional[bool] = None
        seed: Optional[int] = None  # seed of the guidance's own generator (t, ε, weights)
        max_items_eval: int = 4
        eval_num_steps: int = 20
        sample_num_steps: Optional[int] = None  # sample(): None = the backend's default (SD3 28, InstaFlow 1)
        sample_guidance_scale: Optional[float] = None  # sample(): None = the current guidance_scale

    cfg: Config

    # ------------------------------------------------------------------ set-up
    def backend_kwargs(self) -> Dict[str, Any]:
        c = self.cfg
        kw = dict(pretrained_model_name_or_path=c.pretrained_model_name_or_path, device=self.device, dtype=c.dtype,
                  time_convention=c.time_convention, latent_rule=c.latent_rule,
                  latent_size=tuple(c.latent_size) if c.latent_size is not None else None,
                  local_files_only=c.local_files_only)
        return kw

    def configure(self) -> None:
        self.device = adapter_device()
        c = self.cfg
        check_choice("weighting", c.weighting, core.WEIGHTINGS)
        check_choice("cfg_mode", c.cfg_mode, CFG_MODES)
        check_choice("nonfinite", c.nonfinite, core.NONFINITE)
        check_choice("batch_scaling", c.batch_scaling, core.BATCH_SCALINGS)
        check_choice("time_convention", c.time_convention, ("model", "reference"))
        self.rev_options()  # validates the RFDS-Rev options before the model is loaded
        if not c.pretrained_model_name_or_path:
            raise ValueError(f"{type(self).__name__}: set guidance.pretrained_model_name_or_path (hub id or folder)")
        cls = backend_class(self.backend_name)
        kw = {**self.backend_kwargs(), "compile": c.compile, **(dict(c.backend_options) if c.backend_options else {})}
        threestudio.info(f"Loading {self.backend_name} flow model {c.pretrained_model_name_or_path} on {self.device}")
        # a plain object, not a submodule: its weights stay out of threestudio's checkpoints
        self.backend = cls(**kw)
        self.generator = torch.Generator("cpu").manual_seed(c.seed) if c.seed is not None else None
        self.grad_clip_val: Optional[float] = None
        self.update_step(0, 0)
        threestudio.info(f"Loaded {type(self).__name__} ({self.algorithm}, {self.backend_name})")

    # ------------------------------------------------------------------ schedules
    def set_min_max_steps(self, min_step_percent: float = 0.02, max_step_percent: float = 0.98) -> None:
        check_range("min_step_percent", min_step_percent, 0.0, 1.0)
        check_range("max_step_percent", max_step_percent, 0.0, 1.0)
        if min_step_percent > max_step_percent:
            raise ValueError(f"min_step_percent ({min_step_percent}) must be <= max_step_percent ({max_step_percent})")
        self.min_step_percent, self.max_step_percent = float(min_step_percent), float(max_step_percent)
        self.min_step, self.max_step = int(1000 * self.min_step_percent), int(1000 * self.max_step_percent)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        c = self.cfg
        self.guidance_scale = float(C(c.guidance_scale, epoch, global_step))
        self.grad_clip_val = None if c.grad_clip is None else float(C(c.grad_clip, epoch, global_step))
        check_guidance_scale(self.guidance_scale)
        if self.grad_clip_val is not None:
            check_positive("grad_clip", self.grad_clip_val)
        self.set_min_max_steps(C(c.min_step_percent, epoch, global_step), C(c.max_step_percent, epoch, global_step))

    def cfg_scale(self) -> float:
        """The CFG scale of the current step (FLUX's guidance modes may drop CFG)."""
        return self.guidance_scale

    # ------------------------------------------------------------------ inputs
    def get_latents(self, rgb: Tensor, rgb_as_latents: bool = False, checks: Optional[DeferredChecks] = None) -> Tensor:
        """[B,H,W,C] render (or latents) → latents [B,c,h,w], differentiable; the render's value
        check is queued on ``checks`` (settled by the RFDS step), else made at once."""
        if rgb.ndim != 4:
            raise ValueError(f"rgb must be [B, H, W, C], got shape {tuple(rgb.shape)}")
        x = rgb.permute(0, 3, 1, 2).float()
        be = self.backend
        if rgb_as_latents:
            if x.shape[1] != be.latent_channels:
                raise ValueError(f"rgb_as_latents=True needs {be.latent_channels} latent channels for "
                                 f"{self.backend_name}, got {x.shape[1]} (shape {tuple(rgb.shape)})")
            if be.latent_rule == "resize":
                size = be.latent_shape(*x.shape[-2:])
                if tuple(x.shape[-2:]) != tuple(size):
                    x = F.interpolate(x, size, mode="bilinear", align_corners=False)
            return x.to(be.device)
        if x.shape[1] != 3:
            raise ValueError(f"rgb must have 3 channels (or pass rgb_as_latents=True), got shape {tuple(rgb.shape)}")
        return be.encode(x.to(be.device), generator=self.generator, checks=checks).float()  # seeded when seed is set

    def conditions(self, prompt_utils, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor,
                   perp_neg: Optional[bool] = None):
        """(cond, uncond, negatives [B,K,…] or None, perp-neg weights [B,K] or None).

        ``perp_neg`` defaults to the prompt processor's ``use_perp_neg``."""
        seq, pooled = self.cond_keys
        vd = self.cfg.view_dependent_prompting
        if pooled is not None and not getattr(prompt_utils, "has_pooled", False):
            raise ValueError(f"{type(self).__name__} needs pooled text embeddings: use "
                             f"prompt_processor_type {self.prompt_processor!r}, got {type(prompt_utils).__name__}")
        dev, b = self.backend.device, elevation.shape[0]
        if prompt_utils.use_perp_neg if perp_neg is None else perp_neg:
            if not vd:
                raise ValueError("use_perp_neg needs view_dependent_prompting=True")
            emb, weights = prompt_utils.get_text_embeddings_perp_neg(elevation, azimuth, camera_distances, vd)
            parts = {seq: emb.to(dev)}
            if pooled is not None:
                parts[pooled] = prompt_utils.get_pooled_embeddings_perp_neg(elevation, azimuth, camera_distances, vd)[0].to(dev)
            pos = {k: v[:b] for k, v in parts.items()}
            unc = {k: v[b:2 * b] for k, v in parts.items()}
            neg = {k: v[2 * b:].reshape(b, -1, *v.shape[1:]) for k, v in parts.items()}
            return pos, unc, neg, weights.to(dev, torch.float32)
        emb = prompt_utils.get_text_embeddings(elevation, azimuth, camera_distances, vd).to(dev)
        cond, unc = {seq: emb[:b]}, {seq: emb[b:]}
        if pooled is not None:
            p = prompt_utils.get_pooled_embeddings(elevation, azimuth, camera_distances, vd).to(dev)
            cond[pooled], unc[pooled] = p[:b], p[b:]
        return cond, unc, None, None

    # ------------------------------------------------------------------ RFDS step
    def rev_options(self) -> Dict[str, Any]:
        return {}

    def distill(self, x0: Tensor, cond: Cond, uncond: Cond, neg: Optional[Cond], weights: Optional[Tensor],
                checks: Optional[DeferredChecks] = None):
        """(RFDSOutput, velocity(x, t, samples) used for evaluation images).

        With Perp-Neg the outer step runs on :class:`PerpNegModel` (CFG inside, scale 1 outside);
        RFDS-Rev's iRFDS updates always use the backend with the positive prompt."""
        be, w = for_latents(self.backend, x0), self.cfg_scale()  # FLUX.1 [dev]: the shift of x0's size
        batched = self.cfg.cfg_mode == "batched"
        if neg is None:
            model, c, scale = be, cond, w
            velocity = lambda x, t, sl: cfg_velocity(be, x, t, _slice(cond, sl), _slice(uncond, sl), w,  # noqa: E731
                                                     batched=batched)
        else:
            model, c, scale = PerpNegModel(be, w, batched), perp_neg_cond(cond, uncond, neg, weights), 1.0
            velocity = lambda x, t, sl: model.velocity(x, t, _slice(c, sl))  # noqa: E731
        kw = dict(min_step_percent=self.min_step_percent, max_step_percent=self.max_step_percent,
                  weighting=self.cfg.weighting, grad_clip=self.grad_clip_val, generator=self.generator,
                  cfg_batched=batched, batch_scaling=self.cfg.batch_scaling, nonfinite=self.cfg.nonfinite,
                  checks=checks)
        if self.algorithm == "rfds-rev":
            out = core.rfds_rev(model, x0, c, uncond, scale, inner_model=be, inner_cond=cond, **self.rev_options(), **kw)
        else:
            out = core.rfds(model, x0, c, uncond, scale, **kw)
        return out, velocity

    def __call__(self, rgb: Tensor, prompt_utils, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor,
                 rgb_as_latents: bool = False, guidance_eval: bool = False, **kwargs) -> Dict[str, Any]:
        b = rgb.shape[0]
        for name, v in (("elevation", elevation), ("azimuth", azimuth), ("camera_distances", camera_distances)):
            if v.shape != (b,):
                raise ValueError(f"{name} must have shape [B] = [{b}] like rgb, got {tuple(v.shape)}")
        with torch.autocast(self.device.type, enabled=False):
            checks = DeferredChecks()  # the render's value check, settled with the step's own (one host sync)
            x0 = self.get_latents(rgb, rgb_as_latents, checks)
            cond, uncond, neg, weights = self.conditions(prompt_utils, elevation, azimuth, camera_distances)
            out, velocity = self.distill(x0, cond, uncond, neg, weights, checks)
        logs = out.logs()
        dev = out.loss.device
        guidance_out: Dict[str, Any] = {
            f"loss_{self.loss_key}": out.loss,
            **{k: v for k, v in logs.items() if k != "loss"},
            "min_step": torch.tensor(float(self.min_step), device=dev),
            "max_step": torch.tensor(float(self.max_step), device=dev),
        }
        if guidance_eval:
            bs = min(self.cfg.max_items_eval, b) if self.cfg.max_items_eval > 0 else b
            with torch.autocast(self.device.type, enabled=False):
                ev = guidance_eval_images(self.backend.decode, velocity, out.x_t, out.t, out.v_pred, bs,
                                          self.cfg.eval_num_steps)
            ev["texts"] = [f"n{n:.02f}\ne{e.item():.01f}\na{a.item():.01f}\nc{c.item():.02f}"
                           for n, e, a, c in zip(ev["noise_levels"], elevation, azimuth, camera_distances)]
            guidance_out["eval"] = ev
        return guidance_out

    @torch.no_grad()
    def sample(self, prompt_utils, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor, seed: int = 0,
               **kwargs) -> Tensor:
        """Images [B, H, W, 3] in [0, 1] of the flow model's own ODE sampler for the batch's view
        prompts (for systems' ``visualize_samples``); H, W from the batch's height/width under the
        latent rule (512 when absent)."""
        be = self.backend
        cond, uncond, _, _ = self.conditions(prompt_utils, elevation, azimuth, camera_distances, perp_neg=False)
        h, w = be.latent_shape(int(kwargs.get("height", 512)), int(kwargs.get("width", 512)))
        f = be.vae_scale_factor
        scale = self.cfg_scale() if self.cfg.sample_guidance_scale is None else self.cfg.sample_guidance_scale
        steps = {} if self.cfg.sample_num_steps is None else {"num_inference_steps": self.cfg.sample_num_steps}
        with torch.autocast(self.device.type, enabled=False):
            latents = be.sample(cond, uncond, scale, generator=torch.Generator("cpu").manual_seed(seed),
                                height=h * f, width=w * f, **steps)
            return be.decode(latents).float().permute(0, 2, 3, 1)


class _RevMixin:
    algorithm: ClassVar[str] = "rfds-rev"

    def rev_options(self) -> Dict[str, Any]:
        n, step = self.cfg.n_inner_steps, self.cfg.inner_step_size
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n_inner_steps must be an integer >= 0, got {n!r}")
        if step != "auto" and (not isinstance(step, (int, float)) or step <= 0):
            raise ValueError(f"inner_step_size must be 'auto' or a number > 0, got {step!r}")
        return {"n_inner": n, "inner_step": step if step == "auto" else float(step)}


# ---------------------------------------------------------------------- SD3 / SD3.5
class RFDSSD3Guidance(RFDSGuidanceBase):
    """RFDS from SD3/SD3.5 (16-channel latents, ``{"prompt_embeds", "pooled_prompt_embeds"}``)."""

    backend_name = "sd3"
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    prompt_processor = "rfds-sd3-prompt-processor"

    @dataclass
    class Config(RFDSGuidanceBase.Config):
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3-medium-diffusers"
        guidance_scale: Any = 100.0
        # the reference's step percents 0.3–0.98 over SD3's descending table = noise fractions
        # 0.02–0.70 before the shift (time_convention "model")
        min_step_percent: Any = 0.02
        max_step_percent: Any = 0.70
        weighting: str = "sigmoid"  # the reference RFDS-sd3 weights by sigmoid(N(0,1))
        latent_rule: str = "native"  # 256² renders → 32² latents, as the reference
        shift: Optional[float] = None  # None: the scheduler's (3.0)
        encode_mode: str = "sample"  # VAE posterior sample (reference) or mean

    cfg: Config

    def backend_kwargs(self) -> Dict[str, Any]:
        return {**super().backend_kwargs(), "shift": self.cfg.shift, "encode_mode": self.cfg.encode_mode}


class RFDSRevSD3Guidance(_RevMixin, RFDSSD3Guidance):
    """RFDS-Rev from SD3/SD3.5: ``n_inner_steps`` iRFDS updates of ε, then RFDS."""

    @dataclass
    class Config(RFDSSD3Guidance.Config):
        weighting: str = "none"  # the reference RFDS-Rev-sd3 draws sigmoid weights but never applies them
        n_inner_steps: int = 1
        inner_step_size: Any = "auto"  # η = 1 − t, the reference's 1 − σ

    cfg: Config


# ---------------------------------------------------------------------- FLUX.1
class RFDSFluxGuidance(RFDSGuidanceBase):
    """RFDS from FLUX.1 [dev] / [schnell] (16-channel latents packed 2×2, ``{"prompt_embeds" (T5),
    "pooled_prompt_embeds" (CLIP-L)}``).  ``guidance_mode`` (docs/math.md §2.4): "distilled" feeds
    ``distilled_guidance`` g to [dev]'s guidance embedding and takes no negative pass; "cfg" is true CFG
    at ``guidance_scale`` (g = 1 for [dev]; the only mode of [schnell]); "distilled+cfg" both.  Both
    numbers are schedulable."""

    backend_name = "flux"
    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    prompt_processor = "rfds-flux-prompt-processor"

    @dataclass
    class Config(RFDSGuidanceBase.Config):
        pretrained_model_name_or_path: str = "black-forest-labs/FLUX.1-schnell"
        guidance_mode: str = "cfg"  # distilled | cfg | distilled+cfg
        guidance_scale: Any = 100.0  # true-CFG scale w (modes cfg, distilled+cfg); schedules allowed
        distilled_guidance: Optional[Any] = None  # g of [dev]'s embedding (distilled modes; None = 3.5); schedules
        min_step_percent: Any = 0.02
        max_step_percent: Any = 0.98
        weighting: str = "none"
        latent_rule: str = "native"  # renders must be multiples of 16 px (VAE factor 8 × 2×2 packing)
        shift: Optional[float] = None  # None: the scheduler's ([dev]: resolution-dependent, [schnell]: 1)
        encode_mode: str = "sample"
        quantization: Optional[str] = None  # int8-weight-only | float8-weight-only (torchao) | nf4 (bitsandbytes)

    cfg: Config

    def backend_kwargs(self) -> Dict[str, Any]:
        c = self.cfg
        g = None if c.distilled_guidance is None else float(C(c.distilled_guidance, 0, 0))
        return {**super().backend_kwargs(), "shift": c.shift, "encode_mode": c.encode_mode,
                "quantization": c.quantization, "guidance_mode": c.guidance_mode, "distilled_guidance": g}

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        super().update_step(epoch, global_step, on_load_weights)
        g = self.cfg.distilled_guidance
        self.backend.set_distilled_guidance(None if g is None else float(C(g, epoch, global_step)))

    def cfg_scale(self) -> float:
        return self.backend.cfg_scale(self.guidance_scale)


class RFDSRevFluxGuidance(_RevMixin, RFDSFluxGuidance):
    """RFDS-Rev from FLUX.1: ``n_inner_steps`` iRFDS updates of ε (conditional velocity, the mode's g),
    then RFDS."""

    @dataclass
    class Config(RFDSFluxGuidance.Config):
        n_inner_steps: int = 1
        inner_step_size: Any = "auto"  # η = 1 − t

    cfg: Config


# ---------------------------------------------------------------------- InstaFlow
class RFDSInstaFlowGuidance(RFDSGuidanceBase):
    """RFDS from InstaFlow (4-channel SD1.5 latents, ``{"encoder_hidden_states"}``)."""

    backend_name = "instaflow"
    cond_keys = ("encoder_hidden_states", None)

    @dataclass
    class Config(RFDSGuidanceBase.Config):
        pretrained_model_name_or_path: str = "XCLIU/2_rectified_flow_from_sd_1_5"
        guidance_scale: Any = 50.0
        min_step_percent: Any = 0.02
        max_step_percent: Any = 0.98
        weighting: str = "none"
        latent_rule: str = "resize"  # renders resized to 512² → 64² latents, as the reference
        latent_size: Optional[List[int]] = (512, 512)
        # add W_finetuned − W_base to the UNet: the reference adds {base: stable-diffusion-v1-5 (it named the
        # since-removed runwayml repo), finetuned: Lykon/absolute-reality-1.81}; null = plain InstaFlow
        unet_delta: Optional[Dict[str, Any]] = None
        vae_path: Optional[str] = None
        # the merged UNet is cached on disk (true: $RFDS_CACHE_DIR or ~/.cache/threestudio_rfds), a folder, or false
        merge_cache: Any = True

    cfg: Config

    def backend_kwargs(self) -> Dict[str, Any]:
        kw = super().backend_kwargs()
        if kw["latent_size"] is None:
            kw.pop("latent_size")
        delta = None if self.cfg.unet_delta is None else dict(self.cfg.unet_delta)
        return {**kw, "unet_delta": delta, "vae_path": self.cfg.vae_path, "merge_cache": self.cfg.merge_cache}


class RFDSRevInstaFlowGuidance(_RevMixin, RFDSInstaFlowGuidance):
    """RFDS-Rev from InstaFlow."""

    @dataclass
    class Config(RFDSInstaFlowGuidance.Config):
        n_inner_steps: int = 1
        inner_step_size: Any = 1.0  # the reference's step size for InstaFlow

    cfg: Config


# ---------------------------------------------------------------------- reference-config aliases
# Batch size (docs/math.md §3.4): with batch_scaling "per-sample" (default) the RFDS gradient at batch B
# is B × the paper code's.  Under the paper's AdamW (eps 1e-15, scale-invariant) the step size is the
# same at every B, but RFDS weighs B × more against the other losses: the same run as the paper's with
# lambda_rfds × B (B = 1: identical; 2: × 2; 4: × 4), or, for plain SGD, an effective learning rate
# of B × lr on the RFDS term.  batch_scaling: reference reproduces the paper's scaling exactly.
class ReferenceRFDSInstaFlowGuidance(RFDSInstaFlowGuidance):
    """``RFDS`` of the paper's code: its step percents and timestep use (time_convention "reference")
    and its prior: InstaFlow + (Lykon/absolute-reality-1.81 − SD1.5) with that model's VAE (merged once
    and cached, ``merge_cache``); ``unet_delta: null, vae_path: null`` for plain InstaFlow."""

    @dataclass
    class Config(RFDSInstaFlowGuidance.Config):
        time_convention: str = "reference"
        unet_delta: Optional[Dict[str, Any]] = field(default_factory=lambda: dict(REFERENCE_DELTA))
        vae_path: Optional[str] = REFERENCE_DELTA["finetuned"]

    cfg: Config


class ReferenceRFDSRevInstaFlowGuidance(RFDSRevInstaFlowGuidance):
    """``RFDS-Rev`` of the paper's code (returns ``loss_rfds_rev`` as its configs expect), with the
    paper's prior as ``RFDS``."""

    loss_key = "rfds_rev"

    @dataclass
    class Config(RFDSRevInstaFlowGuidance.Config):
        time_convention: str = "reference"
        unet_delta: Optional[Dict[str, Any]] = field(default_factory=lambda: dict(REFERENCE_DELTA))
        vae_path: Optional[str] = REFERENCE_DELTA["finetuned"]

    cfg: Config


class ReferenceRFDSSD3Guidance(RFDSSD3Guidance):
    """``RFDS-sd3`` of the paper's code (step percents index the descending sigma table)."""

    @dataclass
    class Config(RFDSSD3Guidance.Config):
        time_convention: str = "reference"
        min_step_percent: Any = 0.02
        max_step_percent: Any = 0.98

    cfg: Config


class ReferenceRFDSRevSD3Guidance(RFDSRevSD3Guidance):
    """``RFDS-Rev-sd3`` of the paper's code."""

    @dataclass
    class Config(RFDSRevSD3Guidance.Config):
        time_convention: str = "reference"
        min_step_percent: Any = 0.02
        max_step_percent: Any = 0.98

    cfg: Config


GUIDANCES = {
    "rfds-sd3-guidance": RFDSSD3Guidance,
    "rfds-rev-sd3-guidance": RFDSRevSD3Guidance,
    "rfds-flux-guidance": RFDSFluxGuidance,
    "rfds-rev-flux-guidance": RFDSRevFluxGuidance,
    "rfds-instaflow-guidance": RFDSInstaFlowGuidance,
    "rfds-rev-instaflow-guidance": RFDSRevInstaFlowGuidance,
}
REFERENCE_ALIASES = {
    "RFDS": ReferenceRFDSInstaFlowGuidance,
    "RFDS-Rev": ReferenceRFDSRevInstaFlowGuidance,
    "RFDS-sd3": ReferenceRFDSSD3Guidance,
    "RFDS-Rev-sd3": ReferenceRFDSRevSD3Guidance,
}
