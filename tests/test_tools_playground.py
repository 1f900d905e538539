"""rfds-2d on the tiny SD3 / FLUX.1 / InstaFlow models: outputs, run record, reproducibility, errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from threestudio_rfds.tools.playground import main

SMALL = ["--steps", "3", "--height", "32", "--width", "32", "--no-progress", "--save-every", "2"]


def _run(tmp_path, name, *extra):
    out = str(tmp_path / name)
    assert main(["--prompt", "a hamburger", "--out", out, *SMALL, *extra]) == 0
    with open(os.path.join(out, "run.json")) as f:
        return out, json.load(f)


def test_sd3_latent_rfds_rev_particles(tmp_path, tiny_sd3_path):
    out, rec = _run(tmp_path, "sd3", "--model", "sd3", "--pretrained", tiny_sd3_path, "--algorithm", "rfds-rev",
                    "--particles", "3", "--batch-size", "2")
    s = rec["settings"]
    assert s["model"] == "sd3" and s["algorithm"] == "rfds-rev" and s["particles"] == 3 and s["batch_size"] == 2
    assert s["lr"] == 3e-2 and s["guidance_scale"] == 50.0  # family defaults are resolved into the record
    assert rec["versions"]["torch"] and rec["versions"]["diffusers"] and rec["versions"]["threestudio_rfds"]
    assert rec["frame_steps"] == [0, 2, 3]
    for f in ["final_0.png", "final_1.png", "final_2.png", "final_grid.png", "progress_grid.png", "progress.gif",
              "curves.png", "history.json"]:
        assert os.path.exists(os.path.join(out, f)), f
    assert Image.open(os.path.join(out, "final_0.png")).size == (32, 32)
    grid = np.asarray(Image.open(os.path.join(out, "final_grid.png")).convert("L"))
    h, w = grid.shape  # 3 particles, 2×2, each enlarged to 128 px, under a white band with the label
    assert w >= 2 * 128 and h > w, grid.shape
    band = grid[: h - w]
    assert band.mean() > 200 and (band < 100).any()  # a white band with dark text in it
    with Image.open(os.path.join(out, "progress.gif")) as gif:
        assert gif.n_frames == 3
    with open(os.path.join(out, "history.json")) as f:
        h = json.load(f)
    assert h["step"] == [1, 2, 3] and all(np.isfinite(h["loss"])) and all(g > 0 for g in h["grad_norm"])


def test_instaflow_rgb_space_is_reproducible(tmp_path, tiny_instaflow_path):
    args = ("--model", "instaflow", "--pretrained", tiny_instaflow_path, "--space", "rgb", "--particles", "2", "--lr", "0.05")
    a, rec = _run(tmp_path, "a", *args)
    b, _ = _run(tmp_path, "b", *args)
    c, _ = _run(tmp_path, "c", *args, "--seed", "1")
    img = lambda d: np.asarray(Image.open(os.path.join(d, "final_1.png")))  # noqa: E731
    assert rec["settings"]["space"] == "rgb" and rec["settings"]["lr"] == 0.05
    np.testing.assert_array_equal(img(a), img(b))
    assert np.abs(img(a).astype(int) - img(c).astype(int)).max() > 0
    # pixels really moved from their U[0, 1] start: frame 0 of the progress grid differs from the final
    with Image.open(os.path.join(a, "progress.gif")) as gif:
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"))
    assert np.abs(first.astype(int) - last.astype(int)).mean() > 0.5


@pytest.mark.parametrize("variant,mode", [("dev", "distilled"), ("schnell", "cfg")])
def test_flux_latent_and_rgb(tmp_path, tiny_flux_paths, variant, mode):
    out, rec = _run(tmp_path, variant, "--model", "flux", "--pretrained", tiny_flux_paths[variant], "--guidance-mode",
                    mode, "--particles", "2")
    assert rec["settings"]["guidance_mode"] == mode and rec["settings"]["guidance_scale"] == 50.0
    with open(os.path.join(out, "history.json")) as f:
        h = json.load(f)
    assert all(np.isfinite(h["loss"])) and all(g > 0 for g in h["grad_norm"])
    out, _ = _run(tmp_path, variant + "-rgb", "--model", "flux", "--pretrained", tiny_flux_paths[variant], "--space",
                  "rgb", "--algorithm", "rfds-rev", "--particles", "1")
    assert Image.open(os.path.join(out, "final_0.png")).size == (32, 32)


@pytest.mark.parametrize("argv, match", [
    (["--model", "sd3", "--guidance-mode", "cfg"], "--guidance-mode and --distilled-guidance are FLUX options"),
    (["--model", "flux", "--guidance-mode", "true"], "--guidance-mode must be one of"),
    (["--model", "flux", "--distilled-guidance", "3.5"], "distilled_guidance=3.5: this FLUX model has no guidance embedding"),
    (["--model", "flux", "--dtype", "fp16"], "FLUX.1 overflows in fp16"),
])
def test_flux_bad_arguments(tmp_path, tiny_flux_paths, capsys, argv, match):
    assert main(["--prompt", "x", "--pretrained", tiny_flux_paths["schnell"], "--out", str(tmp_path / "o"), *SMALL,
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--model", "sd4"], "--model must be one of"),
        (["--algorithm", "vsd"], "--algorithm must be one of"),
        (["--space", "pixels"], "--space must be one of"),
        (["--particles", "0"], "--particles must be >= 1"),
        (["--height", "30"], "multiples of the VAE factor 8"),
    ],
)
def test_bad_arguments(tmp_path, tiny_instaflow_path, capsys, extra, match):
    argv = ["--prompt", "x", "--model", "instaflow", "--pretrained", tiny_instaflow_path, "--out", str(tmp_path / "o"),
            *SMALL, *extra]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    assert main(["--prompt", "x", "--model", "sd3", "--pretrained", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 *SMALL]) == 2
    assert "cannot load" in capsys.readouterr().err
