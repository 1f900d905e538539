"""``rfds-edit``: invert an image to noise with iRFDS, reconstruct it, and edit it with a new prompt.

1. Inversion (paper §4, rfds.irfds_loss): with x0 = E(image) fixed, optimise the noise ε with AdamW on
   L(ε) = mean(ḃ·(v̂(x_t, c_src) − (ε − x0)))² (reparameterised) + R(ε),  x_t = (1 − t)·x0 + t·ε,
   R(ε) = mean(ε)² + (var(ε) − 1)² keeping ε Gaussian-like.  ``--method update`` instead iterates the
   fixed point ε ← ε̂(x_t) = x_t + (1 − t)·v̂ (rfds.irfds_update).
2. Reconstruction: Euler-sample the flow from x_{t0} = t0·ε + (1 − t0)·x0 down to t = 0 with the
   source prompt (t0 = 1: from ε alone, the backend's own sampler, i.e. the diffusers pipeline).
   PSNR(image, decode(sample)) is computed in float64 on [0, 1] images.
3. Edit: the same sampling from the same ε with the target prompt; optionally followed by
   ``--edit-rfds-steps`` RFDS steps on the edited latent with the target prompt.

Defaults follow the paper's scripts (2dplayground_iRFDS*.py): SD3 initialises ε with the image latent,
lr 2e-3, t ∈ [0.02, 0.98], regenerates from t0 = 1 with 15 steps at CFG 2; InstaFlow starts from
Gaussian ε, lr 3e-3, t ∈ [0.1, 0.8], regenerates from t0 = 0.9 (the reference's ``step_scale``) with
20 steps at CFG 1.5.  The reference runs 1400 / 1000 steps (×2 accumulation); the default here is 500.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..atomic import write_json
from ..checks import NonFiniteError
from ..protocol import for_latents
from . import common, images

FAMILY_DEFAULTS = {
    "sd3": {"init": "latent", "lr": 2e-3, "min_step_percent": 0.02, "max_step_percent": 0.98,
            "t_start": 1.0, "sample_steps": 15, "sample_guidance": 2.0},
    "flux": {"init": "latent", "lr": 2e-3, "min_step_percent": 0.02, "max_step_percent": 0.98,  # SD3's; untuned
             "t_start": 1.0, "sample_steps": 28, "sample_guidance": 1.0},
    "instaflow": {"init": "randn", "lr": 3e-3, "min_step_percent": 0.1, "max_step_percent": 0.8,
                  "t_start": 0.9, "sample_steps": 20, "sample_guidance": 1.5},
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rfds-edit", description=__doc__, formatter_class=common.HelpFormatter)
    ap.add_argument("--image", required=True, help="RGB input image (RGBA is composited over white, gray is rejected)")
    ap.add_argument("--source-prompt", required=True, help="prompt describing the input image")
    ap.add_argument("--target-prompt", required=True, help="prompt of the edit")
    ap.add_argument("--rgba", default="composite", help="composite (over white, noted in run.json) or reject")
    common.add_model_args(ap)
    g = ap.add_argument_group("inversion (defaults depend on --model, see above)")
    g.add_argument("--method", default="adam", help="adam (irfds_loss + AdamW, the paper) or update (fixed point)")
    g.add_argument("--steps", type=int, default=500)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--init", default=None, help="latent (ε starts at E(image)) or randn")
    g.add_argument("--min-step-percent", type=float, default=None)
    g.add_argument("--max-step-percent", type=float, default=None)
    g.add_argument("--inversion-guidance", type=float, default=1.0, help="CFG scale inside iRFDS (reference: 1)")
    g.add_argument("--reg-weight", type=float, default=1.0, help="weight of R(ε)")
    g.add_argument("--schedule", default="model",
                   help="iRFDS times (--method adam): model (t from the step percents, correctly labelled) or "
                        "reference (the paper code's: SD3 15-point grid, InstaFlow mislabelled levels; docs/math.md §4.4)")
    s = ap.add_argument_group("regeneration and edit")
    s.add_argument("--t-start", type=float, default=None, help="noise level t0 the sampler starts from (1 = pure ε)")
    s.add_argument("--sample-steps", type=int, default=None)
    s.add_argument("--sample-guidance", type=float, default=None)
    s.add_argument("--edit-rfds-steps", type=int, default=0, help="RFDS steps on the edited latent (target prompt)")
    s.add_argument("--edit-rfds-lr", type=float, default=1e-2)
    s.add_argument("--edit-rfds-guidance", type=float, default=7.5)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--nonfinite", default="error",
                    help="NaN/inf in the model output: error (stop, save nothing) or zero (replace by 0, count)")
    common.add_output_args(ap, "outputs/rfds-edit/<source>-to-<target>, prompts shortened to 24 characters")
    return ap


def check_args(args: argparse.Namespace) -> None:
    from ..checks import check_choice, check_guidance_scale, check_range

    common.check_model_args(args)
    check_choice("--method", args.method, ("adam", "update"))
    check_choice("--rgba", args.rgba, ("composite", "reject"))
    check_choice("--schedule", args.schedule, ("model", "reference"))
    if args.schedule == "reference" and args.method != "adam":
        raise ValueError(f"--schedule reference is the paper's schedule for --method adam, got --method {args.method}")
    for k, v in FAMILY_DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_choice("--init", args.init, ("latent", "randn"))
    check_range("--t-start", args.t_start, 1e-3, 1.0)
    check_range("--min-step-percent", args.min_step_percent, 0.0, 1.0)
    check_range("--max-step-percent", args.max_step_percent, args.min_step_percent, 1.0)
    for name in ("steps", "sample_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.edit_rfds_steps < 0:
        raise ValueError(f"--edit-rfds-steps must be >= 0, got {args.edit_rfds_steps}")
    check_choice("--nonfinite", args.nonfinite, ("error", "zero"))
    common.check_numbers(args, positive=("lr", "edit_rfds_lr"), at_least={"height": 1, "width": 1},
                         finite=("inversion_guidance", "reg_weight", "sample_guidance", "edit_rfds_guidance"))
    if args.reg_weight < 0:
        raise ValueError(f"--reg-weight must be >= 0, got {args.reg_weight}")
    for name in ("inversion_guidance", "sample_guidance", "edit_rfds_guidance"):
        check_guidance_scale(getattr(args, name), "--" + name.replace("_", "-"))
    common.check_model_files(args)  # family and --height/--width from the config files, before any load
    if args.out is None:
        from ..bench.suite import slugify

        args.out = os.path.join("outputs", "rfds-edit", f"{slugify(args.source_prompt, 24)}-to-{slugify(args.target_prompt, 24)}")


def load_input(args: argparse.Namespace):
    """The input image resized to --height × --width, as an array and notes on the conversion."""
    arr, notes = images.load_rgb(args.image, rgba=args.rgba)
    h, w = arr.shape[:2]
    if (h, w) != (args.height, args.width):
        notes.append(f"resized from {w}x{h} to {args.width}x{args.height}")
        arr = images.resize(arr, args.height, args.width)
    return arr, notes


def invert(backend, x0, cond, uncond, args, gen) -> Dict[str, object]:
    """iRFDS: the noise ε that the flow carries to x0 (see the module docstring)."""
    from tqdm.auto import tqdm

    from ..rfds import irfds_loss, irfds_update, noise_regulariser

    eps0 = x0.clone() if args.init == "latent" else torch.randn(x0.shape, generator=gen).to(x0)
    history: Dict[str, List[float]] = {"step": [], "loss": [], "grad_norm": [], "noise_reg": []}
    bar = tqdm(range(1, args.steps + 1), desc=f"iRFDS ({args.method})", disable=args.no_progress, dynamic_ncols=True)
    if args.method == "adam":
        eps = eps0.requires_grad_(True)
        opt = torch.optim.AdamW([eps], lr=args.lr, weight_decay=0.0)
        for step in bar:
            out = irfds_loss(backend, x0, eps, cond, uncond=uncond, guidance_scale=args.inversion_guidance,
                             min_step_percent=args.min_step_percent, max_step_percent=args.max_step_percent,
                             reg_weight=args.reg_weight, generator=gen, schedule=args.schedule,
                             nonfinite=args.nonfinite)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            _log(history, step, float(out.loss.detach()), float(out.grad.norm()), float(noise_regulariser(eps.detach())), bar)
        eps = eps.detach()
    else:
        eps = eps0
        for step in bar:
            t = backend.convention.sample_time(x0.shape[0], args.min_step_percent, args.max_step_percent,
                                               generator=gen).to(x0.device)
            new = irfds_update(backend, x0, eps, t, cond, step_size="auto",
                               guidance_scale=args.inversion_guidance, uncond=uncond, nonfinite=args.nonfinite)
            _log(history, step, float((new - eps).pow(2).mean()), float((new - eps).norm()),
                 float(noise_regulariser(new)), bar)
            eps = new
    return {"eps": eps, "history": history}


def _log(history, step, loss, grad_norm, reg, bar) -> None:
    for k, v in zip(("step", "loss", "grad_norm", "noise_reg"), (step, loss, grad_norm, reg)):
        history[k].append(v)
    bar.set_postfix(loss=f"{loss:.4g}", reg=f"{reg:.3g}")


@torch.no_grad()
def regenerate(backend, eps, x0, t_start: float, cond, uncond, scale: float, steps: int) -> torch.Tensor:
    """Euler-sample from x_{t0} = t0·ε + (1 − t0)·x0 to t = 0.  t0 = 1 uses the backend's sampler;
    t0 < 1 integrates ``steps`` Euler steps on the backend's shifted grid cut at t0."""
    from .. import flow
    from ..protocol import cfg_velocity

    if t_start >= 1.0:
        return backend.sample(cond, uncond, scale, steps, latents=eps)
    s = backend.convention.shift
    u0 = t_start / (s - (s - 1.0) * t_start)  # shift⁻¹(t0)
    grid = flow.time_grid(steps, shift=s, t_max=u0, device=eps.device)
    x = flow.interpolate(x0, eps, torch.full((eps.shape[0],), t_start, device=eps.device))
    return flow.euler_sample(lambda x_, t: cfg_velocity(backend, x_, t, cond, uncond, scale), x, grid)


