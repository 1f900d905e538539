"""RFDS, iRFDS and RFDS-Rev in plain PyTorch (docs/math.md §3–§5).

Notation (flow.py): x_t = a(t)·x0 + b(t)·ε, v = ȧ·x0 + ḃ·ε = ε − x0, v̂ the model's
(CFG) velocity.  Every function takes a :class:`~threestudio_rfds.protocol.VelocityModel`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Union

import torch
from torch import Tensor

from . import flow
from .checks import (DeferredChecks, check_batch, check_choice, check_finite, check_guidance_scale, check_int,
                     check_not_meta, check_number, check_positive, check_range, check_time)
from .protocol import Cond, VelocityModel, cfg_velocity

Weighting = Literal["none", "sigmoid", "sds"]
WEIGHTINGS = ("none", "sigmoid", "sds")
StepSize = Union[float, Literal["auto"]]
NonFinite = Literal["error", "zero"]
NONFINITE = ("error", "zero")
NONFINITE_HINT = ("the model output or its CFG combination is not finite (fp16 overflow, broken weights, or a "
                  "guidance_scale too large for the dtype): use dtype bf16/fp32 or a smaller guidance_scale, or "
                  "nonfinite='zero' to replace such values by 0 and count them in num_nonfinite")


def rfds_weighting(kind: Weighting, t: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """w(t) [B] (§3.2).

    ``none``: 1 (InstaFlow reference).  ``sigmoid``: sigmoid(u), u ~ N(0, 1) drawn independently
    of t, as the SD3 reference (SD3 training's logit-normal density, applied as a weight).
    ``sds``: a(t)·b(t)²/(a(t)² + b(t)²), SDS's w = 1 − ᾱ at equal SNR expressed on v − v̂.
    """
    check_choice("weighting", kind, WEIGHTINGS)
    if kind == "none":
        return torch.ones_like(t)
    if kind == "sigmoid":
        gen_device = generator.device if generator is not None else t.device
        u = torch.randn(t.shape, generator=generator, device=gen_device, dtype=t.dtype).to(t.device)
        return torch.sigmoid(u)
    a, b = flow.alpha(t), flow.beta(t)
    return a * b**2 / (a**2 + b**2)


def replace_nonfinite(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x with NaN/±inf replaced by 0, the number replaced as a 0-d tensor — no host sync)."""
    bad = ~torch.isfinite(x)
    return torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x), bad.sum()


def nonfinite_policy(x: Tensor, nonfinite: NonFinite, checks: DeferredChecks, name: str,
                     hint: str = NONFINITE_HINT) -> tuple[Tensor, Tensor]:
    """(x, count of replaced values) under the non-finite policy, applied to each quantity a step
    forms (v̂, g, the loss value, iRFDS's ε'): ``"error"`` queues a check that raises
    :class:`~threestudio_rfds.checks.NonFiniteError` naming ``name``; ``"zero"`` replaces NaN/inf
    by 0 and counts them (no host sync either way)."""
    if nonfinite == "zero":
        return replace_nonfinite(x)
    checks.add(name, x, hint)
    return x, torch.zeros((), dtype=torch.long, device=x.device)


def overflow_hint(guidance_scale: float, dtype: torch.dtype) -> str:
    """Why a finite v̂ can still give a non-finite g or loss: w·(v_c − v_∅) and its square overflow."""
    return (f"it overflowed {dtype} (guidance_scale={guidance_scale:g} multiplies v_c − v_∅, and the loss squares "
            "it): use a smaller guidance_scale, or nonfinite='zero' to replace such values by 0 and count them "
            "in num_nonfinite")


def clip_grad(g: Tensor, grad_clip: Optional[float]) -> Tensor:
    """Element-wise clamp to [−c, c] (threestudio's ``grad_clip``); None disables it."""
    if grad_clip is None:
        return g
    check_positive("grad_clip", grad_clip)
    return g.clamp(-grad_clip, grad_clip)


class _NoGradientPath(torch.autograd.Function):
    """A 0 whose backward raises ``message``: the loss of a step whose input has no gradient."""

    @staticmethod
    def forward(ctx, anchor: Tensor, message: str) -> Tensor:
        ctx.message = message
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(ctx.message)


