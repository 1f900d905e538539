"""Time one guidance step: VAE encode of a render (with grad) → RFDS or RFDS-Rev with CFG → backward
to the render, through the real :class:`SD3Backend` / :class:`FluxBackend` / :class:`InstaFlowBackend`.

Models are SD3-medium-, FLUX.1-dev- (11.9 B) and SD1.5(InstaFlow)-sized with random weights built on
the device (no download; speed and memory do not depend on the weights).  Prompt embeddings are random
with the real shapes: SD3 [1, 77+256, 4096] + [1, 2048], FLUX [1, 512, 4096] + [1, 768] (distilled+cfg:
g = 3.5 and a negative pass), InstaFlow [1, 77, 768].  One JSON line per case on stdout:
{"case", "algorithm", "model", "median_ms", "min_ms", "peak_mem_gib", "dtype", "device_name",
"resolution", "steps", "warmup_s", ...}, and a summary table on stderr.  Full-size cases need a CUDA
GPU; ``--tiny`` runs tiny configs on the CPU in seconds (for tests).
Levers under measurement (:mod:`.levers`): ``--cuda-graphs``, ``--fp8``, ``--compile-vae``;
``--warmup-resolutions`` times the compile warm-up of each resolution milestone; ``--profile``
appends a per-kernel table per case to a file.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..backends.base import maybe_compile, resolve_dtype
from ..protocol import for_latents
from ..rfds import rfds, rfds_rev
from .levers import GraphedDenoiser, compile_static, fp8_quantize, profile_steps, relative_error, velocity_probe

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
SD3_VAE = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)  # SD3's VAE architecture, FLUX.1's constants
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                sample_size=512, scaling_factor=0.18215)
TINY = {
    "sd3": (dict(SD3_MEDIUM, sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=32),
            dict(SD3_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)),
    "flux": (dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
             dict(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)),
    "instaflow": (dict(SD15_UNET, block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32,
                       norm_num_groups=16),
                  dict(SD15_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)),
}
MODEL_NAMES = {"sd3": "sd3-medium", "flux": "flux-dev", "instaflow": "instaflow-sd1.5"}
FULL_CONFIGS = {"sd3": (SD3_MEDIUM, SD3_VAE), "flux": (FLUX_DEV, FLUX_VAE)}
ALGORITHMS = {"rfds": rfds, "rfds-rev": rfds_rev}
CASES = [f"{m}-{a}" for m in MODEL_NAMES for a in ALGORITHMS]


def _random(cls, config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A model of ``config`` with random weights, allocated on ``device`` in ``dtype`` directly."""
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default)
    return model.to(device).eval()


