"""Pure-torch stand-in for the compiled CUDA module of gsplat 1.5.3 (test code only).

``gsplat.cuda._backend`` first tries ``from gsplat import csrc as _C`` and otherwise JIT-compiles
gsplat's CUDA sources (minutes, wherever nvcc exists).  :func:`install` puts this stand-in at
``sys.modules["gsplat.csrc"]`` (and into ``gsplat.cuda._backend._C`` when that module was imported
already), so gsplat's own Python -- ``gsplat.rasterization``, the autograd Functions of
``gsplat/cuda/_wrapper.py`` and the strategies -- runs unchanged, on CPU tensors.  It mirrors these
kernels of gsplat 1.5.3 (names, arguments and outputs of ``gsplat/cuda/ext.cpp``):

* ``quat_scale_to_covar_preci_fwd/_bwd`` (QuatScaleToCovarCUDA.cu);
* ``projection_ewa_3dgs_fused_fwd/_bwd`` (ProjectionEWA3DGSFused.cu), pinhole camera;
* ``spherical_harmonics_fwd/_bwd`` (SphericalHarmonicsCUDA.cu), degrees 0-4;
* ``intersect_tile``, ``intersect_offset`` (IntersectTile.cu);
* ``rasterize_to_pixels_3dgs_fwd/_bwd`` (RasterizeToPixels3DGSFwd/Bwd.cu);
* ``relocation`` (RelocationCUDA.cu), used by ``MCMCStrategy``.

Each backward recomputes its forward with torch autograd over exactly what the CUDA kernel visits
(projected pairs with radii > 0; drawn (pixel, Gaussian) pairs up to ``last_ids``), so it returns
the derivatives the kernels compute analytically (the compensation keeps the kernel's
``0.5 / (c + 1e-6)``; ``v_means2d_abs`` sums |per-pixel gradient| as the kernel does).

Not supported -- each raises NotImplementedError naming the gsplat option: ``packed=True``
projection, ``camera_model`` other than "pinhole" (so no distortion or rolling shutter),
``with_ut=True``, ``with_eval3d=True``, 2DGS (``rasterization_2dgs``), ``proj()``,
``rasterize_to_indices_in_range`` and ``SelectiveAdam``'s fused ``adam``.

Deviations: outputs the kernels leave uninitialised (culled Gaussians' means2d/depths/conics,
masked SH colours, masked tiles' alphas) are zeros here; arithmetic stays in the input dtype (the
kernels compute in float32, the rasteriser accepts float32 only), so float64 inputs allow
gradcheck; ``__expf``/``__logf`` are torch's exact exp/log.
"""
from __future__ import annotations

import enum
import math
import sys
import types
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["install", "MODULE_NAME", "GSPLAT_VERSION", "KERNELS"]

MODULE_NAME = "gsplat.csrc"
GSPLAT_VERSION = "1.5.3"
ALPHA_THRESHOLD = 1.0 / 255.0  # Common.h
MAX_ALPHA = 0.999  # alpha = min(0.999f, opacity * exp(-sigma))
T_MIN = 1e-4  # a pixel is done before T would drop to <= 1e-4
_CHUNK = 1 << 22  # candidate (intersection, pixel) pairs evaluated at once by the rasteriser


class CameraModelType(enum.IntEnum):
    """``gsplat::CameraModelType`` (ext.cpp also exports the values at module level)."""

    PINHOLE = 0
    ORTHO = 1
    FISHEYE = 2
    FTHETA = 3


def _vjp(fn: Callable, inputs: Sequence[Optional[Tensor]], cotangents: Sequence[Optional[Tensor]]):
    """Gradients of Σᵢ ⟨fn(*inputs)ᵢ, cotangentsᵢ⟩ w.r.t. each input: zeros where it does not
    contribute, None for a None input."""
    leaves = [None if x is None else x.detach().requires_grad_(True) for x in inputs]
    live = [x for x in leaves if x is not None]
    with torch.enable_grad():
        outs = fn(*leaves)
        used = [(o, v) for o, v in zip(outs, cotangents) if o is not None and v is not None]
        grads = (torch.autograd.grad([o for o, _ in used], live, [v for _, v in used], allow_unused=True)
                 if used else [None] * len(live))
    grads = iter(grads)
    out = []
    for x in leaves:
        g = None if x is None else next(grads)
        out.append(g if g is not None or x is None else torch.zeros_like(x))
    return out


# ----------------------------------------------------------------------------- covariances
_TRIU = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])


