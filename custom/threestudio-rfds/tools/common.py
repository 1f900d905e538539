"""What the two tools share: model arguments, loading a backend and its prompt embeddings,
the run record (settings + versions) and the loss curves."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

FAMILIES = ("sd3", "instaflow")


def default_model(family: str) -> str:
    if family == "sd3":
        from ..backends.sd3 import DEFAULT_MODEL
    else:
        from ..backends.instaflow import DEFAULT_MODEL
    return DEFAULT_MODEL


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="sd3", help="model family: sd3 (SD3 / SD3.5) or instaflow")
    g.add_argument("--pretrained", default=None,
                   help="hub id or local diffusers folder (default: SD3-medium / InstaFlow 2-rectified flow); "
                        "SD3.5: --model sd3 --pretrained stabilityai/stable-diffusion-3.5-medium")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, …")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), fp32, fp16, bf16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--text-cache", default=None, help="folder to cache prompt embeddings in (optional)")
    g.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")


def check_model_args(args: argparse.Namespace) -> None:
    if args.model not in FAMILIES:
        raise ValueError(f"--model must be one of {list(FAMILIES)} (SD3/SD3.5 are 'sd3'), got {args.model!r}")
    args.pretrained = args.pretrained or default_model(args.model)


def load_model(args: argparse.Namespace, time_convention: str = "model"):
    """The backend for ``args`` with latents at the image's own resolution (latent_rule 'native')."""
    from ..backends import load_backend

    kw: Dict[str, Any] = {"device": args.device, "dtype": args.dtype, "time_convention": time_convention,
                          "latent_rule": "native"}
    if args.local_files_only:
        kw["local_files_only"] = True
    return load_backend(args.model, pretrained_model_name_or_path=args.pretrained, **kw)


def encode_pair(args: argparse.Namespace, backend, prompt: str, negative: str = "") -> Tuple[dict, dict]:
    """(cond, uncond) for one prompt, each batch 1, on the backend's device."""
    from ..text import encode_prompt_pair

    return encode_prompt_pair(args.model, args.pretrained, prompt, negative, cache_dir=args.text_cache,
                              device=backend.device, dtype=backend.dtype)


def check_size(backend, height: int, width: int, name: str = "--height/--width") -> None:
    f = backend.vae_scale_factor
    if height < f or width < f or height % f or width % f:
        raise ValueError(f"{name} {height}x{width} must be positive multiples of the VAE factor {f} "
                         f"(e.g. {max(f, height // f * f)}x{max(f, width // f * f)})")


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "numpy", "PIL"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", None)
        except ImportError:
            out[mod] = None
    from ..version import __version__

    out["threestudio_rfds"] = __version__
    out["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return out


def run_record(tool: str, args: argparse.Namespace, argv: Optional[Sequence[str]], **extra: Any) -> Dict[str, Any]:
    """Settings (all parsed arguments), the command line and the library versions."""
    return {"tool": tool, "argv": list(sys.argv[1:] if argv is None else argv), "settings": vars(args).copy(),
            "versions": versions(), **extra}


def plot_curves(history: Dict[str, List[float]], path: str, title: str = "") -> str:
    """One panel per series (e.g. loss, grad_norm) against the optimisation step (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in history.items() if k != "step" and v]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(history["step"], history[k], lw=1)
        ax.set_xlabel("step")
        ax.set_title(k)
        if k in ("loss", "grad_norm") and all(v > 0 for v in history[k]):
            ax.set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seed_everything(seed: int) -> torch.Generator:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