def build(model: str, device: torch.device, dtype: torch.dtype, resolution: int, tiny: bool, **options):
    """(backend, cond, uncond) for ``model`` ∈ {"sd3", "flux", "instaflow"} with random weights and prompts;
    ``options`` go to the backend (compile, vae_channels_last, vae_checkpointing)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from ..backends.flux import FluxBackend
    from ..backends.instaflow import InstaFlowBackend
    from ..backends.sd3 import SD3Backend

    net_cfg, vae_cfg = TINY[model] if tiny else FULL_CONFIGS.get(model, (SD15_UNET, SD15_VAE))
    vae = _random(AutoencoderKL, vae_cfg, device, dtype)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    if model == "sd3":
        net = _random(SD3Transformer2DModel, net_cfg, device, dtype)
        backend = SD3Backend.from_modules(net, vae, shift=3.0, latent_rule="native", model_id=MODEL_NAMES[model],
                                          **options)
        conds = [{"prompt_embeds": randn(1, 77 + 256, net_cfg["joint_attention_dim"]),
                  "pooled_prompt_embeds": randn(1, net_cfg["pooled_projection_dim"])} for _ in range(2)]
    elif model == "flux":
        net = _random(FluxTransformer2DModel, net_cfg, device, dtype)
        backend = FluxBackend.from_modules(net, vae, guidance_mode="distilled+cfg", distilled_guidance=3.5,
                                           latent_rule="native", model_id=MODEL_NAMES[model], **options)
        conds = [{"prompt_embeds": randn(1, 512, net_cfg["joint_attention_dim"]),
                  "pooled_prompt_embeds": randn(1, net_cfg["pooled_projection_dim"])} for _ in range(2)]
    else:
        net = _random(UNet2DConditionModel, net_cfg, device, dtype)
        backend = InstaFlowBackend.from_modules(net, vae, latent_rule="resize", latent_size=(resolution, resolution),
                                                model_id=MODEL_NAMES[model], **options)
        conds = [{"encoder_hidden_states": randn(1, 77, net_cfg["cross_attention_dim"])} for _ in range(2)]
    return backend, conds[0], conds[1]


def denoiser(backend) -> torch.nn.Module:
    return backend.transformer if hasattr(backend, "transformer") else backend.unet


def set_denoiser(backend, module: torch.nn.Module) -> None:
    setattr(backend, "transformer" if hasattr(backend, "transformer") else "unet", module)


def apply_levers(backend, cond, args: argparse.Namespace) -> Dict:
    """FP8, then compile or CUDA graphs, on the denoiser; the compile of the VAE encoder.  Returns
    what was applied; ``{"skipped": why}`` when a requested lever is unavailable here."""
    applied: Dict = {}
    if args.fp8:
        ref = velocity_probe(backend, cond, args.resolution)
        why = fp8_quantize(denoiser(backend))
        if why:
            return {"skipped": why}
        applied["fp8_velocity_rel_err"] = round(relative_error(velocity_probe(backend, cond, args.resolution), ref), 5)
    if args.cuda_graphs:
        set_denoiser(backend, GraphedDenoiser(denoiser(backend)))
    elif args.warmup_resolutions:  # several shapes: static graphs (see compile_static)
        compile_static(denoiser(backend), args.compile)
    else:
        maybe_compile(denoiser(backend), args.compile)  # the backend option `compile`, as users get it
    compile_static(backend.vae.encoder, args.compile_vae)
    return applied


PHASES = ("encode", "flow", "backward")


class Marks:
    """Timestamps at named points of one step: CUDA events on the GPU (no sync until read),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: List = []

    def __call__(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.points.append(e)
        else:
            self.points.append(time.perf_counter())

    def durations_ms(self) -> List[float]:
        """Milliseconds between consecutive marks (synchronises on the GPU)."""
        if self.cuda:
            self.points[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        return [1000.0 * (b - a) for a, b in zip(self.points, self.points[1:])]


def guidance_step(backend, algorithm: str, rgb: torch.Tensor, cond, uncond, guidance_scale: float,
                  cfg_batched: bool, mark=lambda: None) -> torch.Tensor:
    """encode (with grad) → RFDS / RFDS-Rev → backward; ``mark()`` after each phase; returns the loss."""
    rgb.grad = None
    z = backend.encode(rgb)
    mark()
    out = ALGORITHMS[algorithm](for_latents(backend, z), z, cond, uncond, guidance_scale, cfg_batched=cfg_batched)
    mark()
    out.loss.backward()
    mark()
    return out.loss.detach()


def time_steps(fn, steps: int, device: torch.device) -> List[List[float]]:
    """Per step, the milliseconds of each phase of ``fn(mark)`` (see :data:`PHASES`)."""
    times = []
    for _ in range(steps):
        marks = Marks(device)
        marks()
        fn(marks)
        times.append(marks.durations_ms())
    return times


def _wall_s(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(time.perf_counter() - t0, 2)


def run_case(backend, model: str, algorithm: str, cond, uncond, args, device: torch.device,
             dtype: torch.dtype, levers: Optional[Dict] = None) -> Dict:
    def make_step(resolution: int):
        rgb = torch.rand(args.batch, 3, resolution, resolution, device=device, requires_grad=True)

        def step(mark=lambda: None):
            return guidance_step(backend, algorithm, rgb, cond, uncond, args.guidance_scale,
                                 args.cfg_mode == "batched", mark)
        return rgb, step

    warmup_s = {}  # wall seconds of the warm-up at each resolution milestone (compilation of each shape)
    for res in args.warmup_resolutions:
        _, early = make_step(res)
        warmup_s[str(res)] = _wall_s(lambda: [early() for _ in range(max(1, args.warmup))], device)
        print(json.dumps({"progress": f"{model}-{algorithm}", "label": args.label, "warmup_s": warmup_s}), flush=True)
    rgb, step = make_step(args.resolution)
    warmup_s[str(args.resolution)] = _wall_s(lambda: [step() for _ in range(args.warmup)], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_with_build = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    phases = time_steps(step, args.steps, device)
    times = [sum(p) for p in phases]
    if not torch.isfinite(rgb.grad).all():
        raise RuntimeError(f"{model}-{algorithm}: non-finite gradient at the render")
    if args.profile:
        with open(args.profile, "a") as f:
            f.write(f"## {model}-{algorithm} {args.label}\n{profile_steps(step, device)}\n")
    return {
        "case": f"{model}-{algorithm}",
        "algorithm": algorithm,
        "model": ("tiny-" if args.tiny else "") + MODEL_NAMES[model] + "-random",
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        # median of each phase: VAE encode forward, the RFDS/RFDS-Rev call (denoiser passes), backward to the render
        **{f"{name}_ms": round(statistics.median(p[i] for p in phases), 3) for i, name in enumerate(PHASES)},
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        # since the process started: building the weights on the GPU (as loading does) + warm-up steps
        "peak_mem_with_build_gib": round(max(peak_with_build, torch.cuda.max_memory_allocated(device)) / 2**30, 3)
        if device.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "resolution": args.resolution,
        "steps": args.steps,
        "batch": args.batch,
        "cfg_mode": args.cfg_mode,
        "compile": args.compile,
        "compile_vae": args.compile_vae,
        "vae_channels_last": backend.vae_channels_last,
        "vae_checkpointing": args.vae_checkpointing,
        "cuda_graphs": args.cuda_graphs,
        "fp8": args.fp8,
        "warmup_s": warmup_s,
        **(levers or {}),
        "label": args.label,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rfds-benchmark-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {CASES}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 on GPU")
    p.add_argument("--resolution", type=int, default=None, help="square render size (default 512; --tiny: 64)")
    p.add_argument("--batch", type=int, default=1, help="renders per step")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--cfg-mode", default="batched", choices=["batched", "sequential"])
    p.add_argument("--compile", nargs="?", const=True, default=False,
                   choices=[True, "default", "max-autotune-no-cudagraphs"],
                   help="torch.compile the transformer / UNet (optionally a mode)")
    p.add_argument("--compile-vae", nargs="?", const=True, default=False,
                   choices=[True, "default", "max-autotune-no-cudagraphs"],
                   help="also torch.compile the VAE encoder (a lever under measurement, not a backend option yet)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA graphs for the no-grad denoiser calls (compile mode reduce-overhead; not with --compile)")
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls in the denoiser via torchao (reports the velocity error)")
    p.add_argument("--warmup-resolutions", default="",
                   help="comma-separated render sizes warmed up (and timed, warmup_s) before --resolution, e.g. 256")
    p.add_argument("--profile", default=None, help="append a torch.profiler table per case to this file")
    p.add_argument("--vae-channels-last", action="store_true", help="channels-last VAE weights and input")
    p.add_argument("--vae-checkpointing", action="store_true", help="gradient checkpointing in the VAE encoder")
    p.add_argument("--label", default="", help="free text copied into each JSON line")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (seconds; for tests)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"unknown --cases {unknown}; choose from {CASES}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps and --batch must be >= 1, --warmup >= 0")
    if args.cuda_graphs and args.compile:
        p.error("--cuda-graphs compiles the denoiser itself (mode reduce-overhead): drop --compile")
    try:
        args.warmup_resolutions = [int(r) for r in args.warmup_resolutions.split(",") if r.strip()]
    except ValueError:
        p.error(f"--warmup-resolutions must be comma-separated integers, got {args.warmup_resolutions!r}")
    args.cases = cases
    args.resolution = args.resolution or (64 if args.tiny else 512)
    if not args.tiny and torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu":
        p.error("full-size cases build SD3-medium (2B), FLUX.1-dev (12B) and SD1.5-sized models, minutes and tens of "
                "GB on a CPU: pass --tiny for the CPU (tiny models, seconds), or run on a CUDA GPU")
    return args


SUMMARY_COLUMNS = (("case", "case", "{}"), ("model", "model", "{}"), ("median ms", "median_ms", "{:.1f}"),
                   ("min ms", "min_ms", "{:.1f}"), ("encode", "encode_ms", "{:.1f}"), ("flow", "flow_ms", "{:.1f}"),
                   ("backward", "backward_ms", "{:.1f}"), ("peak GiB", "peak_mem_gib", "{:.2f}"))


def summary_table(records: List[Dict]) -> str:
    """The records as an aligned text table (milliseconds per step and per phase, peak memory)."""
    rows = [[title for title, _, _ in SUMMARY_COLUMNS]]
    for r in records:
        rows.append(["-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in SUMMARY_COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(SUMMARY_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> List[Dict]:
    """Run the cases grouped by model (one model in memory at a time); print and return the records."""
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = resolve_dtype(args.dtype, device)
    records = []
    for model in MODEL_NAMES:
        algorithms = [a for a in ALGORITHMS if f"{model}-{a}" in args.cases]
        if not algorithms:
            continue
        if model == "flux" and dtype == torch.float16:  # the backend refuses it: FLUX.1 overflows in fp16
            print(json.dumps({"model": MODEL_NAMES[model], "label": args.label,
                              "skipped": "FLUX.1 overflows in fp16; run its cases with --dtype bf16"}), flush=True)
            continue
        torch.manual_seed(0)
        backend, cond, uncond = build(model, device, dtype, args.resolution, args.tiny,
                                      vae_channels_last=args.vae_channels_last,
                                      vae_checkpointing=args.vae_checkpointing)
        levers = apply_levers(backend, cond, args)
        if "skipped" in levers:
            print(json.dumps({"model": MODEL_NAMES[model], "label": args.label, **levers}), flush=True)
            continue
        for algorithm in algorithms:
            rec = run_case(backend, model, algorithm, cond, uncond, args, device, dtype, levers)
            print(json.dumps(rec), flush=True)
            records.append(rec)
        del backend, cond, uncond
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    records = run(parse_args(argv))
    if records:  # JSON lines stay on stdout; the human summary goes to stderr
        print(summary_table(records), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