def refine_edit(backend, z, cond, uncond, args, gen) -> torch.Tensor:
    """Optional RFDS steps on the edited latent with the target prompt (AdamW)."""
    from ..rfds import rfds

    z = z.clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=args.edit_rfds_lr, weight_decay=0.0)
    for _ in range(args.edit_rfds_steps):
        out = rfds(backend, z, cond, uncond, args.edit_rfds_guidance, generator=gen, nonfinite=args.nonfinite)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return z.detach()


def run(args: argparse.Namespace) -> Dict[str, object]:
    arr, notes = load_input(args)  # image errors before the (slow) model load
    t0 = time.time()
    backend = common.load_model(args, "model")  # sampling needs the model's own time convention
    common.check_size(backend, args.height, args.width)
    src_c, src_u = common.encode_pair(args, backend, args.source_prompt)
    tgt_c, tgt_u = common.encode_pair(args, backend, args.target_prompt)
    gen = common.seed_everything(args.seed)
    with torch.no_grad():
        x0 = backend.encode(images.to_tensor(arr, backend.device)).float()
        vae_only = images.to_numpy(backend.decode(x0))[0]
    backend = for_latents(backend, x0)  # FLUX.1 [dev]: the time shift of this latent size
    args = argparse.Namespace(**{**vars(args), **{  # the CFG scales applied (FLUX "distilled": no negative pass)
        k: common.cfg_scale(backend, getattr(args, k)) for k in ("inversion_guidance", "sample_guidance",
                                                                  "edit_rfds_guidance")}})
    t1 = time.time()
    inv = invert(backend, x0, src_c, src_u, args, gen)
    t2 = time.time()
    eps = inv["eps"]
    recon_z = regenerate(backend, eps, x0, args.t_start, src_c, src_u, args.sample_guidance, args.sample_steps)
    edit_z = regenerate(backend, eps, x0, args.t_start, tgt_c, tgt_u, args.sample_guidance, args.sample_steps)
    if args.edit_rfds_steps:
        edit_z = refine_edit(backend, edit_z, tgt_c, tgt_u, args, gen)
    with torch.no_grad():
        recon = images.to_numpy(backend.decode(recon_z))[0]
        edit = images.to_numpy(backend.decode(edit_z))[0]
    t3 = time.time()
    return {"source": arr, "vae_only": vae_only, "reconstruction": recon, "edit": edit, "history": inv["history"],
            "notes": notes, "eps_mean": float(eps.mean()), "eps_std": float(eps.std()),
            "timing_s": {"load": t1 - t0, "invert": t2 - t1, "sample_and_decode": t3 - t2}}