def reparameterised_loss(x: Tensor, g: Tensor, value: Optional[Tensor] = None, name: str = "x0") -> Tensor:
    """A loss with ∂L/∂x = 2·g/(n·B) exactly (n elements per sample, B samples) and the value
    ``value`` (default mean(g²), the value of mean_b mean_i (x − sg(x − g))²; for w = 1 the
    reference's mse(v, v̂)):

        L = 2·mean_b mean_i (x − sg(x))·sg(g) + sg(value)

    The first term is exactly 0, so a value that overflowed cannot make the loss NaN nor the
    gradient anything but g.  When ``x`` (named ``name``) does not require grad, ``L.backward()``
    raises one line saying so instead of torch's "does not have a grad_fn"."""
    if value is None:
        value = g.detach().pow(2).flatten(1).mean(1).mean()
    loss = 2 * ((x - x.detach()) * g.detach()).flatten(1).mean(1).mean() + value.detach()
    if torch.is_grad_enabled() and not x.requires_grad:
        anchor = torch.zeros((), device=loss.device, dtype=loss.dtype, requires_grad=True)
        loss = loss + _NoGradientPath.apply(anchor, (
            f"loss.backward(): {name} does not require grad, so the loss has no gradient to give it; pass {name} "
            f"with requires_grad=True (a leaf: {name}.requires_grad_()) or the differentiable output of a render "
            "or encode (RFDSOutput.grad holds g either way)"))
    return loss


def weighted_flow_matching_loss(w: Tensor, v_pred: Tensor, v: Tensor) -> Tensor:
    """mean_b w_b·mean_i (v̂ − v)²_b: the weighted flow-matching loss whose x0-gradient (through v)
    RFDS follows — the logged value of :func:`rfds_from_noise` (§3.1)."""
    mse = (v_pred - v).pow(2).flatten(1).mean(1)
    return (w.to(mse.dtype) * mse).mean()


BATCH_SCALINGS = ("per-sample", "reference")


def reference_batch_weights(w: Tensor) -> Tensor:
    """The paper code's weights [B]: every sample gets mean_b(w) (it multiplies its batch-mean loss
    by the [B] weights and averages, §3.2)."""
    return w.mean().expand(w.shape)


def safe_norm(x: Tensor) -> Tensor:
    """‖x‖ = m·‖x/m‖ with m = max|x|: finite whenever ‖x‖ is representable (a plain norm of
    entries ~1e30 overflows in its sum of squares)."""
    m = x.detach().abs().amax()
    return torch.where(m > 0, m * (x.detach() / torch.where(m > 0, m, 1.0)).norm(), m)


@dataclass
class RFDSOutput:
    """One distillation step: ``loss`` backpropagates to x0; the rest is detached."""

    loss: Tensor
    grad: Tensor  # g = w·(v̂ − v), clipped: x0 moves along −g
    t: Tensor  # [B] noise levels
    eps: Tensor  # the noise used (refined by iRFDS for RFDS-Rev)
    x_t: Tensor
    v_pred: Tensor  # v̂ (with CFG)
    weights: Tensor  # [B]
    num_nonfinite: Tensor  # 0-d count of NaN/inf replaced (nonfinite="zero") in v̂, g, the loss value (and ε')

    def logs(self) -> Dict[str, Tensor]:
        """Scalar tensors for logging (safe for ``self.log`` in Lightning)."""
        return {
            "loss": self.loss.detach(),
            "grad_norm": safe_norm(self.grad),
            "t_min": self.t.min(),
            "t_max": self.t.max(),
            "t_mean": self.t.mean(),
            "num_nonfinite": self.num_nonfinite.float(),
        }


def _check_inputs(x0: Tensor, t: Optional[Tensor], eps: Optional[Tensor], check_values: bool = True) -> None:
    """Shapes always; ``check_values`` also checks that x0 and ε are finite (a host sync)."""
    if not torch.is_tensor(x0) or x0.ndim < 2:
        raise ValueError(f"x0 must be a batched tensor of shape [B, ...], got {getattr(x0, 'shape', x0)!r}")
    for name, x in (("x0", x0), ("t", t), ("eps", eps)):
        check_not_meta(name, x)
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    if check_values:
        check_finite("x0", x0)
    if t is not None:
        check_time("t", t)
        if t.ndim != 1:
            raise ValueError(f"t must have shape [B], got {tuple(t.shape)}")
        check_batch(("x0", "t"), x0, t)
    if eps is not None:
        if not torch.is_tensor(eps) or eps.shape != x0.shape:
            raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(getattr(eps, 'shape', ()))}")
        if not eps.is_floating_point():
            raise ValueError(f"eps must be a floating-point tensor, got {eps.dtype}")
        if check_values:
            check_finite("eps", eps)


