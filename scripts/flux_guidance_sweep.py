"""How the RFDS gradient of FLUX.1 [dev] changes with the distilled guidance g and the CFG scale w, measured
on the tiny random [dev] of tests/tiny_flux.py (docs/math.md §2.4 holds the table this prints).

For one fixed latent x0 and prompt, the same 64 draws of (t, ε) are used for every setting (common random
numbers), so the columns compare settings, not draws:

    |g|        mean over draws of the RMS of the RFDS gradient g_RFDS = v̂ − (ε − x0)
    Δ          mean ‖g_RFDS − g_RFDS(base)‖ / ‖g_RFDS(base)‖, base = the conditional velocity (cfg, w = 1: g = 1)
    cos        cosine between the mean gradient over draws and the base's mean gradient

    python scripts/flux_guidance_sweep.py          # ~20 s on one CPU core
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

SETTINGS = ([("cfg", None, w) for w in (1.0, 2.0, 3.5, 7.5, 30.0, 100.0)]
            + [("distilled", g, None) for g in (0.0, 1.0, 2.0, 3.5, 5.0, 10.0)]
            + [("distilled+cfg", 3.5, w) for w in (1.0, 2.0, 7.5, 30.0)])
DRAWS, SEED = 64, 0


def main() -> int:
    from tiny_flux import build_tiny_flux

    from threestudio_rfds.backends.flux import FluxBackend
    from threestudio_rfds.protocol import for_latents
    from threestudio_rfds.rfds import rfds_from_noise
    from threestudio_rfds.text.flux import encode_flux_prompts

    torch.set_num_threads(1)
    path = build_tiny_flux(tempfile.mkdtemp(prefix="tiny-flux-dev-"), "dev")
    emb = encode_flux_prompts(path, ["a DSLR photo of a hamburger", ""], device="cpu", dtype="fp32")
    cond, uncond = ({k: v[i:i + 1] for k, v in emb.items()} for i in (0, 1))
    g = torch.Generator().manual_seed(SEED)
    x0 = torch.randn(1, 16, 16, 16, generator=g)  # a 32² render's latents with the tiny VAE (factor 2)
    eps = torch.randn(DRAWS, 16, 16, 16, generator=g)
    backend = FluxBackend(path, device="cpu", dtype="fp32", guidance_mode="cfg")
    model = for_latents(backend, x0)
    t = model.convention.sample_time(DRAWS, 0.02, 0.98, generator=g)
    x0s = x0.expand(DRAWS, -1, -1, -1)

    def grads(mode, dg, w):
        backend.guidance_mode = mode
        backend.set_distilled_guidance(dg)
        with torch.no_grad():
            return rfds_from_noise(model, x0s, t, eps, cond, uncond, backend.cfg_scale(w or 1.0)).grad

    base = grads("cfg", None, 1.0)
    base_norm = base.flatten(1).norm(dim=1)
    print(f"tiny FLUX.1 [dev] (random weights), {DRAWS} draws of (t, eps), t = shift(u), "
          f"s = {model.convention.shift:.3f} for 16x16 latents")
    print("| mode | g | w | \\|g_RFDS\\| (RMS) | Δ vs conditional | cos(mean, mean_base) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, dg, w in SETTINGS:
        d = grads(mode, dg, w)
        rms = d.flatten(1).pow(2).mean(1).sqrt().mean()
        delta = ((d - base).flatten(1).norm(dim=1) / base_norm).mean()
        cos = torch.nn.functional.cosine_similarity(d.mean(0).flatten(), base.mean(0).flatten(), dim=0)
        embedded = backend.embedded_guidance
        print(f"| {mode} | {embedded:g} | {'—' if w is None else f'{w:g}'} | {rms:.4f} | {delta:.4f} | {cos:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