def _say(msg: str, code: int) -> int:
    print(f"rfds-edit: {msg}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
        stage = common.stage_output(args, "rfds-edit")  # --out checked before any work
    except ValueError as e:
        return _say(f"error: {e}", common.EXIT_USAGE)
    try:
        with common.sigterm_as_interrupt(), common.library_progress(not args.no_progress):
            res = run(args)
            metrics = save_outputs(res, args, argv, stage.path)
            stage.publish()
    except NonFiniteError as e:
        return _say(f"error: {e}; nothing saved ({args.out} unchanged)", common.EXIT_FAILED)
    except (ValueError, OSError) as e:
        return _say(f"error: {e}", common.EXIT_USAGE)
    except KeyboardInterrupt:
        return _say(f"interrupted; nothing saved ({args.out} unchanged)", common.EXIT_INTERRUPTED)
    finally:
        stage.discard()  # whatever was not published
    for n in res["notes"]:
        print(f"rfds-edit: note: {n}")
    print(f"rfds-edit: reconstruction PSNR {metrics['psnr_reconstruction_db']:.2f} dB "
          f"(VAE round trip {metrics['psnr_vae_roundtrip_db']:.2f} dB); outputs in {args.out}")
    return 0


def save_outputs(res: Dict[str, object], args: argparse.Namespace, argv, folder: str) -> Dict[str, float]:
    """The images, the titled comparison, the curves and run.json in ``folder``; returns the metrics."""
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    metrics = {"psnr_reconstruction_db": images.psnr(res["source"], res["reconstruction"]),
               "psnr_vae_roundtrip_db": images.psnr(res["source"], res["vae_only"]),
               "final_inversion_loss": res["history"]["loss"][-1], "eps_mean": res["eps_mean"], "eps_std": res["eps_std"]}
    for k in ("source", "reconstruction", "edit"):
        images.save_png(res[k], p(f"{k}.png"))
    titles = [f"source: {args.source_prompt}",
              f"reconstruction\nPSNR {metrics['psnr_reconstruction_db']:.2f} dB",
              f"edit: {args.target_prompt}"]
    panels = [images.upscale(res[k], 192) for k in ("source", "reconstruction", "edit")]
    images.save_png(images.hstack(images.titled(panels, titles), pad=6), p("comparison.png"))
    common.plot_curves(res["history"], p("curves.png"), title=f"iRFDS inversion: {args.source_prompt}")
    record = common.run_record(
        "rfds-edit", args, argv, status="complete", metrics=metrics, notes=res["notes"], timing_s=res["timing_s"],
        outputs=["source.png", "reconstruction.png", "edit.png", "comparison.png", "curves.png"],
        psnr_definition="10·log10(1 / mean((source − reconstruction)²)) on float64 images in [0, 1]",
        peak_cuda_mem_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
    write_json(p("run.json"), record)
    return metrics


if __name__ == "__main__":
    sys.exit(main())
