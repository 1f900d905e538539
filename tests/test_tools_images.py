"""tools/images.py: PSNR in float (no uint8 wrap-around), image loading policy and its errors."""
import math

import numpy as np
import pytest
from PIL import Image

from threestudio_rfds.tools.images import ImageInputError, grid, hstack, load_rgb, psnr, resize, to_uint8


def test_psnr_does_not_overflow_uint8():
    a = np.array([[10, 0]], np.uint8)
    b = np.array([[250, 255]], np.uint8)
    # uint8 subtraction would wrap (10 − 250 → 26, 0 − 255 → 1) and report ~38 dB
    mse = ((10 - 250) ** 2 + 255**2) / 2
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr(a, b) < 1.0
    assert psnr(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)) == pytest.approx(0.0)


def test_psnr_float_images_and_identity():
    x = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    assert psnr(x, x) == math.inf
    assert psnr(x, np.clip(x + 0.1, 0, 2)) == pytest.approx(20.0, abs=1e-4)  # mse 0.01 on [0, 1]
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:4])


def _save(path, arr):
    Image.fromarray(arr).save(path)
    return str(path)


def test_load_rgb_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    arr, notes = load_rgb(_save(tmp_path / "a.png", rgb))
    assert arr.shape == (20, 24, 3) and arr.dtype == np.float32 and notes == []
    np.testing.assert_allclose(arr, rgb / 255.0, atol=1e-6)

    rgba = np.concatenate([rgb, np.zeros((20, 24, 1), np.uint8)], -1)  # fully transparent → white
    rgba[:10, :, 3] = 255
    arr, notes = load_rgb(_save(tmp_path / "b.png", rgba))
    assert "composited over a white background" in notes[0]
    np.testing.assert_allclose(arr[10:], 1.0)
    np.testing.assert_allclose(arr[:10], rgb[:10] / 255.0, atol=1e-6)
    with pytest.raises(ImageInputError, match="alpha channel"):
        load_rgb(str(tmp_path / "b.png"), rgba="reject")


@pytest.mark.parametrize("kind, match", [("gray", "grayscale image"), ("tiny", "at least 16"),
                                         ("missing", "does not exist"), ("text", "cannot read")])
def test_load_rgb_errors(tmp_path, kind, match):
    p = tmp_path / "x.png"
    if kind == "gray":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)
    elif kind == "tiny":
        Image.fromarray(np.zeros((8, 40, 3), np.uint8)).save(p)
    elif kind == "text":
        p.write_text("not an image")
    with pytest.raises(ImageInputError, match=match):
        load_rgb(str(p))


def test_layout_helpers():
    a, b = np.zeros((4, 5, 3), np.float32), np.ones((4, 5, 3), np.float32)
    assert hstack([a, b], pad=2).shape == (4, 12, 3)
    g = grid([a, b, a], ncols=2, pad=1)
    assert g.shape == (9, 11, 3) and g[5:, 6:].min() == 1.0  # the empty cell is fill
    assert resize(np.random.rand(10, 10, 3).astype(np.float32), 5, 7).shape == (5, 7, 3)
    assert to_uint8(np.array([0.0, 0.5, 1.0, 2.0])).tolist() == [0, 128, 255, 255]
