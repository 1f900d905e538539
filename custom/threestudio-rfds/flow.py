"""Rectified-flow conventions in one notation (docs/math.md §1).

Every model in this project is described by the interpolant

    x_t = a(t)·x0 + b(t)·ε,      t ∈ [0, 1] the *noise level* (t = 1 is pure noise),

and its velocity v_t = dx_t/dt = ȧ(t)·x0 + ḃ(t)·ε.  All rectified flows used here are
linear, a(t) = 1 − t and b(t) = t, so v = ε − x0.  A backend states how its network sees
this (:class:`FlowConvention`): which timestep number it is fed, and the sign of what it
predicts relative to v_t.  All functions are pure tensor functions (k-diffusion style).  The
formula helpers (``interpolate``, ``velocity_target``, ``x0_from_velocity``, ``eps_from_velocity``)
do not validate t — that would be a host sync on every call of the hot path; the samplers here
and the algorithms in :mod:`threestudio_rfds.rfds` check t before using them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from .checks import check_positive, check_range, check_time

TimeConvention = Literal["model", "reference"]


# ---------------------------------------------------------------- interpolant (§1.1)
def alpha(t: Tensor) -> Tensor:
    """a(t) = 1 − t, the weight of the data x0 in x_t."""
    return 1.0 - t


def beta(t: Tensor) -> Tensor:
    """b(t) = t, the weight of the noise ε in x_t."""
    return t


def alpha_dot(t: Tensor) -> Tensor:
    """ȧ(t) = −1."""
    return torch.full_like(t, -1.0)


def beta_dot(t: Tensor) -> Tensor:
    """ḃ(t) = 1."""
    return torch.ones_like(t)


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Reshape a [B] tensor to [B, 1, …, 1] with ``ndim`` dimensions in all."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = a(t)·x0 + b(t)·ε  (t has shape [B])."""
    tt = append_dims(t, x0.ndim).to(x0.dtype)
    return alpha(tt) * x0 + beta(tt) * eps


def velocity_target(x0: Tensor, eps: Tensor, t: Optional[Tensor] = None) -> Tensor:
    """v = ȧ·x0 + ḃ·ε = ε − x0 (independent of t for the linear interpolant)."""
    return eps - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x̂0 = x_t − b(t)·v  (solves x_t = a·x0 + b·ε, v = ε − x0 for x0)."""
    return x_t - append_dims(t, x_t.ndim).to(x_t.dtype) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """ε̂ = x_t + a(t)·v  (= one Euler step of the flow ODE from t to 1)."""
    return x_t + alpha(append_dims(t, x_t.ndim).to(x_t.dtype)) * v


# ---------------------------------------------------------------- time sampling (§1.3)
def shift_time(u: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift: σ = s·u / (1 + (s − 1)·u); identity for s = 1."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return u
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_time(
    batch_size: int,
    min_t: float,
    max_t: float,
    *,
    shift: float = 1.0,
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """u ~ U[min_t, max_t], returned as the shifted noise level t = shift(u), shape [B]."""
    check_range("min_t", min_t, 0.0, 1.0)
    check_range("max_t", max_t, 0.0, 1.0)
    if min_t > max_t:
        raise ValueError(f"min_t ({min_t}) must be <= max_t ({max_t})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen_device = generator.device if generator is not None else device
    u = min_t + (max_t - min_t) * torch.rand(batch_size, generator=generator, device=gen_device)
    return shift_time(u, shift).to(device)


# ---------------------------------------------------------------- backend conventions (§2)
@dataclass(frozen=True)
class FlowConvention:
    """How a network relates to the project's (t, v) notation.

    The network is fed ``timestep = timestep_scale · τ(t)`` and returns ``velocity_sign · v_t``.
    τ(t) = t for a model whose timestep is its noise fraction; ``reversed_timestep`` gives
    τ(t) = 1 − t, which reproduces the InstaFlow reference code (it labels a latent of noise
    level t with the timestep of noise level 1 − t, docs/math.md §2.3).  ``shift`` is the
    training-time shift applied when sampling t (SD3: 3.0).  ``reversed_percent`` makes a
    step-percent u select noise level 1 − u before the shift, as the SD3 reference code does
    by indexing the scheduler's descending timestep table.
    """

    name: str
    velocity_sign: float
    timestep_scale: float = 1000.0
    shift: float = 1.0
    reversed_timestep: bool = False
    reversed_percent: bool = False

    def model_timestep(self, t: Tensor) -> Tensor:
        """The number the network is fed for noise level t."""
        return self.timestep_scale * ((1.0 - t) if self.reversed_timestep else t)

    def to_velocity(self, model_output: Tensor) -> Tensor:
        """v_t = velocity_sign · network output (the sign is its own inverse)."""
        return model_output if self.velocity_sign == 1.0 else -model_output

    def sample_time(
        self,
        batch_size: int,
        min_step_percent: float,
        max_step_percent: float,
        *,
        device=None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Noise levels t [B] for a threestudio-style step-percent range (docs/math.md §1.3).

        The percent u ~ U[min, max] is the fraction of the model's timestep range:
        t = shift(u), or t = shift(1 − u) when ``reversed_percent`` / ``reversed_timestep``
        (then the model is still fed 1000·u).
        """
        u = sample_time(batch_size, min_step_percent, max_step_percent, device=device, generator=generator)
        if self.reversed_percent or self.reversed_timestep:
            u = 1.0 - u
        return shift_time(u, self.shift)


