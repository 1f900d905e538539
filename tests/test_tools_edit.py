"""rfds-edit on the tiny models: outputs, the run record, float PSNR, and input errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from threestudio_rfds.tools.edit import main
from threestudio_rfds.tools.images import psnr

SMALL = ["--steps", "4", "--sample-steps", "3", "--height", "32", "--width", "32", "--no-progress"]


@pytest.fixture
def rgb_image(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    p = str(tmp_path / "in.png")
    Image.fromarray(arr).save(p)
    return p


def _edit(tmp_path, image, model, path, *extra):
    out = str(tmp_path / f"out-{model}")
    assert main(["--image", image, "--source-prompt", "a cat", "--target-prompt", "a tiger", "--model", model,
                 "--pretrained", path, "--out", out, *SMALL, *extra]) == 0
    with open(os.path.join(out, "run.json")) as f:
        return out, json.load(f)


def _png(out, name):
    return np.asarray(Image.open(os.path.join(out, name)).convert("RGB"))


def test_sd3_edit_outputs_and_psnr(tmp_path, tiny_sd3_path, rgb_image):
    out, rec = _edit(tmp_path, rgb_image, "sd3", tiny_sd3_path, "--edit-rfds-steps", "1")
    for f in ["source.png", "reconstruction.png", "edit.png", "comparison.png", "curves.png"]:
        assert os.path.exists(os.path.join(out, f)), f
    s = rec["settings"]
    assert s["init"] == "latent" and s["t_start"] == 1.0 and s["sample_guidance"] == 2.0  # SD3 reference defaults
    assert rec["notes"] == ["resized from 48x40 to 32x32"]
    comp = _png(out, "comparison.png")  # three panels enlarged to 192 px, each under a title band
    assert comp.shape[1] == 3 * 192 + 2 * 6 and comp.shape[0] > 192 and (comp[:10] == 255).mean() > 0.8
    m = rec["metrics"]
    # the recorded PSNR is the float PSNR of the images that were saved (up to 8-bit rounding)
    assert m["psnr_reconstruction_db"] == pytest.approx(psnr(_png(out, "source.png"), _png(out, "reconstruction.png")), abs=0.3)
    assert 0 < m["psnr_reconstruction_db"] < 60 and np.isfinite(m["psnr_vae_roundtrip_db"])
    assert len(rec["argv"]) > 0 and rec["versions"]["torch"]


def test_instaflow_fixed_point_inversion(tmp_path, tiny_instaflow_path, rgb_image):
    out, rec = _edit(tmp_path, rgb_image, "instaflow", tiny_instaflow_path, "--method", "update")
    s = rec["settings"]
    assert s["method"] == "update" and s["t_start"] == 0.9 and s["init"] == "randn"
    assert np.isfinite(rec["metrics"]["final_inversion_loss"])
    # with a different target prompt the edit differs from the reconstruction
    assert np.abs(_png(out, "edit.png").astype(int) - _png(out, "reconstruction.png").astype(int)).max() > 0


@pytest.mark.parametrize("variant,mode", [("dev", "distilled+cfg"), ("schnell", "cfg")])
def test_flux_edit(tmp_path, tiny_flux_paths, rgb_image, variant, mode):
    out, rec = _edit(tmp_path, rgb_image, "flux", tiny_flux_paths[variant], "--guidance-mode", mode,
                     "--edit-rfds-steps", "1", "--t-start", "0.8")
    s = rec["settings"]
    assert s["guidance_mode"] == mode and s["init"] == "latent" and s["sample_guidance"] == 1.0
    assert np.isfinite(rec["metrics"]["final_inversion_loss"]) and 0 < rec["metrics"]["psnr_reconstruction_db"] < 60
    assert np.abs(_png(out, "edit.png").astype(int) - _png(out, "reconstruction.png").astype(int)).max() > 0


def test_rgba_is_composited_with_a_note(tmp_path, tiny_instaflow_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = [200, 30, 30, 255]
    p = str(tmp_path / "rgba.png")
    Image.fromarray(rgba).save(p)
    out, rec = _edit(tmp_path, p, "instaflow", tiny_instaflow_path, "--steps", "1")
    assert any("RGBA input composited over a white background" in n for n in rec["notes"])
    src = _png(out, "source.png")
    assert src[0, 0].tolist() == [255, 255, 255] and src[16, 16].tolist() == [200, 30, 30]


def _write(tmp_path, kind):
    p = tmp_path / f"{kind}.png"
    if kind == "gray":
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(p)
    elif kind == "tiny":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    elif kind == "rgba":
        Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(p)
    elif kind == "rgb":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
    return str(p)


@pytest.mark.parametrize(
    "kind, extra, match",
    [
        ("missing", [], "does not exist"),
        ("gray", [], "grayscale image (PIL mode 'L'); an RGB image is required"),
        ("tiny", [], "is 8x8 pixels; both sides must be at least 16"),
        ("rgba", ["--rgba", "reject"], "has an alpha channel"),
        ("rgb", ["--model", "dalle"], "--model must be one of ['sd3', 'flux', 'instaflow']"),
        ("rgb", ["--method", "ddim"], "--method must be one of"),
        ("rgb", ["--t-start", "0"], "--t-start must be a number in"),
        ("rgb", ["--schedule", "paper"], "--schedule must be one of ['model', 'reference']"),
        ("rgb", ["--schedule", "reference", "--method", "update"], "--schedule reference is the paper's schedule for --method adam"),
    ],
)
def test_bad_inputs_have_clear_errors(tmp_path, capsys, kind, extra, match):
    image = str(tmp_path / "none.png") if kind == "missing" else _write(tmp_path, kind)
    argv = ["--image", image, "--source-prompt", "a", "--target-prompt", "b", "--model", "sd3",
            "--pretrained", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *SMALL, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rfds-edit: error:") and match in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("t_start", [0.9, 0.5])
def test_partial_regeneration_follows_the_flow(t_start):
    """regenerate starts at x_{t0} = t0·ε + (1 − t0)·x0 and integrates the flow from t0 to 0.  For
    Gaussian data N(μ, s²) the probability-flow ODE keeps (x_t − (1 − t)·μ)/σ_t constant,
    σ_t² = (1 − t)²·s² + t², so the exact end point is μ + s·(x_{t0} − (1 − t0)·μ)/σ_{t0}."""
    import torch

    from threestudio_rfds.analytic import GaussianFlow
    from threestudio_rfds.flow import sd3_convention
    from threestudio_rfds.tools.edit import regenerate

    mu, s = torch.tensor([0.7, -1.2, 0.3]), 0.5
    model = GaussianFlow(mu, s, convention=sd3_convention(shift=3.0))
    g = torch.Generator().manual_seed(0)
    eps, x0 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    out = regenerate(model, eps, x0, t_start, {}, {}, 1.0, 400)
    x_t0 = t_start * eps + (1 - t_start) * x0
    sigma = ((1 - t_start) ** 2 * s**2 + t_start**2) ** 0.5
    torch.testing.assert_close(out, mu + s * (x_t0 - (1 - t_start) * mu) / sigma, atol=1.5e-2, rtol=0)  # Euler: O(1/steps)


@pytest.mark.parametrize("model", ["sd3", "instaflow"])
def test_reference_schedule_reaches_irfds(tmp_path, tiny_sd3_path, tiny_instaflow_path, rgb_image, model, monkeypatch):
    """--schedule reference: the inversion draws the paper code's times (SD3: its 15-point grid;
    InstaFlow: noise levels 1 − k/1000, k ∈ [100, 800])."""
    import torch

    from threestudio_rfds import rfds
    from threestudio_rfds.backends.sd3 import sd3_sigmas

    seen, real = [], rfds.irfds_loss

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append((k["schedule"], out.t))
        return out

    monkeypatch.setattr(rfds, "irfds_loss", spy)
    path = tiny_sd3_path if model == "sd3" else tiny_instaflow_path
    _, rec = _edit(tmp_path, rgb_image, model, path, "--schedule", "reference", "--steps", "12")
    assert rec["settings"]["schedule"] == "reference" and len(seen) == 12
    t = torch.cat([t for _, t in seen])
    if model == "sd3":
        grid = sd3_sigmas(15, 3.0)[:15]
        assert (t[:, None] - grid[None]).abs().min(1).values.max() < 1e-6
    else:
        k = (1 - t) * 1000
        assert torch.allclose(k, k.round(), atol=1e-3) and k.min() >= 100 and k.max() <= 800
