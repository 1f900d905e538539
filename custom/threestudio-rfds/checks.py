"""Argument checks shared by the public functions: each raises ``ValueError`` naming the
argument, the bad value and what is allowed."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN/inf; the message names it and the cause."""


def _is_real(value) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_range(name: str, value: float, low: float, high: float) -> None:
    """``low <= value <= high`` for a real number (Python or NumPy scalar; NaN fails)."""
    if not _is_real(value) or not (low <= float(value) <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def check_positive(name: str, value: float) -> None:
    """A finite real number > 0 (e.g. a learning rate, a gradient clip)."""
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_int(name: str, value: int, low: int = 0) -> None:
    """An integer ``>= low`` (Python or NumPy integer, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_number(name: str, value: float, low: float = -math.inf) -> None:
    """A finite real number ``>= low`` (Python or NumPy scalar; e.g. a guidance scale, a loss weight)."""
    if not _is_real(value) or not math.isfinite(value) or value < low:
        allowed = "a finite number" + ("" if low == -math.inf else f" >= {low}")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_guidance_scale(guidance_scale: float, name: str = "guidance_scale") -> None:
    """A finite w >= 0: 0 is the unconditional velocity, 1 the conditional one, w > 1 extrapolates
    past it (CFG).  A negative w, which would push away from the prompt, is refused as a likely sign
    error."""
    if not _is_real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 = unconditional, 1 = the prompt alone, > 1 = "
                         f"classifier-free guidance), got {guidance_scale!r}")


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


def check_finite(name: str, x: Tensor, hint: str = "inputs must be finite") -> None:
    if not torch.isfinite(x).all():
        n = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{name} contains {n} non-finite values (NaN/inf); {hint}")


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


def check_not_meta(name: str, x: Tensor) -> None:
    """A tensor with data: a meta tensor (shape only, e.g. from ``device="meta"`` or an
    ``init_empty_weights`` model whose weights were never loaded) is named, with the fix."""
    if torch.is_tensor(x) and x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without data, e.g. from a model built with "
                         f"device='meta' or init_empty_weights and never loaded); pass a tensor on cpu or cuda")


class DeferredChecks:
    """Value tests (finiteness, ranges) queued without a host sync and settled by one sync in
    :meth:`check` (call it after the step's kernels are queued).  The first failing test, in the
    order they were added, raises its error: :class:`NonFiniteError` for NaN/inf, ``ValueError``
    for a value out of range."""

    def __init__(self) -> None:
        self._tests: list = []  # (ok: 0-d bool tensor, () -> the exception to raise)

    def add(self, name: str, x: Tensor, hint: str = "inputs must be finite") -> "DeferredChecks":
        def error():
            n = int((~torch.isfinite(x)).sum())
            return NonFiniteError(f"{name} contains {n} non-finite values (NaN/inf); {hint}")

        self._tests.append((torch.isfinite(x).all(), error))
        return self

    def add_range(self, name: str, x: Tensor, low: float, high: float, hint: str) -> "DeferredChecks":
        """``low <= x <= high`` everywhere (NaN fails: it is reported as non-finite)."""
        def error():
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                return NonFiniteError(f"{name} contains {int((~finite).sum())} non-finite values (NaN/inf); {hint}")
            return ValueError(f"{name} has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside "
                              f"[{low:g}, {high:g}]; {hint}")

        self._tests.append((((x >= low) & (x <= high)).all(), error))
        return self

    def add_cond(self, name: str, cond) -> "DeferredChecks":
        """Every tensor of a condition dict (prompt embeddings); a condition of another type or
        on the meta device is a ``ValueError`` now."""
        if not isinstance(cond, Mapping) or not all(torch.is_tensor(v) for v in cond.values()):
            got = type(cond).__name__ if not isinstance(cond, Mapping) else {k: type(v).__name__ for k, v in cond.items()}
            raise ValueError(f"{name} must be a dict of tensors {{name: [B, ...]}}, got {got}")
        for k, v in cond.items():
            check_not_meta(f"{name}[{k!r}]", v)
            self.add(f"{name}[{k!r}]", v, "the prompt embeddings are broken (re-encode them; check the text encoder's dtype)")
        return self

    def check(self) -> None:
        if not self._tests or bool(torch.stack([ok for ok, _ in self._tests]).all()):
            return
        for ok, error in self._tests:
            if not bool(ok):
                raise error()

    __call__ = check


def deferred_check_finite(name: str, x: Tensor) -> DeferredChecks:
    """Queue the finiteness test of ``x`` now, without a host sync; calling the returned object
    raises the :class:`NonFiniteError` (call it after the step's kernels are queued)."""
    return DeferredChecks().add(name, x)


def check_prompts(prompts: Union[str, Sequence[str]]) -> List[str]:
    """A string or a non-empty list of strings → list."""
    if isinstance(prompts, str):
        return [prompts]
    bad = not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts)
    if bad:
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    return list(prompts)
