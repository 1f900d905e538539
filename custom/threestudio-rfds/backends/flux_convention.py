"""FLUX.1's conventions as pure functions (docs/math.md §2.4): the time shift FluxPipeline computes
(static for [schnell], resolution-dependent for [dev]), its sampling grid, the 2×2 latent packing with
image/text position ids, and the number each guidance mode feeds to [dev]'s guidance embedding."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import flow
from ..checks import check_choice, check_number

GUIDANCE_MODES = ("distilled", "cfg", "distilled+cfg")
DEFAULT_DISTILLED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default
UNSUPPORTED_SCHEDULER_OPTIONS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                 "invert_sigmas", "stochastic_sampling")


# ---------------------------------------------------------------- time shift (§2.4)
def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """μ = base_shift + (max_shift − base_shift)·(n − base_seq_len)/(max_seq_len − base_seq_len), linear in
    the image token count n (FluxPipeline's ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@dataclass(frozen=True)
class TimeShift:
    """The scheduler's shift: a fixed s, or (``dynamic``) s = e^μ with μ = :func:`calculate_shift` of the
    image token count (``use_dynamic_shifting``; the scheduler's σ = e^μ/(e^μ + 1/u − 1) is
    σ = s·u/(1 + (s − 1)·u) with s = e^μ)."""

    shift: float = 1.0
    dynamic: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "TimeShift":
        bad = [k for k in UNSUPPORTED_SCHEDULER_OPTIONS if config.get(k)]
        if config.get("time_shift_type", "exponential") != "exponential":
            bad.append(f"time_shift_type={config['time_shift_type']!r}")
        if bad:
            raise ValueError(f"scheduler options {bad} are not supported by the FLUX backend (FLUX.1's scheduler "
                             "uses none of them); pass a fixed shift= or a FLUX.1 scheduler config")
        return cls(float(config.get("shift", 1.0)), bool(config.get("use_dynamic_shifting", False)),
                   int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)),
                   float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)))

    def mu(self, image_seq_len: int) -> float:
        return calculate_shift(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def at(self, image_seq_len: int) -> float:
        """The shift s for ``image_seq_len`` image tokens."""
        return math.exp(self.mu(image_seq_len)) if self.dynamic else self.shift


def image_seq_len(height: int, width: int) -> int:
    """Image tokens of h×w latents after 2×2 packing."""
    return (height // 2) * (width // 2)


def flux_sigmas(num_inference_steps: int, time_shift: TimeShift, height: int, width: int) -> Tensor:
    """Noise levels [n + 1] of FluxPipeline's schedule for h×w latents, in the scheduler's arithmetic:
    u = linspace(1, 1/n, n) (float32), σ = e^μ/(e^μ + (1/u − 1)) (dynamic) or s·u/(1 + (s − 1)·u), then 0."""
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    u = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
    if time_shift.dynamic:
        e = math.exp(time_shift.mu(image_seq_len(height, width)))
        sigmas = e / (e + (1 / u - 1) ** 1.0)
    else:
        s = time_shift.shift
        sigmas = s * u / (1 + (s - 1) * u)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


def flux_convention(shift: float) -> flow.FlowConvention:
    """FLUX.1 at one shift: timestep = t (the transformer scales by 1000 itself), predicts ε − x0."""
    return flow.FlowConvention("flux", velocity_sign=1.0, timestep_scale=1.0, shift=float(shift))


# ---------------------------------------------------------------- packing and position ids
def pack_latents(z: Tensor) -> Tensor:
    """[B, C, h, w] → [B, (h/2)(w/2), 4C]: 2×2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, (h/2)(w/2), 4C] → [B, C, h, w], the inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """[(h/2)(w/2), 3] position ids (0, row, col) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> Tensor:
    """[L, 3] zeros: every text token has position (0, 0, 0) (FluxPipeline.encode_prompt)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


# ---------------------------------------------------------------- guidance (§2.4)
def guidance_settings(mode: str, has_embedding: bool, distilled_guidance: Optional[float] = None
                      ) -> Optional[float]:
    """The number g fed to the guidance embedding for ``mode`` (None: the model has none):

        distilled, distilled+cfg:  g = distilled_guidance (3.5 when None); needs [dev]'s embedding
        cfg:                       g = 1 for [dev] (the distilled model's conditional prediction), none for [schnell]

    One-line errors: an unknown mode, a mode needing the embedding on [schnell], ``distilled_guidance``
    for [schnell] or with mode "cfg"."""
    check_choice("guidance_mode", mode, GUIDANCE_MODES)
    if distilled_guidance is not None:
        check_number("distilled_guidance", distilled_guidance, low=0.0)
    if not has_embedding:
        if distilled_guidance is not None:
            raise ValueError(f"distilled_guidance={distilled_guidance!r}: this FLUX model has no guidance embedding "
                             "(FLUX.1 [schnell], guidance_embeds false); it takes CFG only: guidance_mode 'cfg' "
                             "with guidance_scale, and no distilled_guidance")
        if mode != "cfg":
            raise ValueError(f"guidance_mode {mode!r} needs a guidance embedding, which this FLUX model lacks "
                             "(FLUX.1 [schnell]); use guidance_mode 'cfg'")
        return None
    if mode == "cfg":
        if distilled_guidance is not None:
            raise ValueError(f"distilled_guidance={distilled_guidance!r} is used by guidance_mode 'distilled' or "
                             "'distilled+cfg'; guidance_mode 'cfg' feeds g = 1 (drop distilled_guidance or change the mode)")
        return 1.0
    return DEFAULT_DISTILLED_GUIDANCE if distilled_guidance is None else float(distilled_guidance)


def cfg_scale(mode: str, guidance_scale: float) -> float:
    """The CFG scale w of the outer velocity: 1 for "distilled" (no negative pass), else ``guidance_scale``."""
    check_choice("guidance_mode", mode, GUIDANCE_MODES)
    return 1.0 if mode == "distilled" else float(guidance_scale)


__all__ = ["TimeShift", "calculate_shift", "image_seq_len", "flux_sigmas", "flux_convention", "pack_latents",
           "unpack_latents", "latent_image_ids", "text_ids", "guidance_settings", "cfg_scale", "GUIDANCE_MODES",
           "DEFAULT_DISTILLED_GUIDANCE"]