def _quat_to_rotmat(quats: Tensor) -> Tensor:
    """R(q/|q|) for q = (w, x, y, z), row-major [..., 3, 3] (Utils.cuh quat_to_rotmat)."""
    w, x, y, z = (quats * torch.rsqrt((quats * quats).sum(-1, keepdim=True))).unbind(-1)
    R = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
         2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
         2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(R, -1).reshape(quats.shape[:-1] + (3, 3))


def _covar_preci(quats: Tensor, scales: Tensor, compute_covar: bool, compute_preci: bool, triu: bool):
    """Σ = (R S)(R S)ᵀ and P = (R S⁻¹)(R S⁻¹)ᵀ, S = diag(scales); [..., 3, 3] or upper triangles [..., 6]."""
    R = _quat_to_rotmat(quats)

    def outer(M: Tensor) -> Tensor:
        out = M @ M.transpose(-1, -2)
        return out[..., _TRIU[0], _TRIU[1]] if triu else out

    return (outer(R * scales[..., None, :]) if compute_covar else None,
            outer(R / scales[..., None, :]) if compute_preci else None)


def quat_scale_to_covar_preci_fwd(quats, scales, compute_covar: bool, compute_preci: bool, triu: bool):
    """(covars, precis): Σ = R S Sᵀ Rᵀ and P = Σ⁻¹; None where not asked for."""
    return _covar_preci(quats, scales, compute_covar, compute_preci, triu)


def quat_scale_to_covar_preci_bwd(quats, scales, triu: bool, v_covars, v_precis):
    """(v_quats, v_scales): the vector-Jacobian product of the forward."""
    fn = lambda q, s: _covar_preci(q, s, v_covars is not None, v_precis is not None, triu)  # noqa: E731
    return tuple(_vjp(fn, (quats, scales), (v_covars, v_precis)))


# ----------------------------------------------------------------------------- projection
_SYM6 = [[0, 1, 2], [1, 3, 4], [2, 4, 5]]


def _world_covar(covars: Optional[Tensor], quats: Optional[Tensor], scales: Optional[Tensor]) -> Tensor:
    """Σ [..., 3, 3] from its upper triangle [..., 6], or from (quats, scales)."""
    if covars is not None:
        return covars[..., torch.tensor(_SYM6, device=covars.device)]
    return _covar_preci(quats, scales, True, False, False)[0]


def _ewa_project(means, covar, viewmats, Ks, width: int, height: int, eps2d: float):
    """EWA splatting through a pinhole camera (Utils.cuh persp_proj, add_blur):

    μc = R μ + t,  μ2D = (fx x/z + cx, fy y/z + cy),  Σ2D = J R Σ Rᵀ Jᵀ + eps2d·I,
    J = [[fx/z, 0, -fx tx/z²], [0, fy/z, -fy ty/z²]] with (tx, ty)/z = (x, y)/z clamped to the
    field of view widened by 0.3·tan(fov/2).  Returns μ2D, depth z, conic (upper triangle of
    Σ2D⁻¹), compensation √(det(Σ2D - eps2d·I) / det Σ2D), det Σ2D and diag Σ2D.
    """
    R, t = viewmats[..., :3, :3], viewmats[..., :3, 3]
    mean_c = (R @ means[..., None])[..., 0] + t
    covar_c = R @ covar @ R.transpose(-1, -2)
    x, y, z = mean_c.unbind(-1)
    fx, fy, cx, cy = Ks[..., 0, 0], Ks[..., 1, 1], Ks[..., 0, 2], Ks[..., 1, 2]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    rz = 1.0 / z
    rz2 = rz * rz
    tx = z * torch.clamp(x * rz, -lim_x_neg, lim_x_pos)
    ty = z * torch.clamp(y * rz, -lim_y_neg, lim_y_pos)
    O = torch.zeros_like(z)
    J = torch.stack([fx * rz, O, -fx * tx * rz2, O, fy * rz, -fy * ty * rz2], -1).reshape(z.shape + (2, 3))
    cov2d = J @ covar_c @ J.transpose(-1, -2)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], -1)
    a, b, b_t, c = cov2d[..., 0, 0], cov2d[..., 0, 1], cov2d[..., 1, 0], cov2d[..., 1, 1]
    det_orig = a * c - b * b_t
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b_t
    ratio = det_orig / det
    comp0 = torch.sqrt(torch.clamp(ratio.detach(), min=0.0))
    # value √max(0, r); derivative 0.5 / (√r + 1e-6), as add_blur_vjp
    compensation = comp0 + (ratio - ratio.detach()) * (0.5 / (comp0 + 1e-6))
    conics = torch.stack([c / det, -b / det, a / det], -1)
    return means2d, z, conics, compensation, det, torch.stack([a, c], -1)


