"""Argument checks shared by the public functions: each raises ``ValueError`` naming the
argument, the bad value and what is allowed."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor


def check_range(name: str, value: float, low: float, high: float) -> None:
    """``low <= value <= high`` for a Python number."""
    if not isinstance(value, (int, float)) or not (low <= float(value) <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def check_number(name: str, value: float, low: float = -math.inf) -> None:
    """A finite real number ``>= low`` (Python or NumPy scalar; e.g. a guidance scale, a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < low:
        allowed = "a finite number" + ("" if low == -math.inf else f" >= {low}")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_choice(name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_time(name: str, t: Tensor) -> None:
    """Noise levels must be finite and lie in [0, 1]."""
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a tensor of noise levels in [0, 1], got {type(t).__name__}")
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        raise ValueError(
            f"{name} must lie in [0, 1] (noise level); got min {t.min().item():.4g}, max {t.max().item():.4g}"
        )


def check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        n = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} contains {n} non-finite values (NaN/inf); inputs must be finite")


def check_shape(name: str, x: Tensor, ndim: Optional[int] = None, channels: Optional[int] = None,
                channel_dim: int = 1) -> None:
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[channel_dim] != channels:
        raise ValueError(
            f"{name} must have {channels} channels in dim {channel_dim}, got shape {tuple(x.shape)}"
        )


def check_batch(names: Sequence[str], *tensors: Tensor) -> int:
    """All tensors share the leading (batch) size; returns it."""
    sizes = [int(t.shape[0]) for t in tensors]
    if len(set(sizes)) != 1:
        desc = ", ".join(f"{n}={s}" for n, s in zip(names, sizes))
        raise ValueError(f"batch sizes must match, got {desc}")
    return sizes[0]


def deferred_check_finite(name: str, x: Tensor):
    """Queue the finiteness test of ``x`` now, without a host sync; the returned function raises
    the :func:`check_finite` error when called (call it after the step's kernels are queued)."""
    ok = torch.isfinite(x).all()

    def check() -> None:
        if not bool(ok):
            check_finite(name, x)

    return check


def check_prompts(prompts: Union[str, Sequence[str]]) -> List[str]:
    """A string or a non-empty list of strings → list."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts
