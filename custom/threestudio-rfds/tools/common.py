"""What the two tools share: model arguments, the output folder, loading a backend and its
prompt embeddings, the run record (settings + versions) and the loss curves.

Exit statuses: 0 done, 1 the run failed (non-finite values, outputs not writable), 2 bad
arguments or inputs (nothing was computed), 130 interrupted (Ctrl-C)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..atomic import OutputExistsError, StagedDir

FAMILIES = ("sd3", "flux", "instaflow")
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def default_model(family: str) -> str:
    if family == "sd3":
        from ..backends.sd3 import DEFAULT_MODEL
    elif family == "flux":
        from ..backends.flux import DEFAULT_MODEL
    else:
        from ..backends.instaflow import DEFAULT_MODEL
    return DEFAULT_MODEL


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default (argparse's defaults formatter),
    except unset (None) and off (False) defaults, whose help says what applies."""

    def _shows_default(self, action: argparse.Action) -> bool:
        return bool(action.option_strings) and not any(action.default is v for v in (None, False, argparse.SUPPRESS))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse prints no help line without a help text
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = '""' if action.default == "" else "%(default)s"
        if not self._shows_default(action) or "%(default)" in text or text.endswith(f"default: {default}"):
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


@contextlib.contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
    """Within the block, transformers', diffusers' and the hub client's progress bars ("Loading
    weights", downloads) are off unless ``enabled`` (``--no-progress``); their state is restored."""
    if enabled:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    was = (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled(),
           not are_progress_bars_disabled())
    transformers_logging.disable_progress_bar()  # the hub client's too
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            transformers_logging.enable_progress_bar()
        if was[1]:
            diffusers_logging.enable_progress_bar()
        if was[2]:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument("--model", default="sd3", help="model family: sd3 (SD3 / SD3.5), flux (FLUX.1) or instaflow")
    g.add_argument("--pretrained", default=None,
                   help="hub id or local diffusers folder (default: SD3-medium / FLUX.1-schnell / InstaFlow 2-rectified "
                        "flow); SD3.5: --model sd3 --pretrained stabilityai/stable-diffusion-3.5-medium; FLUX.1 [dev]: "
                        "--model flux --pretrained black-forest-labs/FLUX.1-dev")
    g.add_argument("--guidance-mode", default=None,
                   help="--model flux: distilled ([dev]'s guidance embedding g, no negative pass: every CFG scale is 1), "
                        "cfg (true CFG; the default) or distilled+cfg (docs/math.md §2.4)")
    g.add_argument("--distilled-guidance", type=float, default=None,
                   help="--model flux, distilled modes: g fed to [dev]'s guidance embedding (default 3.5)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, …")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), fp32, fp16, bf16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--text-cache", default=None, help="folder to cache prompt embeddings in (optional)")
    g.add_argument("--local-files-only", action="store_true", help="never contact the Hugging Face hub")


def check_model_args(args: argparse.Namespace) -> None:
    from ..backends.base import DTYPES

    if args.model not in FAMILIES:
        raise ValueError(f"--model must be one of {list(FAMILIES)} (SD3/SD3.5 are 'sd3'), got {args.model!r}")
    if args.model != "flux" and (args.guidance_mode is not None or args.distilled_guidance is not None):
        raise ValueError(f"--guidance-mode and --distilled-guidance are FLUX options (--model flux), got --model {args.model}")
    if args.model == "flux":
        from ..backends.flux_convention import GUIDANCE_MODES
        from ..checks import check_choice

        args.guidance_mode = args.guidance_mode or "cfg"
        check_choice("--guidance-mode", args.guidance_mode, GUIDANCE_MODES)
    if args.dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be one of {['auto', *DTYPES]}, got {args.dtype!r}")
    try:
        dev = torch.device(args.device) if args.device != "auto" else None
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA but none is available (use --device cpu or auto)")
    if dev is not None and dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if args.text_cache is not None and os.path.exists(args.text_cache) and not os.path.isdir(args.text_cache):
        raise ValueError(f"--text-cache {args.text_cache!r} exists and is not a folder")
    args.pretrained = args.pretrained or default_model(args.model)


def check_model_files(args: argparse.Namespace) -> None:
    """The model family and --height/--width against the VAE factor, read from the model's config
    files (a local folder or the hub cache) before any model loads: these errors take a second,
    not a model load.  Models whose files are not on disk yet are checked after loading."""
    from ..backends.family import check_family, vae_scale_factor

    check_family(args.model, args.pretrained, fetch=False)
    factor = vae_scale_factor(args.pretrained)
    if factor is not None:
        check_size_factor(factor, args.height, args.width)