def _pinhole_only(camera_model) -> None:
    if int(camera_model) != CameraModelType.PINHOLE:
        name = CameraModelType(int(camera_model)).name.lower()
        raise NotImplementedError(f"gsplat_torch: camera_model={name!r} is not supported (pinhole only)")


def projection_ewa_3dgs_fused_fwd(means, covars, quats, scales, opacities, viewmats, Ks, image_width: int,
                                  image_height: int, eps2d: float, near_plane: float, far_plane: float,
                                  radius_clip: float, calc_compensations: bool, camera_model):
    """(radii int32 [..., C, N, 2], means2d, depths, conics, compensations or None) of every
    (camera, Gaussian), Σ2D = J W Σ Wᵀ Jᵀ + eps2d·I (see :func:`_ewa_project`).

    A pair is culled (radii 0) when z ∉ [near, far], det Σ2D ≤ 0, the opacity (× compensation when
    computed) is < 1/255, both radii ≤ radius_clip, or its box lies outside the image.  Radii are
    ⌈k·√Σ2D_ii⌉ with k = 3.33, or min(3.33, √(2 ln(255·opacity))) when opacities are given.
    """
    _pinhole_only(camera_model)
    with torch.no_grad():
        covar = _world_covar(covars, quats, scales)[..., None, :, :, :]
        means2d, depths, conics, comp, det, diag = _ewa_project(
            means[..., None, :, :], covar, viewmats[..., None, :, :], Ks[..., None, :, :],
            image_width, image_height, eps2d)
        valid = (depths >= near_plane) & (depths <= far_plane) & (det > 0)
        extend = torch.full_like(depths, 3.33)
        if opacities is not None:
            opacity = opacities[..., None, :] * (comp if calc_compensations else 1.0)
            valid &= opacity >= ALPHA_THRESHOLD
            safe = torch.where(valid, opacity, torch.ones_like(opacity))
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log(safe / ALPHA_THRESHOLD)))
        radius = torch.ceil(extend[..., None] * torch.sqrt(diag))
        valid &= (radius > radius_clip).any(-1)
        lo, hi = means2d - radius, means2d + radius
        valid &= (hi[..., 0] > 0) & (lo[..., 0] < image_width) & (hi[..., 1] > 0) & (lo[..., 1] < image_height)
        radii = torch.where(valid[..., None], radius, torch.zeros_like(radius)).int()
        keep = lambda v: torch.where(valid if v.dim() == valid.dim() else valid[..., None], v, 0.0)  # noqa: E731
        return (radii, keep(means2d), keep(depths), keep(conics), keep(comp) if calc_compensations else None)


def projection_ewa_3dgs_fused_bwd(means, covars, quats, scales, viewmats, Ks, image_width: int, image_height: int,
                                  eps2d: float, camera_model, radii, conics, compensations, v_means2d, v_depths,
                                  v_conics, v_compensations, viewmats_requires_grad: bool):
    """(v_means, v_covars, v_quats, v_scales, v_viewmats): the VJP of the forward over the pairs
    with radii > 0 (culled pairs get no gradient); None for absent inputs."""
    _pinhole_only(camera_model)
    N, C = means.shape[-2], viewmats.shape[-3]
    B = means.numel() // (3 * N) if N else 0
    b, c, n = torch.nonzero((radii > 0).all(-1).reshape(B, C, N), as_tuple=True)
    pair = (b * C + c) * N + n
    K = Ks.reshape(B, C, 3, 3)[b, c]

    def fn(means_, covars_, quats_, scales_, viewmats_):
        pick = lambda x, d: None if x is None else x.reshape(B, N, d)[b, n]  # noqa: E731
        covar = _world_covar(pick(covars_, 6), pick(quats_, 4), pick(scales_, 3))
        out = _ewa_project(pick(means_, 3), covar, viewmats_.reshape(B, C, 4, 4)[b, c], K,
                           image_width, image_height, eps2d)
        return out[:4]

    at = lambda v, d: None if v is None else v.reshape(-1, d)[pair].squeeze(-1)  # noqa: E731
    cot = (at(v_means2d, 2), at(v_depths, 1), at(v_conics, 3), at(v_compensations, 1))
    v_means, v_covars, v_quats, v_scales, v_viewmats = _vjp(fn, (means, covars, quats, scales, viewmats), cot)
    return v_means, v_covars, v_quats, v_scales, (v_viewmats if viewmats_requires_grad else None)


# ----------------------------------------------------------------------------- spherical harmonics
def _sh_bases(degree: int, dirs: Tensor) -> Tensor:
    """Real SH bases Y_k(d/|d|), k < (degree+1)², in the order and with the constants of
    sh_coeffs_to_color_fast (Sloan, "Efficient Spherical Harmonic Evaluation", JCGT 2013)."""
    Y = [torch.full_like(dirs[..., 0], 0.2820947917738781)]
    if degree >= 1:
        x, y, z = (dirs * torch.rsqrt((dirs * dirs).sum(-1, keepdim=True))).unbind(-1)
        Y += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2, fC1, fS1 = z * z, x * x - y * y, 2.0 * x * y
        fTmp0B = -1.092548430592079 * z
        pSH6 = 0.9461746957575601 * z2 - 0.3153915652525201
        Y += [0.5462742152960395 * fS1, fTmp0B * y, pSH6, fTmp0B * x, 0.5462742152960395 * fC1]
    if degree >= 3:
        fTmp0C = -2.285228997322329 * z2 + 0.4570457994644658
        fTmp1B = 1.445305721320277 * z
        fC2, fS2 = x * fC1 - y * fS1, x * fS1 + y * fC1
        pSH12 = z * (1.865881662950577 * z2 - 1.119528997770346)
        Y += [-0.5900435899266435 * fS2, fTmp1B * fS1, fTmp0C * y, pSH12, fTmp0C * x, fTmp1B * fC1,
              -0.5900435899266435 * fC2]
    if degree >= 4:
        fTmp0D = z * (-4.683325804901025 * z2 + 2.007139630671868)
        fTmp1C = 3.31161143515146 * z2 - 0.47308734787878
        fTmp2B = -1.770130769779931 * z
        fC3, fS3 = x * fC2 - y * fS2, x * fS2 + y * fC2
        Y += [0.6258357354491763 * fS3, fTmp2B * fS2, fTmp1C * fS1, fTmp0D * y,
              1.984313483298443 * z * pSH12 - 1.006230589874905 * pSH6,
              fTmp0D * x, fTmp1C * fC1, fTmp2B * fC2, 0.6258357354491763 * fC3]
    return torch.stack(Y, -1)


def _sh_colors(degree: int, dirs: Tensor, coeffs: Tensor, masks: Optional[Tensor]) -> Tensor:
    """colour_c = Σ_k Y_k(d) coeffs[k, c], only where masks is True (zeros elsewhere)."""
    if degree > 4:
        raise NotImplementedError(f"gsplat_torch: sh_degree={degree} is not supported (gsplat's kernel has 0-4)")
    K = (degree + 1) ** 2
    if masks is None:
        return (_sh_bases(degree, dirs)[..., None] * coeffs[..., :K, :]).sum(-2)
    out = torch.zeros_like(dirs)
    out[masks] = _sh_colors(degree, dirs[masks], coeffs[masks], None)
    return out


def spherical_harmonics_fwd(degrees_to_use: int, dirs, coeffs, masks):
    """colours [..., 3] = Σ_{k<(d+1)²} Y_k(dirs/|dirs|) coeffs[..., k, :]; zeros where masks is False."""
    with torch.no_grad():
        return _sh_colors(degrees_to_use, dirs, coeffs, masks)


def spherical_harmonics_bwd(K: int, degrees_to_use: int, dirs, coeffs, masks, v_colors, compute_v_dirs: bool):
    """(v_coeffs, v_dirs or None): the VJP of the forward."""
    fn = lambda d, c: (_sh_colors(degrees_to_use, d, c, masks),)  # noqa: E731
    v_dirs, v_coeffs = _vjp(fn, (dirs, coeffs), (v_colors,))
    return v_coeffs, (v_dirs if compute_v_dirs else None)