def _check_inputs_deferred(x0: Tensor, t: Optional[Tensor], eps: Optional[Tensor], cond: Optional[Cond] = None,
                           uncond: Optional[Cond] = None, checks: Optional[DeferredChecks] = None) -> DeferredChecks:
    """Shape checks now; the finiteness of x0 and of the prompt embeddings is tested without a
    host sync and raised by the returned checks (``checks``, with the caller's tests first, e.g.
    those of ``backend.encode(rgb, checks=…)``), which the step settles after queuing its model
    calls (on CUDA the VAE encode then overlaps with launching the denoiser)."""
    _check_inputs(x0, t, eps, check_values=False)
    if eps is not None:
        check_finite("eps", eps)
    checks = (DeferredChecks() if checks is None else checks).add("x0", x0)
    return checks.add_cond("cond", {} if cond is None else cond).add_cond("uncond", {} if uncond is None else uncond)


def _check_options(weighting: str, grad_clip: Optional[float], batch_scaling: str = "per-sample",
                   nonfinite: str = "error", guidance_scale: float = 1.0) -> None:
    """Fail before any model call on a bad option."""
    check_guidance_scale(guidance_scale)
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("batch_scaling", batch_scaling, BATCH_SCALINGS)
    check_choice("nonfinite", nonfinite, NONFINITE)
    if grad_clip is not None and not (isinstance(grad_clip, numbers.Real) and not isinstance(grad_clip, bool)
                                      and math.isfinite(grad_clip) and grad_clip > 0):
        raise ValueError(f"grad_clip must be > 0 or None (a finite number), got {grad_clip!r}")


