"""Image I/O and small image utilities for the tools (PIL + numpy, no torchvision).

Arrays are float32 H×W×3 in [0, 1]; tensors are B×3×H×W in [0, 1].
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MIN_SIZE = 16


class ImageInputError(ValueError):
    """An input image that cannot be used (missing, unreadable, wrong mode, too small)."""


def load_rgb(path: str, *, rgba: str = "composite", min_size: int = MIN_SIZE) -> Tuple[np.ndarray, List[str]]:
    """Read an RGB image as float32 H×W×3 in [0, 1]; returns (array, notes).

    RGB (and palette images without transparency) load as is.  RGBA / LA-with-colour / palette with
    transparency: ``rgba="composite"`` composites over white and adds a note, ``"reject"`` raises.
    Grayscale (L, I, F, 1, LA) is rejected: the models are trained on colour images and a silent
    conversion would hide a wrong input.  Images smaller than ``min_size`` on a side are rejected.
    """
    if rgba not in ("composite", "reject"):
        raise ValueError(f"rgba must be 'composite' or 'reject', got {rgba!r}")
    if not os.path.exists(path):
        raise ImageInputError(f"input image {path!r} does not exist")
    if os.path.isdir(path):
        raise ImageInputError(f"input image {path!r} is a directory, expected an image file")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError…
        raise ImageInputError(f"cannot read {path!r} as an image: {e}") from e
    notes: List[str] = []
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("L", "LA", "I", "I;16", "F", "1"):
        raise ImageInputError(
            f"{path!r} is a grayscale image (PIL mode {mode!r}); an RGB image is required "
            "(convert it to RGB yourself if a gray input is intended)"
        )
    if mode in ("RGBA", "RGBa"):
        if rgba == "reject":
            raise ImageInputError(f"{path!r} has an alpha channel (mode {mode!r}); an RGB image is required")
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        if alpha.min() < 1.0:
            notes.append(f"{os.path.basename(path)}: RGBA input composited over a white background")
        else:
            notes.append(f"{os.path.basename(path)}: RGBA input with opaque alpha; alpha channel dropped")
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        arr = rgb * alpha[..., None] + (1.0 - alpha[..., None])
    elif mode == "RGB":
        arr = np.asarray(img, dtype=np.float32) / 255.0
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        notes.append(f"{os.path.basename(path)}: {mode} input converted to RGB")
    else:
        raise ImageInputError(f"{path!r} has unsupported PIL mode {mode!r}; an RGB image is required")
    h, w = arr.shape[:2]
    if min(h, w) < min_size:
        raise ImageInputError(f"{path!r} is {w}x{h} pixels; both sides must be at least {min_size}")
    return np.ascontiguousarray(arr, dtype=np.float32), notes


def resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an H×W×3 float image (via PIL, per channel in float)."""
    if arr.shape[:2] == (height, width):
        return arr
    chans = [np.asarray(Image.fromarray(arr[..., c]).resize((width, height), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0.0, 1.0).astype(np.float32)


def to_tensor(arr: np.ndarray, device=None, dtype=torch.float32) -> Tensor:
    """H×W×3 (or B×H×W×3) array in [0, 1] → B×3×H×W tensor."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2).to(device=device, dtype=dtype)


def to_numpy(x: Tensor) -> np.ndarray:
    """B×3×H×W tensor → B×H×W×3 float32 array clamped to [0, 1]."""
    return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 with rounding."""
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(arr: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(to_uint8(arr)).save(path)
    return path


def psnr(a: np.ndarray, b: np.ndarray, data_range: Optional[float] = None) -> float:
    """PSNR = 10·log10(R² / mean((a − b)²)) in float64 (uint8 inputs are cast first, so differences
    cannot wrap around).  R defaults to 255 for uint8 inputs and 1 otherwise; identical → inf."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {a.shape} and {b.shape}")
    if data_range is None:
        data_range = 255.0 if a.dtype == np.uint8 and b.dtype == np.uint8 else 1.0
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def hstack(images: Sequence[np.ndarray], pad: int = 4, fill: float = 1.0) -> np.ndarray:
    """Images side by side (heights must agree), separated by ``pad`` pixels of ``fill``."""
    h = images[0].shape[0]
    if any(im.shape[0] != h for im in images):
        raise ValueError(f"hstack needs equal heights, got {[im.shape[:2] for im in images]}")
    gap = np.full((h, pad, 3), fill, np.float32)
    parts: List[np.ndarray] = []
    for i, im in enumerate(images):
        parts += ([gap] if i else []) + [im.astype(np.float32)]
    return np.concatenate(parts, axis=1)


def grid(images: Sequence[np.ndarray], ncols: Optional[int] = None, pad: int = 2, fill: float = 1.0) -> np.ndarray:
    """Tile equally sized H×W×3 images row-major into a grid with ``ncols`` columns."""
    n = len(images)
    if n == 0:
        raise ValueError("grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h, w = images[0].shape[:2]
    out = np.full((nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad, 3), fill, np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = im
    return out


def upscale(arr: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor until the short side is >= ``min_side``
    (so that small images and their labels stay readable); larger images are returned as is."""
    k = math.ceil(min_side / min(arr.shape[:2]))
    return arr if k <= 1 else np.repeat(np.repeat(arr, k, axis=0), k, axis=1)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> List[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are cut."""
    lines: List[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}".strip()
            if font.getlength(cand) <= width or not line:
                line = cand
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:
                cut = len(line) - 1
                while cut > 1 and font.getlength(line[:cut]) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def titled(panels: Sequence[np.ndarray], titles: Sequence[str]) -> List[np.ndarray]:
    """Each panel with its title (wrapped to the panel's width) in a white band above it; the
    bands share one height, so the results can be put side by side with :func:`hstack`."""
    from PIL import ImageDraw

    w_min = min(p.shape[1] for p in panels)
    font = _font(max(11, min(28, w_min // 14)))
    ascent, descent = font.getmetrics()
    line_h, margin = ascent + descent + 2, 4
    wrapped = [_wrap(t, font, p.shape[1] - 2 * margin) for p, t in zip(panels, titles)]
    band_h = max(len(w) for w in wrapped) * line_h + 2 * margin
    out = []
    for p, lines in zip(panels, wrapped):
        band = Image.new("RGB", (p.shape[1], band_h), "white")
        draw = ImageDraw.Draw(band)
        for i, line in enumerate(lines):
            draw.text((margin, margin + i * line_h), line, fill="black", font=font)
        out.append(np.concatenate([np.asarray(band, dtype=np.float32) / 255.0, p.astype(np.float32)], axis=0))
    return out


def save_gif(frames: Sequence[np.ndarray], path: str, duration_ms: int = 200) -> str:
    """Animated GIF of H×W×3 float frames (loops forever)."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    ims = [Image.fromarray(to_uint8(f)) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=duration_ms, loop=0)
    return path