# ----------------------------------------------------------------------------- tile intersection
def intersect_tile(means2d, radii, depths, image_ids, gaussian_ids, I: int, tile_size: int, tile_width: int,
                   tile_height: int, sort: bool, segmented: bool):
    """(tiles_per_gauss int32, isect_ids int64, flatten_ids int32) of every visible Gaussian (radii > 0)
    and each tile its box μ2D ± r covers; isect_id = image_id << (32 + tile_bits) | tile_id << 32 |
    float32 bits of the depth.  ``sort``: stably by isect_id (as CUB's radix sort; a ``segmented``
    sort gives the same order).  ``means2d`` [nnz, 2] means packed input (needs image_ids)."""
    packed = means2d.dim() == 2
    if packed and (image_ids is None or gaussian_ids is None):
        raise ValueError("When packed is set, image_ids and gaussian_ids must be provided.")
    tile_bits, image_bits = (tile_width * tile_height).bit_length(), int(I).bit_length()
    if image_bits + tile_bits > 32:
        raise ValueError(f"{I} images x {tile_width * tile_height} tiles need {image_bits + tile_bits} > 32 bits")
    device = means2d.device
    m, r = means2d.reshape(-1, 2).float() / tile_size, radii.reshape(-1, 2).float() / tile_size
    size = torch.tensor([tile_width, tile_height], device=device)
    lo = torch.minimum(torch.floor(m - r).clamp(min=0).long(), size)
    hi = torch.minimum(torch.ceil(m + r).clamp(min=0).long(), size)
    extent = hi - lo
    counts = extent.prod(-1) * (radii.reshape(-1, 2) > 0).all(-1)
    tiles_per_gauss = counts.int().reshape(depths.shape)
    elem = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    j = torch.arange(elem.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[elem]
    tile_y = lo[elem, 1] + torch.div(j, extent[elem, 0], rounding_mode="floor")
    tile_x = lo[elem, 0] + j % extent[elem, 0]
    iid = image_ids.long()[elem] if packed else torch.div(elem, means2d.shape[-2], rounding_mode="floor")
    depth_bits = depths.reshape(-1).float().view(torch.int32).long() & 0xFFFFFFFF
    isect_ids = (iid << (32 + tile_bits)) | ((tile_y * tile_width + tile_x) << 32) | depth_bits[elem]
    flatten_ids = elem.int()
    if sort:
        isect_ids, order = torch.sort(isect_ids, stable=True)
        flatten_ids = flatten_ids[order]
    return tiles_per_gauss, isect_ids, flatten_ids


def intersect_offset(isect_ids, I: int, tile_width: int, tile_height: int):
    """offsets int32 [I, tile_height, tile_width]: index of each tile's first intersection in the
    sorted isect_ids (n_isects past the last)."""
    n_tiles = tile_width * tile_height
    tile_bits = n_tiles.bit_length()
    hi = isect_ids >> 32
    key = (hi >> tile_bits) * n_tiles + (hi & ((1 << tile_bits) - 1))
    tiles = torch.arange(I * n_tiles, device=isect_ids.device)
    return torch.searchsorted(key.contiguous(), tiles).int().reshape(I, tile_height, tile_width)


# ----------------------------------------------------------------------------- rasterisation
def _sigma_alpha(mx, my, a, b, c, opacity, px, py):
    """σ = ½ dᵀ Σ2D⁻¹ d with d = μ2D - pixel centre and conic Σ2D⁻¹ = [[a, b], [b, c]], and
    α = min(0.999, opacity·exp(-σ))."""
    dx, dy = mx - px, my - py
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    return sigma, torch.clamp(opacity * torch.exp(-sigma), max=MAX_ALPHA)


def _candidates(xy: Tensor, conic: Tensor, opacity: Tensor, x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor):
    """Shrinks each tile rectangle [x0, x1) × [y0, y1) to the pixels where α ≥ 1/255 is possible: for a
    positive-definite conic the set ½ dᵀ Σ2D⁻¹ d ≤ ln(255·o) lies within |dx| ≤ √(2 ln(255·o) Σ2D_xx),
    |dy| ≤ √(2 ln(255·o) Σ2D_yy) (1 px added against rounding); an opacity < 1/255 reaches no pixel;
    other conics keep the whole rectangle (exactness does not depend on the intersection's radii)."""
    a, b, c = conic.unbind(-1)
    det = a * c - b * b
    level = 2.0 * torch.log(opacity / ALPHA_THRESHOLD).clamp(min=0.0)
    definite = (a > 0) & (det > 0)
    inf = torch.full_like(det, float("inf"))
    half = torch.stack([torch.where(definite, torch.sqrt(level * c / det), inf),
                        torch.where(definite, torch.sqrt(level * a / det), inf)], -1) + 1.0
    lo = torch.ceil(xy - 0.5 - half).clamp(-2.0**30, 2.0**30).long()  # pixel i has its centre at i + 0.5
    hi = torch.floor(xy - 0.5 + half).clamp(-2.0**30, 2.0**30).long() + 1
    x0, y0 = torch.maximum(x0, lo[:, 0]), torch.maximum(y0, lo[:, 1])
    x1, y1 = torch.minimum(x1, hi[:, 0]), torch.minimum(y1, hi[:, 1])
    reach = opacity >= ALPHA_THRESHOLD
    return x0, y0, (x1 - x0).clamp(min=0) * reach, (y1 - y0).clamp(min=0) * reach


def _drawn_pairs(means2d, conics, opacities, masks, width: int, height: int, tile_size: int, tile_offsets,
                 flatten_ids):
    """Every (intersection k, pixel p) the forward kernel may blend: p is in k's tile and in the image,
    the tile is not masked out, σ ≥ 0 and α ≥ 1/255.  Returns k, p (flat over images), α, sorted by
    p and then k (front to back within a tile)."""
    device = means2d.device
    n_isects = flatten_ids.numel()
    th, tw = tile_offsets.shape[-2:]
    tile = torch.searchsorted(tile_offsets.reshape(-1).long().contiguous(),
                              torch.arange(n_isects, device=device), right=True) - 1
    allowed = tile >= 0
    if masks is not None:
        allowed &= masks.reshape(-1)[tile.clamp(min=0)]
    tile = tile.clamp(min=0)
    image, t = torch.div(tile, th * tw, rounding_mode="floor"), tile % (th * tw)
    tx0, ty0 = (t % tw) * tile_size, torch.div(t, tw, rounding_mode="floor") * tile_size
    g = flatten_ids.long()
    xy, con, opa = means2d.reshape(-1, 2)[g], conics.reshape(-1, 3)[g], opacities.reshape(-1)[g]
    x0, y0, nx, ny = _candidates(xy, con, opa, tx0, ty0, (tx0 + tile_size).clamp(max=width),
                                 (ty0 + tile_size).clamp(max=height))
    counts = nx * ny * allowed
    cum = torch.cumsum(counts, 0)
    total = int(cum[-1]) if n_isects else 0
    bounds = torch.tensor(list(range(_CHUNK, total, _CHUNK)), dtype=cum.dtype, device=device)
    edges = [0] + torch.searchsorted(cum, bounds).tolist() + [n_isects]
    floats = torch.stack([xy[:, 0], xy[:, 1], con[:, 0], con[:, 1], con[:, 2], opa])
    ints = torch.stack([x0, y0, nx.clamp(min=1), image * height * width, cum - counts])
    keys, alphas = [], []
    for s, e in zip(edges[:-1], edges[1:]):  # about _CHUNK candidate pixels at a time
        k = torch.repeat_interleave(torch.arange(s, e, device=device), counts[s:e])
        mx, my, a, b, c, o = floats.index_select(1, k)
        kx0, ky0, knx, base, first = ints.index_select(1, k)
        j = torch.arange(k.numel(), device=device) + (int(cum[s - 1]) if s else 0) - first
        ix, iy = kx0 + j % knx, ky0 + torch.div(j, knx, rounding_mode="floor")
        sigma, alpha = _sigma_alpha(mx, my, a, b, c, o, ix.to(xy.dtype) + 0.5, iy.to(xy.dtype) + 0.5)
        ok = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        keys.append(((base + iy * width + ix) * n_isects + k)[ok])  # unique, ordered by (pixel, k)
        alphas.append(alpha[ok])
    key, order = torch.sort(torch.cat(keys))
    n = max(n_isects, 1)
    return key % n, torch.div(key, n, rounding_mode="floor"), torch.cat(alphas)[order]


def _rows(p: Tensor):
    """Layout of pixel-sorted pairs as padded rows: (pixels [P], row [M], col [M], n_cols)."""
    pixels, counts = torch.unique_consecutive(p, return_counts=True)
    row = torch.repeat_interleave(torch.arange(pixels.numel(), device=p.device), counts)
    col = torch.arange(p.numel(), device=p.device) - (torch.cumsum(counts, 0) - counts)[row]
    return pixels, row, col, int(counts.max()) if counts.numel() else 0


def _transmittance(alpha: Tensor, row: Tensor, col: Tensor, n_rows: int, n_cols: int):
    """Front-to-back transmittance per pixel row: (Tᵢ = Π_{j<i}(1 - αⱼ) per pair, and the inclusive
    products [n_rows, n_cols], whose last column is T_final)."""
    one_minus = alpha.new_ones(n_rows, n_cols).index_put((row, col), 1.0 - alpha)
    T = torch.cumprod(one_minus, 1)
    T_before = torch.cat([T.new_ones(n_rows, 1), T[:, :-1]], 1)[row, col]
    return T_before, T


def rasterize_to_pixels_3dgs_fwd(means2d, conics, colors, opacities, backgrounds, masks, image_width: int,
                                 image_height: int, tile_size: int, tile_offsets, flatten_ids):
    """(renders [..., H, W, D], alphas [..., H, W, 1], last_ids int32 [..., H, W]): front-to-back
    compositing C = Σᵢ cᵢ αᵢ Tᵢ + T_final·background, Tᵢ = Π_{j<i}(1 - αⱼ), alpha = 1 - T_final,
    over each tile's depth-sorted intersections; skips σ < 0 and α < 1/255 and stops before T would
    drop to ≤ 1e-4.  last_ids: index in flatten_ids of each pixel's last blended Gaussian (0 if none)."""
    image_dims = tile_offsets.shape[:-2]
    I, HW, D = math.prod(image_dims), image_height * image_width, colors.shape[-1]
    with torch.no_grad():
        k, p, alpha = _drawn_pairs(means2d, conics, opacities, masks, image_width, image_height, tile_size,
                                   tile_offsets, flatten_ids)
        pixels, row, col, n_cols = _rows(p)
        T_before, T = _transmittance(alpha, row, col, pixels.numel(), n_cols)
        T_after = T[row, col]
        drawn = T_after > T_MIN
        k, p, weight = k[drawn], p[drawn], (alpha * T_before)[drawn]
        color = colors.reshape(-1, D)[flatten_ids[k].long()]
        renders = colors.new_zeros(I * HW, D).index_add_(0, p, color * weight[:, None])  # front to back
        T_final = colors.new_ones(I * HW).scatter_reduce_(0, p, T_after[drawn], "amin")
        last_ids = torch.zeros(I * HW, dtype=torch.long, device=p.device).scatter_reduce_(0, p, k, "amax")
        if backgrounds is not None:
            renders += T_final[:, None] * backgrounds.reshape(I, 1, D).expand(I, HW, D).reshape(I * HW, D)
    shape = tuple(image_dims) + (image_height, image_width)
    return renders.reshape(shape + (D,)), (1.0 - T_final).reshape(shape + (1,)), last_ids.int().reshape(shape)


def rasterize_to_pixels_3dgs_bwd(means2d, conics, colors, opacities, backgrounds, masks, image_width: int,
                                 image_height: int, tile_size: int, tile_offsets, flatten_ids, render_alphas,
                                 last_ids, v_render_colors, v_render_alphas, absgrad: bool):
    """(v_means2d_abs or None, v_means2d, v_conics, v_colors, v_opacities): the VJP of the forward
    over the pairs the backward kernel visits (drawn, up to last_ids).  v_means2d_abs = Σ over pixels
    of |∂L_pixel/∂μ2D|, the kernel's absgrad."""
    D, HW = colors.shape[-1], image_height * image_width
    with torch.no_grad():
        k, p, _ = _drawn_pairs(means2d, conics, opacities, masks, image_width, image_height, tile_size,
                               tile_offsets, flatten_ids)
        drawn = k <= last_ids.reshape(-1).long()[p]
        k, p = k[drawn], p[drawn]
        g = flatten_ids[k].long()
        pixels, row, col, n_cols = _rows(p)
        px = (p % image_width).to(means2d.dtype) + 0.5
        py = torch.div(p, image_width, rounding_mode="floor").remainder(image_height).to(means2d.dtype) + 0.5
        v_c, v_a = v_render_colors.reshape(-1, D), v_render_alphas.reshape(-1)
        v_bg = None if backgrounds is None else (backgrounds.reshape(-1, D)[torch.div(
            pixels, HW, rounding_mode="floor")] * v_c[pixels]).sum(-1)
    flat = (means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1), colors.reshape(-1, D))
    grads = [torch.zeros_like(x) for x in flat] + [torch.zeros_like(flat[0]) if absgrad else None]
    if p.numel():
        def fn(xy, conic, opacity, color):
            _, alpha = _sigma_alpha(*xy.unbind(-1), *conic.unbind(-1), opacity, px, py)
            T_before, T = _transmittance(alpha, row, col, pixels.numel(), n_cols)
            T_final = T[:, -1]
            loss = ((alpha * T_before)[:, None] * color * v_c[p]).sum() - (T_final * v_a[pixels]).sum()
            return (loss if v_bg is None else loss + (T_final * v_bg).sum(),)

        per_pair = _vjp(fn, [x[g] for x in flat], (torch.ones((), dtype=means2d.dtype, device=means2d.device),))
        per_pair.append(per_pair[0].abs() if absgrad else None)  # |per-pixel ∂L/∂μ2D|
        for total, v in zip(grads, per_pair):
            if total is not None:
                total.index_add_(0, g, v)
    shapes = (means2d.shape, conics.shape, opacities.shape, colors.shape, means2d.shape)
    v_means2d, v_conics, v_opacities, v_colors, v_abs = (None if v is None else v.reshape(s)
                                                         for v, s in zip(grads, shapes))
    return v_abs, v_means2d, v_conics, v_colors, v_opacities


