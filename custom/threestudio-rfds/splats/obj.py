"""A Wavefront OBJ with per-vertex colours (``v x y z r g b``), written atomically: the mesh the
splat density's marching cubes gives (docs/gaussians.md §5)."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from torch import Tensor

from ..atomic import atomic_write


def write_obj(path: str, vertices: Tensor, faces: Tensor, colors: Optional[Tensor] = None) -> str:
    """Vertices [V,3], faces [F,3] (0-based), colours [V,3] in [0,1]; faces are written 1-based."""
    v = vertices.detach().cpu().double().numpy()
    f = faces.detach().cpu().long().numpy() + 1
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"a mesh needs vertices [V, 3] and faces [F, 3], got {v.shape} and {f.shape}")
    if f.size and (f.min() < 1 or f.max() > v.shape[0]):
        raise ValueError(f"face indices must lie in [0, {v.shape[0] - 1}]")
    rows = v if colors is None else np.concatenate([v, colors.detach().cpu().double().clamp(0, 1).numpy()], axis=1)
    buf = io.StringIO()
    np.savetxt(buf, rows, fmt="v" + " %.6f" * rows.shape[1])
    np.savetxt(buf, f, fmt="f %d %d %d")

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(buf.getvalue())

    return atomic_write(path, write)
