"""The standard 3DGS PLY file (docs/gaussians.md §4) and point-cloud reading.

Layout (one ``vertex`` element, little-endian float32, the order of the original 3DGS code that
splat viewers and gsplat's ``export_splats`` use, with its zero normals)::

    x y z · nx ny nz · f_dc_0..2 · f_rest_0..3(K−1)−1 · opacity · scale_0..2 · rot_0..3

``f_rest`` is channel-major (all red coefficients, then green, then blue); ``opacity`` is the
logit and ``scale_*`` the log σ, as trained."""
from __future__ import annotations

import math
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_write
from .params import PARAM_NAMES, sh0_to_rgb

_TYPES = {"float": "f4", "float32": "f4", "double": "f8", "float64": "f8", "uchar": "u1", "uint8": "u1",
          "char": "i1", "int8": "i1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
          "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4"}
_ORDER = {"binary_little_endian": "<", "binary_big_endian": ">"}


class PlyError(ValueError):
    """A PLY file this module cannot read, or splats it will not write; the message names the file."""


def splat_fields(num_rest: int) -> List[str]:
    """The property names, in file order, for ``num_rest`` = 3(K−1) higher-order coefficients."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(num_rest)] + ["opacity", "scale_0", "scale_1", "scale_2"]
            + [f"rot_{i}" for i in range(4)])


def splat_table(splats: Dict[str, Tensor]) -> Tuple[List[str], np.ndarray]:
    """(field names, float32 rows [N, F]) of a splat set; refuses wrong shapes and NaN/inf (a viewer
    would show garbage, and gsplat's exporter would silently drop those splats)."""
    missing = [k for k in PARAM_NAMES if k not in splats]
    if missing:
        raise PlyError(f"splats lack {missing}; a splat set has {list(PARAM_NAMES)}")
    means = splats["means"].detach().float().cpu()
    n = means.shape[0]
    shapes = {"means": (n, 3), "scales": (n, 3), "quats": (n, 4), "opacities": (n,), "sh0": (n, 1, 3)}
    for k, shape in shapes.items():
        if tuple(splats[k].shape) != shape:
            raise PlyError(f"splats[{k!r}] has shape {tuple(splats[k].shape)}, expected {shape}")
    shN = splats["shN"].detach().float().cpu()
    if shN.ndim != 3 or shN.shape[0] != n or shN.shape[2] != 3:
        raise PlyError(f"splats['shN'] has shape {tuple(shN.shape)}, expected ({n}, K-1, 3)")
    cols = [means, torch.zeros(n, 3), splats["sh0"].detach().float().cpu().reshape(n, 3),
            shN.permute(0, 2, 1).reshape(n, -1), splats["opacities"].detach().float().cpu()[:, None],
            splats["scales"].detach().float().cpu(), splats["quats"].detach().float().cpu()]
    table = torch.cat(cols, dim=1).numpy()
    bad = ~np.isfinite(table).all(axis=1)
    if bad.any():
        raise PlyError(f"{int(bad.sum())} of {n} splats hold NaN/inf parameters; not writing a PLY of them")
    return splat_fields(shN.shape[1] * 3), table


def write_splat_ply(path: str, splats: Dict[str, Tensor]) -> str:
    """Write ``splats`` as a binary 3DGS PLY at ``path``, atomically (a reader sees the old file or
    the whole new one; a full disk leaves the old one)."""
    fields, table = splat_table(splats)
    header = ("ply\nformat binary_little_endian 1.0\n" + f"element vertex {table.shape[0]}\n"
              + "".join(f"property float {f}\n" for f in fields) + "end_header\n").encode("ascii")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PlyError(f"PLY path {path!r} is a folder; name a file")
    if not os.path.isdir(parent):
        raise PlyError(f"the folder of PLY path {path!r} does not exist")

    size = len(header) + table.size * 4
    free = shutil.disk_usage(parent).free
    if free < size:
        raise PlyError(f"cannot write PLY {path!r}: it needs {size} bytes and its disk has {free} free")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(table.astype("<f4").tobytes())

    try:
        return atomic_write(path, write)
    except OSError as e:
        raise PlyError(f"cannot write PLY {path!r}: {e.strerror or e}; any earlier file there is unchanged") from e


def _header(f, path: str) -> Tuple[str, List[Tuple[str, int, List[Tuple[str, str]]]]]:
    if f.readline().strip() != b"ply":
        raise PlyError(f"{path!r} is not a PLY file (no 'ply' magic line)")
    fmt, elements = None, []
    while True:
        line = f.readline()
        if not line:
            raise PlyError(f"{path!r}: the PLY header has no end_header line")
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise PlyError(f"{path!r}: a property before any element")
            if words[1] == "list":
                elements[-1][2].append((words[-1], "list"))
            elif words[1] in _TYPES:
                elements[-1][2].append((words[2], _TYPES[words[1]]))
            else:
                raise PlyError(f"{path!r}: unknown PLY property type {words[1]!r}")
    if fmt not in ("ascii", *_ORDER):
        raise PlyError(f"{path!r}: PLY format {fmt!r} is not one of ascii, binary_little_endian, binary_big_endian")
    return fmt, elements


def read_vertices(path: str) -> Dict[str, np.ndarray]:
    """The ``vertex`` element of a PLY file as {property: array [N]} (scalar properties only; the
    vertex element must come first, as in point clouds and 3DGS files)."""
    if not os.path.isfile(path):
        raise PlyError(f"point-cloud file {path!r} does not exist")
    with open(path, "rb") as f:
        fmt, elements = _header(f, path)
        if not elements or elements[0][0] != "vertex":
            raise PlyError(f"{path!r}: the first PLY element must be 'vertex', got {[e[0] for e in elements]}")
        _, n, props = elements[0]
        if any(t == "list" for _, t in props):
            raise PlyError(f"{path!r}: list properties in the vertex element are not supported")
        if fmt == "ascii":
            rows = np.loadtxt(f, max_rows=n, ndmin=2, dtype=np.float64)
            if rows.shape != (n, len(props)):
                raise PlyError(f"{path!r}: expected {n} vertex rows of {len(props)} values, got {rows.shape}")
            return {name: rows[:, i].astype(t) for i, (name, t) in enumerate(props)}
        dtype = np.dtype([(name, _ORDER[fmt] + t) for name, t in props])
        raw = f.read(dtype.itemsize * n)
        if len(raw) < dtype.itemsize * n:
            raise PlyError(f"{path!r} is truncated: {len(raw) // dtype.itemsize} of {n} vertices")
        data = np.frombuffer(raw, dtype=dtype)
        return {name: data[name].astype(data[name].dtype.newbyteorder("=")) for name, _ in props}


def read_splat_ply(path: str) -> Dict[str, Tensor]:
    """A 3DGS PLY back into a splat set (inverse of :func:`write_splat_ply`)."""
    v = read_vertices(path)
    missing = [k for k in splat_fields(0) if k not in v and k not in ("nx", "ny", "nz")]  # normals are optional
    if missing:
        raise PlyError(f"{path!r} is not a 3DGS PLY: it lacks {missing}")
    col = lambda names: torch.from_numpy(np.stack([v[k] for k in names], axis=1).astype(np.float32))  # noqa: E731
    n_rest = len([k for k in v if k.startswith("f_rest_")])
    if n_rest % 3:
        raise PlyError(f"{path!r}: {n_rest} f_rest_* properties is not a multiple of 3")
    n = len(v["x"])
    rest = col([f"f_rest_{i}" for i in range(n_rest)]) if n_rest else torch.zeros(n, 0)
    return {"means": col(["x", "y", "z"]), "scales": col([f"scale_{i}" for i in range(3)]),
            "quats": col([f"rot_{i}" for i in range(4)]), "opacities": col(["opacity"])[:, 0],
            "sh0": col(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :],
            "shN": rest.reshape(n, 3, n_rest // 3).permute(0, 2, 1).contiguous()}


def sh_degree_of(splats: Dict[str, Tensor]) -> int:
    """The SH degree d with (d+1)² = 1 + shN.shape[1]."""
    k = 1 + splats["shN"].shape[1]
    d = int(round(math.sqrt(k))) - 1
    if (d + 1) ** 2 != k:
        raise PlyError(f"{k} SH coefficients per channel is not a square (d+1)²")
    return d


def read_point_cloud(path: str) -> Tuple[Tensor, Optional[Tensor]]:
    """(xyz [N,3], rgb [N,3] in [0,1] or None) from a PLY point cloud (``x y z`` and optionally
    ``red green blue`` as uchar or float, or a 3DGS file's ``f_dc_*``) or a ``.npy``/``.npz`` array
    of shape [N,3] or [N,6] (xyz then rgb in [0,1]; an ``.npz`` holds it as ``points``)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".npy", ".npz"):
        if not os.path.isfile(path):
            raise PlyError(f"point-cloud file {path!r} does not exist")
        arr = np.load(path)
        if ext == ".npz":
            if "points" not in arr:
                raise PlyError(f"{path!r} has arrays {list(arr.keys())}; the point cloud must be named 'points'")
            arr = arr["points"]
        if arr.ndim != 2 or arr.shape[1] not in (3, 6):
            raise PlyError(f"{path!r} holds an array of shape {arr.shape}; expected [N, 3] or [N, 6]")
        t = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        return t[:, :3], (t[:, 3:6] if arr.shape[1] == 6 else None)
    if ext != ".ply":
        raise PlyError(f"point-cloud file {path!r}: expected a .ply, .npy or .npz file")
    v = read_vertices(path)
    if not all(k in v for k in "xyz"):
        raise PlyError(f"{path!r} has vertex properties {list(v)}; a point cloud needs x, y, z")
    xyz = torch.from_numpy(np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32))
    if all(k in v for k in ("red", "green", "blue")):
        rgb = np.stack([v["red"], v["green"], v["blue"]], axis=1)
        rgb = rgb.astype(np.float32) / (255.0 if rgb.dtype == np.uint8 else 1.0)
        return xyz, torch.from_numpy(rgb)
    if all(f"f_dc_{i}" in v for i in range(3)):
        dc = torch.from_numpy(np.stack([v[f"f_dc_{i}"] for i in range(3)], axis=1).astype(np.float32))
        return xyz, sh0_to_rgb(dc).clamp(0, 1)
    return xyz, None