# ----------------------------------------------------------------------------- MCMC relocation
def relocation(opacities, scales, ratios, binoms, n_max: int):
    """3DGS-as-MCMC Eq. 9 for a Gaussian copied n = ratio times: o' = 1 - (1 - o)^(1/n) and
    s' = o / (Σ_{i=1}^{n} Σ_{k=0}^{i-1} C(i-1, k) (-1)^k o'^(k+1) / √(k+1)) · s, summed in the
    kernel's order."""
    n = ratios.long()
    new_opacities = 1.0 - torch.pow(1.0 - opacities, 1.0 / n.to(opacities.dtype))
    denom = torch.zeros_like(opacities)
    for i in range(1, int(n.max()) + 1 if n.numel() else 1):
        for k in range(i):
            term = binoms[i - 1, k] * ((-1.0) ** k / math.sqrt(k + 1)) * new_opacities ** (k + 1)
            denom = denom + torch.where(i <= n, term, torch.zeros_like(term))
    return new_opacities, (opacities / denom)[:, None] * scales


# ----------------------------------------------------------------------------- unsupported kernels
def _unsupported(name: str, option: str) -> Callable:
    def kernel(*args, **kwargs):
        raise NotImplementedError(f"gsplat_torch: {option} is not supported (CUDA kernel {name!r} has no "
                                  f"torch stand-in; tests/gsplat_torch.py mirrors gsplat {GSPLAT_VERSION})")

    kernel.__name__ = name
    return kernel


