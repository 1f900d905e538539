"""Quantised denoiser weights through diffusers' own quantisation configs (docs/backends.md, "Quantised
denoiser").  RFDS never differentiates through the denoiser, so its weights may be stored in fewer bits
without touching the autograd path; the VAE, which carries the gradient to the render, is not quantised.

    "int8-weight-only"    TorchAoConfig(Int8WeightOnlyConfig())     torchao >= 0.15, any device
    "float8-weight-only"  TorchAoConfig(Float8WeightOnlyConfig())   torchao >= 0.15
    "nf4"                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")   bitsandbytes, CUDA

:func:`check_quantization` refuses, in one line and before any weights load, a method whose library is
not installed or that cannot run on the device; :func:`quantization_config` builds the diffusers object
passed to ``from_pretrained(quantization_config=...)``.  No quantiser is written here.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Optional

import torch
from packaging import version

from ..checks import check_choice

QUANTIZATIONS = ("int8-weight-only", "float8-weight-only", "nf4")
LIBRARY = {"int8-weight-only": ("torchao", "0.15"), "float8-weight-only": ("torchao", "0.15"),
           "nf4": ("bitsandbytes", "0.43.3")}  # diffusers' minimum versions for TorchAoConfig / 4-bit loading
INSTALL = {"torchao": "pip install 'threestudio-rfds[quant]' (torchao)", "bitsandbytes": "pip install bitsandbytes"}


def _installed(package: str) -> Optional[str]:
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def check_quantization(quantization: Optional[str], device: torch.device) -> None:
    """None, or a method of :data:`QUANTIZATIONS` whose library is installed (at diffusers' minimum
    version) and usable on ``device``; otherwise a ``ValueError`` naming the method and the fix."""
    if quantization is None:
        return
    check_choice("quantization", quantization, (None, *QUANTIZATIONS))
    package, minimum = LIBRARY[quantization]
    found = _installed(package)
    if found is None:
        raise ValueError(f"quantization {quantization!r} needs {package}, which is not installed: {INSTALL[package]}")
    if version.parse(found) < version.parse(minimum):
        raise ValueError(f"quantization {quantization!r} needs {package} >= {minimum} (diffusers' minimum), "
                         f"found {found}: pip install -U {package}")
    if quantization == "nf4" and device.type != "cuda":
        raise ValueError(f"quantization 'nf4' (bitsandbytes) needs a CUDA device, got {str(device)!r}; "
                         "on this device use 'int8-weight-only' or 'float8-weight-only' (torchao)")


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    """The diffusers quantisation config for ``quantization`` (checked by :func:`check_quantization`)."""
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    check_choice("quantization", quantization, QUANTIZATIONS)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    method = Int8WeightOnlyConfig() if quantization == "int8-weight-only" else Float8WeightOnlyConfig()
    return TorchAoConfig(method)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether diffusers loaded ``module`` with a quantisation config (it then refuses dtype casts)."""
    return bool(getattr(module, "is_quantized", False))


__all__ = ["QUANTIZATIONS", "check_quantization", "quantization_config", "is_quantized"]
