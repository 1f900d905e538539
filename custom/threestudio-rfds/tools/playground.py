"""``rfds-2d``: optimise images for a prompt with RFDS or RFDS-Rev (the paper's 2D playground).

Each of N particles x_i is a free parameter — a latent z_i (``--space latent``, initialised
U[−1, 1] as the reference code) or an RGB image in [0, 1] (``--space rgb``, encoded by the VAE
every step, z_i = E(x_i), and projected back to [0, 1] after each update).  Every step draws a
batch of particles and minimises the RFDS loss, whose gradient wrt z is
g = w(t)·(v̂_cfg(z_t, t) − (ε − z)) (rfds.py), with AdamW.  RFDS-Rev first refines ε by iRFDS.

Outputs in --out: ``final_<i>.png``, ``final_grid.png`` (labelled with the step and the prompt), ``progress.gif`` and
``progress_grid.png`` (rows = saved steps, labelled), ``curves.png`` (loss, grad-norm),
``history.json`` and ``run.json`` (every setting, the command line, library versions and the
run's ``status``).  The folder is written beside --out and moved into place at the end: --out
holds one whole run or stays as it was.  Ctrl-C (or SIGTERM) during the optimisation saves the
steps done so far as a run with status "interrupted" (exit 130); a non-finite step saves them with status
"failed" (exit 1).
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
from . import common, images

DEFAULTS = {  # the reference 2D scripts' settings per model family
    "sd3": {"lr": 3e-2, "guidance_scale": 50.0},
    "flux": {"lr": 3e-2, "guidance_scale": 50.0},  # SD3's (the paper has no FLUX script; untuned)
    "instaflow": {"lr": 3e-3, "guidance_scale": 50.0},
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rfds-2d", description=__doc__, formatter_class=common.HelpFormatter)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    common.add_model_args(ap)
    g = ap.add_argument_group("optimisation")
    g.add_argument("--algorithm", default="rfds", help="rfds or rfds-rev")
    g.add_argument("--space", default="latent", help="latent (optimise z) or rgb (optimise pixels through the VAE)")
    g.add_argument("--particles", type=int, default=4, help="number of images optimised together")
    g.add_argument("--batch-size", type=int, default=None,
                   help="particles drawn (with replacement) per step; default all particles, in order")
    g.add_argument("--steps", type=int, default=800)
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (sd3 3e-2, instaflow 3e-3)")
    g.add_argument("--guidance-scale", type=float, default=None, help="CFG scale w (default 50 as the reference)")
    g.add_argument("--min-step-percent", type=float, default=0.02)
    g.add_argument("--max-step-percent", type=float, default=0.98)
    g.add_argument("--weighting", default="none", help="none, sigmoid or sds (rfds.rfds_weighting)")
    g.add_argument("--n-inner", type=int, default=1, help="RFDS-Rev: iRFDS refinements of the noise")
    g.add_argument("--grad-clip", type=float, default=None, help="clamp g element-wise to [-c, c] (default: off)")
    g.add_argument("--nonfinite", default="error",
                   help="NaN/inf in the model output: error (stop, save the steps done) or zero (replace by 0, count)")
    g.add_argument("--time-convention", default="model", help="model or reference (flow.py)")
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--width", type=int, default=512)
    o = common.add_output_args(ap, "outputs/rfds-2d/<prompt>-<algorithm>-<space>, e.g. "
                                   "outputs/rfds-2d/a_dslr_photo_of_a_hamburger-rfds-latent")
    o.add_argument("--save-every", type=int, default=None, help="steps between progress frames (default steps/10)")
    return ap


def check_args(args: argparse.Namespace) -> None:
    from ..checks import check_choice, check_guidance_scale
    from ..rfds import ALGORITHMS, NONFINITE, WEIGHTINGS

    common.check_model_args(args)
    check_choice("--algorithm", args.algorithm, ALGORITHMS)
    check_choice("--space", args.space, ("latent", "rgb"))
    check_choice("--weighting", args.weighting, WEIGHTINGS)
    check_choice("--time-convention", args.time_convention, ("model", "reference"))
    check_choice("--nonfinite", args.nonfinite, NONFINITE)
    common.check_numbers(args, positive=("lr", "grad_clip"), finite=("guidance_scale",),
                         fractions=("min_step_percent", "max_step_percent"),
                         at_least={"particles": 1, "steps": 1, "batch_size": 1, "save_every": 1, "n_inner": 0,
                                   "height": 1, "width": 1})
    if args.min_step_percent > args.max_step_percent:
        raise ValueError(f"--min-step-percent ({args.min_step_percent}) must be <= --max-step-percent "
                         f"({args.max_step_percent})")
    args.batch_size = args.particles if args.batch_size is None else args.batch_size
    d = DEFAULTS[args.model]
    args.lr = d["lr"] if args.lr is None else args.lr
    args.guidance_scale = d["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    args.save_every = args.save_every or max(1, args.steps // 10)
    check_guidance_scale(args.guidance_scale, "--guidance-scale")
    common.check_model_files(args)  # family and --height/--width from the config files, before any load
    if args.out is None:
        from ..bench.suite import slugify

        args.out = os.path.join("outputs", "rfds-2d", f"{slugify(args.prompt)}-{args.algorithm}-{args.space}")


def init_particles(backend, args, gen: torch.Generator) -> torch.Tensor:
    """Latent space: U[−1, 1] of shape [N, C, H/f, W/f] (reference); RGB: U[0, 1] of [N, 3, H, W]."""
    if args.space == "latent":
        h, w = backend.latent_shape(args.height, args.width)
        x = 2 * torch.rand(args.particles, backend.latent_channels, h, w, generator=gen) - 1
    else:
        x = torch.rand(args.particles, 3, args.height, args.width, generator=gen)
    return x.to(backend.device).requires_grad_(True)


@torch.no_grad()
def to_images(backend, params: torch.Tensor, space: str) -> List:
    rgb = params if space == "rgb" else torch.cat([backend.decode(params[i:i + 1]) for i in range(params.shape[0])])
    return list(images.to_numpy(rgb))


def optimise(backend, cond, uncond, args, log=None) -> Dict[str, object]:
    """The optimisation loop; returns {"params", "history", "frames": [(step, [images])], "status",
    "completed_steps", "error"}.  Ctrl-C/SIGTERM (status "interrupted": the current step is
    finished first; a second signal stops at once) or a non-finite step (status "failed") end it
    early with the steps completed so far; the last frame is the state then."""
    from tqdm.auto import tqdm

    from ..protocol import for_latents
    from ..rfds import rfds, rfds_rev

    gen = common.seed_everything(args.seed)
    params = init_particles(backend, args, gen)
    opt = torch.optim.AdamW([params], lr=args.lr, weight_decay=0.0)
    history: Dict[str, List[float]] = {"step": [], "loss": [], "grad_norm": [], "t_mean": []}
    frames = [(0, to_images(backend, params.detach(), args.space))]
    kw = dict(min_step_percent=args.min_step_percent, max_step_percent=args.max_step_percent,
              weighting=args.weighting, grad_clip=args.grad_clip, generator=gen, nonfinite=args.nonfinite)
    if args.algorithm == "rfds-rev":
        kw["n_inner"] = args.n_inner
    fn = rfds_rev if args.algorithm == "rfds-rev" else rfds
    scale = common.cfg_scale(backend, args.guidance_scale)
    bar = tqdm(range(1, args.steps + 1), desc=f"{args.algorithm} ({args.space})", disable=args.no_progress,
               dynamic_ncols=True)
    status, error, done = "complete", None, 0
    try:
        with common.stop_requests() as stop:
            for step in bar:
                if stop():
                    status = "interrupted"
                    break
                if args.batch_size == args.particles:
                    x = params
                else:
                    x = params[torch.randint(0, args.particles, (args.batch_size,), generator=gen).to(params.device)]
                z = x if args.space == "latent" else backend.encode(x)
                out = fn(for_latents(backend, z), z, cond, uncond, scale, **kw)  # FLUX [dev]: z's shift
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                if args.space == "rgb":
                    with torch.no_grad():
                        params.clamp_(0.0, 1.0)
                logs = {k: float(v) for k, v in out.logs().items()}
                history["step"].append(step)
                for k in ("loss", "grad_norm", "t_mean"):
                    history[k].append(logs[k])
                done = step
                bar.set_postfix(loss=f"{logs['loss']:.4g}", grad=f"{logs['grad_norm']:.3g}")
                if step % args.save_every == 0 or step == args.steps:
                    frames.append((step, to_images(backend, params.detach(), args.space)))
    except KeyboardInterrupt:
        status = "interrupted"
    except NonFiniteError as e:
        status, error = "failed", f"step {done + 1}: {e}"
    finally:
        bar.close()
    history = {k: v[:done] for k, v in history.items()}  # an interrupted step may have logged part of its record
    if status != "complete" and done and frames[-1][0] != done:
        frames.append((done, to_images(backend, params.detach(), args.space)))
    return {"params": params.detach(), "history": history, "frames": frames, "status": status,
            "completed_steps": done, "error": error}


def save_outputs(res: Dict[str, object], args, folder: str) -> Dict[str, object]:
    """Images, history and curves of ``res`` in ``folder`` (the staged output folder)."""
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    step, final = res["frames"][-1]
    files = [images.save_png(im, p(f"final_{i}.png")) for i, im in enumerate(final)]
    label = f"step {step}: {args.prompt}" + ("" if res["status"] == "complete" else f" ({res['status']})")
    files.append(images.save_png(images.titled([images.grid([images.upscale(im) for im in final])], [label])[0],
                                 p("final_grid.png")))
    rows = [images.titled([images.hstack([images.upscale(im) for im in ims], pad=2)], [f"step {s}"])[0]
            for s, ims in res["frames"]]
    files.append(images.save_png(images.grid(rows, ncols=1, pad=6), p("progress_grid.png")))
    gif = [images.titled([images.upscale(images.grid(ims))], [f"step {s}"])[0] for s, ims in res["frames"]]
    files.append(images.save_gif(gif, p("progress.gif")))
    files.append(write_json(p("history.json"), res["history"]))  # the data before its plot
    status = "" if res["status"] == "complete" else f" ({res['status']} after step {res['completed_steps']})"
    files.append(common.plot_curves(res["history"], p("curves.png"),
                                    title=f"{args.algorithm} / {args.model} / {args.space}: {args.prompt}{status}"))
    return {"files": [os.path.basename(f) for f in files], "frame_steps": [s for s, _ in res["frames"]]}


def _say(msg: str, code: int) -> int:
    print(f"rfds-2d: {msg}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_args(args)
        stage = common.stage_output(args, "rfds-2d")  # --out checked before any work
    except ValueError as e:
        return _say(f"error: {e}", common.EXIT_USAGE)
    try:
        with common.sigterm_as_interrupt(), common.library_progress(not args.no_progress):
            return _run(args, argv, stage)
    finally:
        stage.discard()  # whatever was not published


def _run(args, argv, stage) -> int:
    t0 = time.time()
    try:
        backend = common.load_model(args, args.time_convention)
        common.check_size(backend, args.height, args.width)
        cond, uncond = common.encode_pair(args, backend, args.prompt, args.negative_prompt)
        t1 = time.time()
        print(f"rfds-2d: optimising {args.steps} steps (Ctrl-C stops after the step and saves the steps done)",
              file=sys.stderr, flush=True)
        res = optimise(backend, cond, uncond, args)
    except (ValueError, OSError) as e:
        return _say(f"error: {e}", common.EXIT_USAGE)
    except KeyboardInterrupt:
        return _say(f"interrupted; nothing saved ({args.out} unchanged)", common.EXIT_INTERRUPTED)
    t2 = time.time()
    done, status = res["completed_steps"], res["status"]
    code = {"complete": 0, "interrupted": common.EXIT_INTERRUPTED, "failed": common.EXIT_FAILED}[status]
    if res["error"]:
        _say(f"error: {res['error']}", code)
    if done == 0:
        return _say(f"no step completed; nothing saved ({args.out} unchanged)", code)
    h = res["history"]
    try:
        saved = save_outputs(res, args, stage.path)
        record = common.run_record(
            "rfds-2d", args, argv, status=status, completed_steps=done, error=res["error"], outputs=saved["files"],
            frame_steps=saved["frame_steps"], final={"loss": h["loss"][-1], "grad_norm": h["grad_norm"][-1]},
            timing_s={"load": t1 - t0, "optimise": t2 - t1, "per_step": (t2 - t1) / done},
            peak_cuda_mem_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
        write_json(os.path.join(stage.path, "run.json"), record)
        stage.publish()
    except KeyboardInterrupt:
        return _say(f"interrupted while writing the outputs; nothing saved ({args.out} unchanged)",
                    common.EXIT_INTERRUPTED)
    except OSError as e:
        return _say(f"error: cannot write the outputs ({e}); {args.out} unchanged", common.EXIT_FAILED)
    if status != "complete":
        return _say(f"{status} after step {done} of {args.steps}; the steps done are saved in {args.out} "
                    f"(run.json status {status!r})", code)
    print(f"rfds-2d: {args.steps} steps in {t2 - t1:.1f}s ({(t2 - t1) / args.steps * 1000:.0f} ms/step); "
          f"final loss {h['loss'][-1]:.4g}; outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