_UNSUPPORTED = {
    "projection_ewa_3dgs_packed_fwd": "packed=True", "projection_ewa_3dgs_packed_bwd": "packed=True",
    "projection_ewa_simple_fwd": "gsplat.proj()", "projection_ewa_simple_bwd": "gsplat.proj()",
    "rasterize_to_indices_3dgs": "rasterize_to_indices_in_range()",
    "projection_2dgs_fused_fwd": "2DGS", "projection_2dgs_fused_bwd": "2DGS",
    "projection_2dgs_packed_fwd": "2DGS", "projection_2dgs_packed_bwd": "2DGS",
    "rasterize_to_pixels_2dgs_fwd": "2DGS", "rasterize_to_pixels_2dgs_bwd": "2DGS",
    "rasterize_to_indices_2dgs": "2DGS",
    "projection_ut_3dgs_fused": "with_ut=True",
    "rasterize_to_pixels_from_world_3dgs_fwd": "with_eval3d=True",
    "rasterize_to_pixels_from_world_3dgs_bwd": "with_eval3d=True",
    "UnscentedTransformParameters": "with_ut=True / with_eval3d=True",
    "FThetaCameraDistortionParameters": "camera_model='ftheta'",
    "adam": "SelectiveAdam (the fused 'adam' kernel)",
}