def _draw(model: VelocityModel, x0: Tensor, t, eps, min_step_percent, max_step_percent, generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if t is None:
        check_range("min_step_percent", min_step_percent, 0.0, 1.0)
        check_range("max_step_percent", max_step_percent, 0.0, 1.0)
        if min_step_percent > max_step_percent:
            raise ValueError(f"min_step_percent ({min_step_percent}) must be <= max_step_percent ({max_step_percent})")
        t = model.convention.sample_time(
            x0.shape[0], min_step_percent, max_step_percent, device=x0.device, generator=generator
        )
    if eps is None:
        gen_device = generator.device if generator is not None else x0.device
        eps = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    return t.to(device=x0.device, dtype=torch.float32), eps


def rfds_from_noise(
    model: VelocityModel,
    x0: Tensor,
    t: Tensor,
    eps: Tensor,
    cond: Cond,
    uncond: Cond,
    guidance_scale: float,
    *,
    weighting: Weighting = "none",
    grad_clip: Optional[float] = None,
    cfg_batched: bool = True,
    generator: Optional[torch.Generator] = None,
    batch_scaling: str = "per-sample",
    nonfinite: NonFinite = "error",
    checks: Optional[DeferredChecks] = None,
) -> RFDSOutput:
    """RFDS for given (t, ε) (§3.1): g = w(t)·(v̂_cfg(x_t) − v(x0, ε)), up to −ȧ = 1.

    The loss's gradient is 2g/(n·B); its value is the weighted flow-matching loss
    mean_b w_b·mse_b (:func:`weighted_flow_matching_loss`, unclipped).  ``batch_scaling="reference"``
    reproduces the paper code's scaling: every sample weighted by mean_b(w), loss (value and
    gradient) divided by B once more (§3.4)."""
    check_choice("batch_scaling", batch_scaling, BATCH_SCALINGS)
    own_checks = checks is None  # else the caller settles the finiteness tests queued on ``checks``
    checks = DeferredChecks() if own_checks else checks
    with torch.no_grad():
        x0_ = x0.detach()
        x_t = flow.interpolate(x0_, eps, t)
        v_pred, n_v = nonfinite_policy(cfg_velocity(model, x_t, t, cond, uncond, guidance_scale, batched=cfg_batched),
                                       nonfinite, checks, "v̂ (the model's CFG velocity)")
        w = rfds_weighting(weighting, t, generator)
        if batch_scaling == "reference":
            w = reference_batch_weights(w)
        v = flow.velocity_target(x0_, eps)
        overflow = overflow_hint(guidance_scale, x0.dtype)
        g, n_g = nonfinite_policy(flow.append_dims(w, x0.ndim).to(x0.dtype) * (v_pred.to(x0.dtype) - v), nonfinite,
                                  checks, "g = w·(v̂ − v) (the RFDS gradient)", overflow)
        g = clip_grad(g, grad_clip)
        value, n_l = nonfinite_policy(weighted_flow_matching_loss(w, v_pred.to(x0.dtype), v), nonfinite, checks,
                                      "the RFDS loss value mean_b w_b·mse(v̂, v)", overflow)
    loss = reparameterised_loss(x0, g, value)
    n_bad = n_v + n_g + n_l
    if batch_scaling == "reference":
        loss = loss / x0.shape[0]
    if own_checks:
        checks()
    return RFDSOutput(loss, g, t, eps, x_t, v_pred, w, n_bad)


def rfds(
    model: VelocityModel,
    x0: Tensor,
    cond: Cond,
    uncond: Cond,
    guidance_scale: float,
    *,
    min_step_percent: float = 0.02,
    max_step_percent: float = 0.98,
    t: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    weighting: Weighting = "none",
    grad_clip: Optional[float] = None,
    cfg_batched: bool = True,
    generator: Optional[torch.Generator] = None,
    batch_scaling: str = "per-sample",
    nonfinite: NonFinite = "error",
    checks: Optional[DeferredChecks] = None,
) -> RFDSOutput:
    """Rectified-flow score distillation: draw t and ε, return the RFDS loss on x0 (§3).

    Non-finite x0 or prompt embeddings raise :class:`~threestudio_rfds.checks.NonFiniteError`,
    and so does a non-finite v̂, g or loss value (a model output or an overflow) unless
    ``nonfinite="zero"`` (replaced by 0 and counted in ``num_nonfinite``).  ``checks``: tests the
    caller queued (``backend.encode(rgb, checks=…)``), settled with the step's in one host sync."""
    _check_options(weighting, grad_clip, batch_scaling, nonfinite, guidance_scale)
    checks = _check_inputs_deferred(x0, t, eps, cond, uncond, checks)
    t, eps = _draw(model, x0, t, eps, min_step_percent, max_step_percent, generator)
    out = rfds_from_noise(model, x0, t, eps, cond, uncond, guidance_scale, weighting=weighting,
                          grad_clip=grad_clip, cfg_batched=cfg_batched, generator=generator,
                          batch_scaling=batch_scaling, nonfinite=nonfinite, checks=checks)
    checks()
    return out


# ---------------------------------------------------------------- iRFDS (§4)
def check_step_size(name: str, step_size: StepSize) -> None:
    if isinstance(step_size, str) and step_size == "auto":
        return
    try:
        check_positive(name, step_size)
    except ValueError:
        raise ValueError(f"{name} must be 'auto' or a number > 0, got {step_size!r}") from None


def inner_step_size(step_size: StepSize, t: Tensor) -> Tensor:
    """η [B]: a number, or ``"auto"`` = a(t) = 1 − t, for which one update gives ε̂ exactly."""
    check_step_size("step_size", step_size)
    if step_size == "auto":
        return flow.alpha(t)
    return torch.full_like(t, float(step_size))


@torch.no_grad()
def irfds_update(
    model: VelocityModel,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    cond: Cond,
    step_size: StepSize = "auto",
    guidance_scale: float = 1.0,
    uncond: Optional[Cond] = None,
    nonfinite: NonFinite = "error",
) -> Tensor:
    """One iRFDS step on the noise (§4.1): ε' = ε + η·ḃ·(v̂(x_t) − v(x0, ε)).

    With η = a(t) this is x_t + a(t)·v̂ = ε̂(x_t), one Euler step of the flow from t to 1.
    The reference SD3 update ε' = ε + (1 − σ)(v̂ + x0 − ε) is this with η = 1 − σ; the
    InstaFlow reference's ε' = x0 + v̂ is η = 1.
    """
    if t is None:
        raise ValueError("t must be a tensor of noise levels [B] in [0, 1], got None")
    _check_inputs(x0, t, eps)
    check_step_size("step_size", step_size)
    check_choice("nonfinite", nonfinite, NONFINITE)
    checks = DeferredChecks().add_cond("cond", cond).add_cond("uncond", {} if uncond is None else uncond)
    new = _irfds_step(model, x0, eps, t, cond, step_size, guidance_scale, uncond, nonfinite, checks)[0]
    checks()
    return new


def _guided_velocity(model, x_t, t, cond, uncond, guidance_scale) -> Tensor:
    """The conditional velocity, or with CFG when an ``uncond`` is given (iRFDS's optional guidance)."""
    if uncond is None:
        uncond, guidance_scale = cond, 1.0
    return cfg_velocity(model, x_t, t, cond, uncond, guidance_scale)


def _irfds_step(model, x0, eps, t, cond, step_size, guidance_scale, uncond, nonfinite: NonFinite,
                checks: DeferredChecks) -> tuple[Tensor, Tensor]:
    """(ε', the number of NaN/inf replaced in v̂ and ε'); the finiteness tests are queued on ``checks``."""
    x_t = flow.interpolate(x0, eps, t)
    v, n_v = nonfinite_policy(_guided_velocity(model, x_t, t, cond, uncond, guidance_scale).to(eps.dtype), nonfinite,
                              checks, "v̂ (the model's velocity in the iRFDS update)")
    eta = flow.append_dims(inner_step_size(step_size, t), eps.ndim).to(eps.dtype)
    beta_dot = flow.append_dims(flow.beta_dot(t), eps.ndim).to(eps.dtype)
    new, n_e = nonfinite_policy(eps + eta * beta_dot * (v - flow.velocity_target(x0, eps)), nonfinite, checks,
                                "ε' (the iRFDS update of the noise)", overflow_hint(guidance_scale, eps.dtype))
    return new, n_v + n_e


def noise_regulariser(eps: Tensor) -> Tensor:
    """R(ε) = mean(ε)² + (var(ε) − 1)², the reference's MeanVarianceLoss (§4.2)."""
    return eps.mean().pow(2) + (eps.var() - 1.0).pow(2)


IRFDS_SCHEDULES = ("model", "reference")
REFERENCE_SD3_IRFDS_STEPS = 15  # the paper's iRFDS_sd3: retrieve_timesteps(scheduler, 15)


def reference_irfds_time(
    convention: flow.FlowConvention,
    batch_size: int,
    min_step_percent: float,
    max_step_percent: float,
    *,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """The paper code's iRFDS time draw (§4.4): (noise level t [B], time τ [B] to evaluate v̂ at).

    SD3 (``iRFDS_sd3``): t uniform over the scheduler's 15-step sampling grid
    ``sd3_sigmas(15, shift)[:15]`` (1 down to shift(linspace(1, shift(1/1000), 15))_14 ≈ 0.0089);
    the step percents are ignored; τ = t.  InstaFlow (``iRFDS``): an integer k uniform in
    [1000·min, 1000·max], x_t at noise level t = 1 − k/1000 but the UNet fed timestep k, i.e. τ is the
    time whose timestep is k (1 − t under the model's convention, t under the "reference" one)."""
    if convention.name == "sd3":
        from .backends.sd3 import sd3_sigmas

        grid = sd3_sigmas(REFERENCE_SD3_IRFDS_STEPS, convention.shift)[:REFERENCE_SD3_IRFDS_STEPS]
        gen_device = generator.device if generator is not None else device
        i = torch.randint(0, grid.numel(), (batch_size,), generator=generator, device=gen_device)
        t = grid.to(i.device)[i].to(device)
        return t, t
    if convention.name == "instaflow":
        check_range("min_step_percent", min_step_percent, 0.0, 1.0)
        check_range("max_step_percent", max_step_percent, min_step_percent, 1.0)
        lo, hi = int(1000 * min_step_percent), int(1000 * max_step_percent)
        gen_device = generator.device if generator is not None else device
        k = torch.randint(lo, hi + 1, (batch_size,), generator=generator, device=gen_device).to(device)
        t = 1.0 - k.float() / 1000.0
        return t, (t if convention.reversed_timestep else 1.0 - t)
    raise ValueError(f"schedule 'reference' needs an 'sd3' or 'instaflow' convention, got {convention.name!r}")


def irfds_loss(
    model: VelocityModel,
    x0: Tensor,
    eps: Tensor,
    cond: Cond,
    *,
    uncond: Optional[Cond] = None,
    guidance_scale: float = 1.0,
    min_step_percent: float = 0.02,
    max_step_percent: float = 0.98,
    t: Optional[Tensor] = None,
    reg_weight: float = 1.0,
    generator: Optional[torch.Generator] = None,
    schedule: str = "model",
    nonfinite: NonFinite = "error",
) -> RFDSOutput:
    """iRFDS objective for a learnable noise ε at fixed x0 (§4.2).

    ∂L/∂ε ∝ −ḃ·(v̂(x_t) − v(x0, ε)) plus ``reg_weight``·∂R/∂ε; minimising it with any optimiser
    finds the noise that the flow carries to x0.  ``schedule``: "model" draws t from the step
    percents (§1.3); "reference" draws the paper code's times (:func:`reference_irfds_time`, §4.4).
    """
    _check_inputs(x0, t, eps)
    check_number("reg_weight", reg_weight, low=0.0)
    check_choice("nonfinite", nonfinite, NONFINITE)
    checks = DeferredChecks().add_cond("cond", cond).add_cond("uncond", {} if uncond is None else uncond)
    check_choice("schedule", schedule, IRFDS_SCHEDULES)
    tau = None
    if t is None and schedule == "reference":
        t, tau = reference_irfds_time(model.convention, x0.shape[0], min_step_percent, max_step_percent,
                                      device=x0.device, generator=generator)
    t, e = _draw(model, x0, t, eps.detach(), min_step_percent, max_step_percent, generator)
    tau = t if tau is None else tau.to(t)
    with torch.no_grad():
        x_t = flow.interpolate(x0, e, t)
        v_pred, n_v = nonfinite_policy(_guided_velocity(model, x_t, tau, cond, uncond, guidance_scale).to(e.dtype),
                                       nonfinite, checks, "v̂ (the model's velocity in the iRFDS loss)")
        overflow = overflow_hint(guidance_scale, e.dtype)
        g, n_g = nonfinite_policy(-flow.append_dims(flow.beta_dot(t), e.ndim).to(e.dtype) *
                                  (v_pred - flow.velocity_target(x0, e)), nonfinite, checks,
                                  "g = −ḃ·(v̂ − v) (the iRFDS gradient)", overflow)
        value, n_l = nonfinite_policy(g.pow(2).flatten(1).mean(1).mean(), nonfinite, checks,
                                      "the iRFDS loss value mean(g²)", overflow)
    checks()
    loss = reparameterised_loss(eps, g, value, name="eps") + reg_weight * noise_regulariser(eps)
    n_bad = n_v + n_g + n_l
    return RFDSOutput(loss, g, t, e, x_t, v_pred, torch.ones_like(t), n_bad)


# ---------------------------------------------------------------- RFDS-Rev (§5)
def rfds_rev(
    model: VelocityModel,
    x0: Tensor,
    cond: Cond,
    uncond: Cond,
    guidance_scale: float,
    *,
    n_inner: int = 1,
    inner_step: StepSize = "auto",
    min_step_percent: float = 0.02,
    max_step_percent: float = 0.98,
    t: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    weighting: Weighting = "none",
    grad_clip: Optional[float] = None,
    cfg_batched: bool = True,
    generator: Optional[torch.Generator] = None,
    inner_model: Optional[VelocityModel] = None,
    inner_cond: Optional[Cond] = None,
    batch_scaling: str = "per-sample",
    nonfinite: NonFinite = "error",
    checks: Optional[DeferredChecks] = None,
) -> RFDSOutput:
    """RFDS-Rev (§5): refine ε by ``n_inner`` iRFDS updates with the conditional velocity
    (no CFG), then take the RFDS step at the same t with the refined noise.

    ``inner_model``/``inner_cond`` give the velocity of the iRFDS updates when the outer step
    uses a composite model (Perp-Neg); by default ``model`` with ``cond``.  ``nonfinite`` and
    ``checks`` as :func:`rfds` (the policy also covers each refined ε')."""
    check_int("n_inner", n_inner, 0)
    check_step_size("inner_step", inner_step)
    _check_options(weighting, grad_clip, batch_scaling, nonfinite, guidance_scale)
    checks = _check_inputs_deferred(x0, t, eps, cond, uncond, checks)
    t, eps = _draw(model, x0, t, eps, min_step_percent, max_step_percent, generator)
    x0_ = x0.detach()
    inner_model, inner_cond = inner_model or model, cond if inner_cond is None else inner_cond
    if inner_cond is not cond:
        checks.add_cond("inner_cond", inner_cond)
    inner_bad = []
    for _ in range(n_inner):
        eps, n_bad = _irfds_step(inner_model, x0_, eps, t, inner_cond, inner_step, 1.0, None, nonfinite, checks)
        inner_bad.append(n_bad)
    out = rfds_from_noise(model, x0, t, eps, cond, uncond, guidance_scale, weighting=weighting,
                          grad_clip=grad_clip, cfg_batched=cfg_batched, generator=generator,
                          batch_scaling=batch_scaling, nonfinite=nonfinite, checks=checks)
    checks()
    return dataclasses.replace(out, num_nonfinite=out.num_nonfinite + sum(inner_bad))  # inner and outer v̂


ALGORITHMS = ("rfds", "rfds-rev")