def _check_time_convention(time_convention: str) -> None:
    if time_convention not in ("model", "reference"):
        raise ValueError(f"time_convention must be 'model' or 'reference', got {time_convention!r}")


def sd3_convention(shift: float = 3.0, time_convention: TimeConvention = "model") -> FlowConvention:
    """SD3 / SD3.5 (FlowMatchEulerDiscreteScheduler): timestep = 1000·σ, predicts ε − x0.

    ``"reference"``: step percents index the descending sigma table as the paper's code does.
    """
    _check_time_convention(time_convention)
    check_positive("shift", shift)
    return FlowConvention("sd3", velocity_sign=1.0, shift=float(shift), reversed_percent=time_convention == "reference")


def instaflow_convention(time_convention: TimeConvention = "model") -> FlowConvention:
    """InstaFlow (2-rectified flow): timestep = 1000·t (noise fraction), predicts x0 − ε.

    ``"reference"`` builds x_t with noise level 1 − u but feeds 1000·u, as the paper's code.
    """
    _check_time_convention(time_convention)
    return FlowConvention("instaflow", velocity_sign=-1.0, reversed_timestep=time_convention == "reference")


# ---------------------------------------------------------------- ODE sampling (§1.4)
def euler_step(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """x_{t'} = x_t + (t' − t)·v_t."""
    return x + append_dims(t_next - t, x.ndim).to(x.dtype) * v


def euler_sample(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    timesteps: Tensor,
) -> Tensor:
    """Integrate dx/dt = v(x, t) along ``timesteps`` (a 1-D tensor, e.g. 1 → 0) with Euler steps."""
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D tensor with >= 2 entries, got shape {tuple(timesteps.shape)}")
    check_time("timesteps", timesteps)
    timesteps = timesteps.to(x.device)  # a CPU grid may drive a CUDA sample
    b = x.shape[0]
    for i in range(timesteps.numel() - 1):
        t = timesteps[i].expand(b)
        x = euler_step(x, velocity(x, t), t, timesteps[i + 1].expand(b))
    return x


def time_grid(num_steps: int, shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0, device=None) -> Tensor:
    """num_steps + 1 noise levels from t_max down to t_min, shifted (SD3 sampling schedule)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    check_range("t_max", t_max, 0.0, 1.0)
    check_range("t_min", t_min, 0.0, t_max)
    check_positive("shift", shift)
    u = torch.linspace(t_max, t_min, num_steps + 1, device=device, dtype=torch.float64)
    return shift_time(u, shift).float()


__all__ = [
    "alpha", "beta", "alpha_dot", "beta_dot", "append_dims", "interpolate", "velocity_target",
    "x0_from_velocity", "eps_from_velocity", "shift_time", "sample_time", "FlowConvention",
    "sd3_convention", "instaflow_convention", "euler_step", "euler_sample", "time_grid",
]