KERNELS = (
    "quat_scale_to_covar_preci_fwd", "quat_scale_to_covar_preci_bwd",
    "projection_ewa_3dgs_fused_fwd", "projection_ewa_3dgs_fused_bwd",
    "spherical_harmonics_fwd", "spherical_harmonics_bwd",
    "intersect_tile", "intersect_offset",
    "rasterize_to_pixels_3dgs_fwd", "rasterize_to_pixels_3dgs_bwd",
    "relocation",
)


# ----------------------------------------------------------------------------- install
def _build_module() -> types.ModuleType:
    C = types.ModuleType(MODULE_NAME, f"gsplat {GSPLAT_VERSION}'s compiled module, replaced by tests/gsplat_torch.py.")
    g = globals()
    for name in KERNELS:
        setattr(C, name, g[name])
    for name, option in _UNSUPPORTED.items():
        setattr(C, name, _unsupported(name, option))
    C.CameraModelType = CameraModelType
    for member in CameraModelType:  # _make_lazy_cuda_obj("CameraModelType.PINHOLE") reads _C.PINHOLE
        setattr(C, member.name, member)
    C.__gsplat_torch__ = True
    return C


def install() -> types.ModuleType:
    """Make gsplat use this stand-in: ``sys.modules["gsplat.csrc"]`` (read by gsplat.cuda._backend's
    first import) and, if that module was imported already, its ``_C``.  Needs no gsplat import;
    idempotent.  Returns the stand-in module."""
    C = sys.modules.get(MODULE_NAME)
    if C is None or not getattr(C, "__gsplat_torch__", False):
        C = _build_module()
        sys.modules[MODULE_NAME] = C
    if "gsplat" in sys.modules:
        sys.modules["gsplat"].csrc = C
    backend = sys.modules.get("gsplat.cuda._backend")
    if backend is not None:
        backend._C = C
    return C