def check_numbers(args: argparse.Namespace, *, positive=(), finite=(), at_least: Optional[Dict[str, int]] = None,
                  fractions=()) -> None:
    """One-line errors for numeric flags (argparse accepts nan/inf/negatives): names are the
    argument names (``lr`` → ``--lr``); None values (unset) are skipped."""
    flag = lambda n: "--" + n.replace("_", "-")  # noqa: E731
    for n in positive:
        v = getattr(args, n)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{flag(n)} must be a finite number > 0, got {v}")
    for n in finite:
        v = getattr(args, n)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{flag(n)} must be a finite number, got {v}")
    for n in fractions:
        v = getattr(args, n)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"{flag(n)} must be a number in [0, 1], got {v}")
    for n, low in (at_least or {}).items():
        v = getattr(args, n)
        if v is not None and v < low:
            raise ValueError(f"{flag(n)} must be >= {low}, got {v}")


def add_output_args(ap: argparse.ArgumentParser, default: str):
    o = ap.add_argument_group("output")
    o.add_argument("--out", default=None, help=f"output folder (default {default}); must not exist or be empty "
                                                "unless --overwrite")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder of this tool as a whole (at the end of the run)")
    o.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (the optimisation's and the libraries' loading and download bars)")
    return o


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's time limit, ``kill``) acts like Ctrl-C, so the
    tools save or discard their run as they do for Ctrl-C.  A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Within the block the first SIGINT/SIGTERM only asks to stop: the returned function turns
    True, so a loop can end at a step boundary; a second signal interrupts at once
    (KeyboardInterrupt).  Outside the main thread signals are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked: List[int] = []

    def request(signum, frame):
        if asked:
            raise KeyboardInterrupt(f"signal {signum}")
        asked.append(signum)

    old = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def stage_output(args: argparse.Namespace, tool: str) -> StagedDir:
    """Check --out before any work and open the hidden sibling folder the run is written into;
    ``StagedDir.publish`` moves it into place at the end (docs/tools.md, "Guarantees")."""
    def ours(path: str) -> bool:  # --overwrite only ever replaces a folder this tool wrote
        try:
            with open(os.path.join(path, "run.json")) as f:
                return json.load(f).get("tool") == tool
        except (OSError, ValueError, AttributeError):
            return False

    try:
        return StagedDir(args.out, replace=args.overwrite, replaceable=ours)
    except OutputExistsError as e:
        raise ValueError(f"--out {e.args[0]}") from None
    except OSError as e:
        raise ValueError(f"--out {args.out!r}: cannot create the output folder ({e.strerror}: {e.filename})") from None


def load_model(args: argparse.Namespace, time_convention: str = "model"):
    """The backend for ``args`` with latents at the image's own resolution (latent_rule 'native')."""
    from ..backends import load_backend

    kw: Dict[str, Any] = {"device": args.device, "dtype": args.dtype, "time_convention": time_convention,
                          "latent_rule": "native"}
    if args.local_files_only:
        kw["local_files_only"] = True
    if args.model == "flux":
        kw.update(guidance_mode=args.guidance_mode, distilled_guidance=args.distilled_guidance)
    return load_backend(args.model, pretrained_model_name_or_path=args.pretrained, **kw)


def cfg_scale(backend, guidance_scale: float) -> float:
    """The CFG scale for the backend's guidance mode (FLUX's "distilled" takes no negative pass: 1)."""
    fit = getattr(backend, "cfg_scale", None)
    return guidance_scale if fit is None else fit(guidance_scale)


def encode_pair(args: argparse.Namespace, backend, prompt: str, negative: str = "") -> Tuple[dict, dict]:
    """(cond, uncond) for one prompt, each batch 1, on the backend's device."""
    from ..text import encode_prompt_pair

    return encode_prompt_pair(args.model, args.pretrained, prompt, negative, cache_dir=args.text_cache,
                              device=backend.device, dtype=backend.dtype)


def check_size(backend, height: int, width: int, name: str = "--height/--width") -> None:
    check_size_factor(backend.vae_scale_factor, height, width, name)


def check_size_factor(f: int, height: int, width: int, name: str = "--height/--width") -> None:
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


CURVE_LABELS = {"loss": "loss", "grad_norm": "gradient norm ‖g‖", "t_mean": "mean noise level t",
                "noise_reg": "noise regulariser R(ε)"}


def plot_curves(history: Dict[str, List[float]], path: str, title: str = "") -> str:
    """One panel per series (e.g. loss, grad_norm) against the optimisation step (matplotlib Agg),
    each with labelled axes and a grid; loss/gradient series spanning decades on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k, v in history.items() if k != "step" and v]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(history["step"], history[k], lw=1.2, marker="." if len(history[k]) < 30 else None)
        label = CURVE_LABELS.get(k, k)
        ax.set_xlabel("optimisation step", fontsize=10)
        ax.set_ylabel(label, fontsize=10)
        ax.set_title(label, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=9)
        v = [x for x in history[k] if math.isfinite(x)]
        if k in ("loss", "grad_norm") and v and min(v) > 0 and max(v) / min(v) > 20:  # log only over decades
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
