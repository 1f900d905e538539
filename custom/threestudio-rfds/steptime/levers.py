"""Speed levers that ``rfds-benchmark-step`` measures before any becomes a backend option.

* :class:`GraphedDenoiser`: CUDA graphs for the no-grad denoiser calls
  (``torch.compile(mode="reduce-overhead")``), safe for RFDS-Rev's two calls per step;
* :func:`fp8_quantize`: FP8 matmuls (torchao's dynamic float8 activations × float8 weights), with
  :func:`velocity_probe` to report the velocity error against the unquantised denoiser;
* :func:`compile_static`: ``torch.compile`` with one static graph per input shape;
* :func:`profile_steps`: a per-kernel table of a few steps (torch.profiler).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def compile_static(module: torch.nn.Module, mode=True) -> None:
    """Compile ``module`` in place with ``dynamic=False``: each shape (B and 2B passes, each
    resolution milestone) gets its own static graph.  With the default automatic-dynamic shapes the
    VAE encoder's recompile at a second resolution failed in inductor on the CPU (torch 2.14:
    "cannot determine truth value of Relational")."""
    if mode:
        module.compile(mode=None if mode in (True, "default") else mode, dynamic=False)


def _clone_outputs(out):
    """Copy the tensors of a denoiser output (tuple, or a diffusers output with ``.sample``)."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_outputs(o) for o in out)
    if hasattr(out, "sample"):
        out.sample = out.sample.clone()
        return out
    return out


class GraphedDenoiser(torch.nn.Module):
    """``module`` compiled with CUDA graphs (``mode="reduce-overhead"``); each call starts a new
    cudagraph step and returns copies of the outputs, because a replay overwrites the memory of the
    previous output (RFDS-Rev keeps its first call's velocity while making the second).  Attributes
    other than ``forward`` (``config``, ``dtype``, …) are the wrapped module's."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module
        self._graphed = torch.compile(module, mode="reduce-overhead", dynamic=False)

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return _clone_outputs(self._graphed(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def fp8_quantize(module: torch.nn.Module) -> Optional[str]:
    """Swap ``module``'s linear layers for torchao float8 (per-row dynamic activations, float8
    weights) in place; returns None, or why it could not (torchao missing, a GPU below sm_89, …)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as e:  # ImportError, or a torchao built for another torch
        return f"torchao unavailable: {e!r}"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return "FP8 matmuls need a CUDA GPU of compute capability >= 8.9"
    try:
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    except Exception as e:
        return f"torchao quantize_ failed: {e!r}"
    return None


@torch.no_grad()
def velocity_probe(backend, cond, resolution: int, seed: int = 0) -> Tensor:
    """The backend's velocity at t = 0.5 on fixed random latents of a ``resolution``² render (float32)."""
    h, w = backend.latent_shape(resolution, resolution)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, backend.latent_channels, h, w, generator=g).to(backend.device, backend.dtype)
    t = torch.full((1,), 0.5, device=backend.device)
    return backend.velocity(x, t, cond).float()


def relative_error(a: Tensor, ref: Tensor) -> float:
    """‖a − ref‖ / ‖ref‖."""
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def profile_steps(step: Callable[[], object], device: torch.device, steps: int = 2, rows: int = 25) -> str:
    """A torch.profiler table (top ``rows`` ops by device time, or CPU time on the CPU) over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)
