"""tests/gsplat_torch.py, the pure-torch stand-in for gsplat 1.5.3's CUDA kernels: against gsplat's
own pure-torch functions (gsplat.cuda._torch_impl, on CPU), against a dense per-pixel compositing
reference written here, with float64 gradchecks, through ``gsplat.rasterization`` for every render
mode, and driving ``DefaultStrategy`` / ``MCMCStrategy`` with real rasterization outputs.

Tolerances: tile intersections and offsets are compared bitwise; covariances, projections and SH to
float32 rounding (rtol 1e-5); the rasteriser to the float32 dense reference (1e-5 forward, 1e-4
gradients); gradchecks use float64 and torch's defaults."""
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

gsplat = pytest.importorskip("gsplat", reason="gsplat is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gsplat_torch  # noqa: E402

gsplat_torch.install()
from gsplat.cuda import _backend  # noqa: E402
from gsplat.cuda import _torch_impl as ti  # noqa: E402

W, H = 40, 30


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def look_at(eye, target=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """World-to-camera matrix (OpenCV axes: x right, y down, z forward) of a camera at ``eye``."""
    eye, target = torch.tensor(eye, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    f = torch.nn.functional.normalize(target - eye, dim=0)
    r = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), f), dim=0)
    R = torch.stack([r, torch.linalg.cross(f, r) * -1.0, f])
    V = torch.eye(4)
    V[:3, :3], V[:3, 3] = R, -R @ eye
    return V


def scene(n=200, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.6
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.12 + 0.01
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    sh = torch.randn(n, 9, 3, generator=g) * 0.3
    viewmats = torch.stack([look_at([0.0, 0.0, 3.0]), look_at([3.0, 0.2, 0.5]), look_at([0.3, 2.5, 1.0])])
    Ks = torch.tensor([[40.0, 0.0, W / 2], [0.0, 40.0, H / 2], [0.0, 0.0, 1.0]]).expand(3, 3, 3).contiguous()
    return [t.to(dtype) for t in (means, quats, scales, opacities, sh, viewmats, Ks)]


# ----------------------------------------------------------------------------- dense reference
def dense_composite(means2d, conics, colors, opacities, depths, valid, width, height, backgrounds=None,
                    xy_per_pixel=False):
    """gsplat's compositing rules written plainly: per image, every valid Gaussian in depth order, at
    every pixel centre: σ = ½ dᵀ Σ2D⁻¹ d, α = min(0.999, o·exp(-σ)); skip σ < 0 or α < 1/255; a pixel
    stops before T would drop to ≤ 1e-4; C = Σ cᵢ αᵢ Tᵢ + T·bg.  Inputs [I, N, ...].  Returns
    (colors [I, H, W, D], alphas [I, H, W, 1], last Gaussian per pixel [I, H, W] (-1: none), and the
    per-pixel means leaf [I, N, H, W, 2] when ``xy_per_pixel``)."""
    I, N = means2d.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means2d.dtype) + 0.5,
                            torch.arange(width, dtype=means2d.dtype) + 0.5, indexing="ij")
    leaf = None
    if xy_per_pixel:
        leaf = means2d.detach()[:, :, None, None, :].expand(I, N, height, width, 2).clone().requires_grad_(True)
    out_c, out_a, out_last = [], [], []
    for i in range(I):
        T = torch.ones(height, width, dtype=means2d.dtype)
        C = torch.zeros(height, width, colors.shape[-1], dtype=means2d.dtype)
        done = torch.zeros(height, width, dtype=torch.bool)
        last = torch.full((height, width), -1)
        for g in torch.argsort(depths[i], stable=True).tolist():
            if not valid[i, g]:
                continue
            xy = leaf[i, g] if xy_per_pixel else means2d[i, g]
            dx, dy = xy[..., 0] - xs, xy[..., 1] - ys
            a, b, c = conics[i, g]
            sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
            skip = sigma < 0  # (and no exp overflow there, whose gradient would be nan)
            alpha = torch.clamp(opacities[i, g] * torch.exp(-torch.where(skip, 0.0, sigma)), max=0.999)
            use = ~done & ~skip & (alpha >= 1.0 / 255.0)
            next_T = T * (1.0 - alpha)
            stop = use & (next_T <= 1e-4)
            done, use = done | stop, use & ~stop
            C = C + torch.where(use, alpha * T, torch.zeros_like(T))[..., None] * colors[i, g]
            T = torch.where(use, next_T, T)
            last = torch.where(use, torch.full_like(last, g), last)
        if backgrounds is not None:
            C = C + T[..., None] * backgrounds[i]
        out_c.append(C), out_a.append(1.0 - T[..., None]), out_last.append(last)
    return torch.stack(out_c), torch.stack(out_a), torch.stack(out_last), leaf


def splats_2d(n=60, I=2, seed=1, dtype=torch.float32, opaque=False):
    """Random 2D splats per image: (means2d, conics, colors, opacities, depths, radii), radii by
    gsplat's 3.33σ rule so that the tiles cover every pixel a splat can reach."""
    g = torch.Generator().manual_seed(seed)
    means2d = torch.rand(I, n, 2, generator=g) * torch.tensor([W + 10.0, H + 10.0]) - 5.0
    L = torch.randn(I, n, 2, 2, generator=g) * 2.5
    cov2d = L @ L.transpose(-1, -2) + 0.3 * torch.eye(2)
    inv = torch.linalg.inv(cov2d)
    conics = torch.stack([inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]], -1)
    opacities = torch.rand(I, n, generator=g) * (0.3 if opaque else 0.6) + (0.7 if opaque else 0.02)
    colors = torch.rand(I, n, 3, generator=g)
    depths = torch.rand(I, n, generator=g) * 4 + 1
    radii = torch.ceil(3.33 * torch.sqrt(torch.diagonal(cov2d, dim1=-2, dim2=-1))).int()
    return [t.to(dtype) if t.is_floating_point() else t for t in (means2d, conics, colors, opacities, depths, radii)]


def tiles(means2d, radii, depths, tile_size=16):
    tw, th = math.ceil(W / tile_size), math.ceil(H / tile_size)
    _, isect_ids, flatten_ids = gsplat.isect_tiles(means2d, radii, depths, tile_size, tw, th)
    return gsplat.isect_offset_encode(isect_ids, means2d.shape[0], tw, th), flatten_ids


# ----------------------------------------------------------------------------- install
def test_install_is_idempotent_and_is_gsplats_backend():
    C = gsplat_torch.install()
    assert gsplat_torch.install() is C is sys.modules["gsplat.csrc"] is _backend._C
    assert gsplat.cuda._wrapper._make_lazy_cuda_obj("CameraModelType.PINHOLE") == 0
    for name in gsplat_torch.KERNELS:
        assert getattr(C, name).__module__ == "gsplat_torch"
    _backend._C = None  # e.g. what _backend leaves without a CUDA toolkit
    try:
        assert gsplat_torch.install() is C and _backend._C is C
    finally:
        _backend._C = C


@pytest.mark.parametrize("kwargs, option", [
    ({"packed": True}, "packed=True"),
    ({"camera_model": "ortho"}, "camera_model='ortho'"),
    ({"with_ut": True}, "with_ut=True"),
    ({"with_eval3d": True}, "with_eval3d=True"),
])
def test_unsupported_options_raise_naming_the_option(kwargs, option):
    means, quats, scales, opacities, sh, viewmats, Ks = scene(20)
    kwargs = {"packed": False, **kwargs}
    with pytest.raises(NotImplementedError, match=option.replace("(", r"\(").replace(")", r"\)")):
        gsplat.rasterization(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=2, **kwargs)


def test_unsupported_2dgs_and_sh_degree_raise():
    means, quats, scales, opacities, sh, viewmats, Ks = scene(20)
    with pytest.raises(NotImplementedError, match="2DGS"):
        gsplat.rasterization_2dgs(means, quats, scales, opacities, sh, viewmats, Ks, W, H, sh_degree=2, packed=False)
    with pytest.raises(NotImplementedError, match="sh_degree=5"):
        gsplat.spherical_harmonics(5, means, torch.zeros(20, 36, 3))


# ----------------------------------------------------------------------------- covariances
@pytest.mark.parametrize("triu", [False, True])
def test_quat_scale_to_covar_preci_matches_torch_impl_and_gradcheck(triu):
    _, quats, scales, *_ = scene(64)
    ours = gsplat.quat_scale_to_covar_preci(quats, scales, triu=triu)
    ref = ti._quat_scale_to_covar_preci(quats, scales, triu=triu)
    for a, b in zip(ours, ref):  # precisions reach 1/0.01²: rounding relative to the largest entry
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    q, s = (t[:6].double().requires_grad_(True) for t in (quats, scales))
    assert torch.autograd.gradcheck(lambda q, s: gsplat.quat_scale_to_covar_preci(q, s, triu=triu), (q, s))
    assert torch.autograd.gradcheck(lambda q, s: gsplat.quat_scale_to_covar_preci(q, s, compute_preci=False,
                                                                                  triu=triu)[0], (q, s))


# ----------------------------------------------------------------------------- projection
def test_projection_matches_torch_impl():
    """radii bitwise; means2d, depths, conics, compensations to float32 rounding; quats/scales and
    upper-triangle covariance inputs agree."""
    means, quats, scales, _, _, viewmats, Ks = scene(500)
    covars = ti._quat_scale_to_covar_preci(quats, scales, True, False, False)[0]
    ref = ti._fully_fused_projection(means, covars, viewmats, Ks, W, H, calc_compensations=True)
    ours = gsplat.fully_fused_projection(means, None, quats, scales, viewmats, Ks, W, H, calc_compensations=True)
    assert torch.equal(ours[0], ref[0])
    valid = (ours[0] > 0).all(-1)
    assert 0.2 < valid.float().mean() < 1.0  # both visible and culled pairs
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5)
    assert all(torch.all(t[~valid] == 0) for t in ours[1:])  # zeros where the kernel leaves garbage
    triu = ti._quat_scale_to_covar_preci(quats, scales, True, False, True)[0]
    by_covar = gsplat.fully_fused_projection(means, triu, None, None, viewmats, Ks, W, H, calc_compensations=True)
    assert torch.equal(by_covar[0], ours[0])
    for a, b in zip(by_covar[1:], ours[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _cov2d(means, quats, scales, viewmats, Ks, eps2d=0.3):
    covars = ti._quat_scale_to_covar_preci(quats, scales, True, False, False)[0]
    means_c, covars_c = ti._world_to_cam(means, covars, viewmats)
    _, cov2d = ti._persp_proj(means_c, covars_c, Ks, W, H)
    return means_c[..., 2], cov2d + eps2d * torch.eye(2)


def test_projection_culling_rules_and_opacity_bound():
    """near/far planes, opacity < 1/255 (after compensation when antialiased), radius_clip, and the
    opacity-tightened radius ⌈min(3.33, √(2 ln(255 o)))·√Σ2D_ii⌉ (which also decides off-screen)."""
    means, quats, scales, opacities, _, viewmats, Ks = scene(400)
    opacities[:40] = torch.rand(40) * 0.006  # around the 1/255 threshold
    depths, cov2d = _cov2d(means, quats, scales, viewmats, Ks)
    near, far = 2.6, 3.6
    radii, _, _, _, comp = gsplat.fully_fused_projection(means, None, quats, scales, viewmats, Ks, W, H,
                                                         near_plane=near, far_plane=far, opacities=opacities,
                                                         calc_compensations=True)
    visible = (radii > 0).all(-1)
    covars = ti._quat_scale_to_covar_preci(quats, scales, True, False, False)[0]
    _, means2d, _, _, comp_ref = ti._fully_fused_projection(means, covars, viewmats, Ks, W, H, calc_compensations=True)
    torch.testing.assert_close(comp[visible], comp_ref[visible])
    o = opacities.expand_as(depths) * comp_ref
    k = torch.clamp(torch.sqrt(2.0 * torch.log(o.clamp(min=1e-30) * 255.0)), max=3.33)
    expect = torch.ceil(k[..., None] * torch.sqrt(torch.diagonal(cov2d, dim1=-2, dim2=-1)))
    on_screen = ((means2d + expect > 0) & (means2d - expect < torch.tensor([W, H]))).all(-1)
    kept = (depths >= near) & (depths <= far) & (o >= 1.0 / 255.0) & on_screen
    assert torch.equal(visible, kept) and 0 < int(kept.sum()) < int(((depths >= near) & (depths <= far)).sum())
    assert bool(((o < 1.0 / 255.0) & (depths >= near) & (depths <= far)).any())
    assert torch.equal(radii[visible], expect.int()[visible])
    full = gsplat.fully_fused_projection(means, None, quats, scales, viewmats, Ks, W, H)[0]
    assert torch.all(radii <= full) and bool((radii < full).any())
    clipped = gsplat.fully_fused_projection(means, None, quats, scales, viewmats, Ks, W, H, radius_clip=3.0)[0]
    assert torch.equal((clipped > 0).all(-1), (full > 3).any(-1) & (full > 0).all(-1))


@pytest.mark.parametrize("with_covars", [False, True])
def test_projection_gradcheck_float64(with_covars):
    means, quats, scales, opacities, _, viewmats, Ks = scene(8, seed=3, dtype=torch.float64)
    means = means * 0.4
    covars = ti._quat_scale_to_covar_preci(quats, scales, True, False, True)[0] if with_covars else None
    inputs = [means, viewmats] + ([covars] if with_covars else [quats, scales])
    inputs = [t.clone().requires_grad_(True) for t in inputs]

    def project(means, viewmats, *rest):
        cov, q, s = (rest[0], None, None) if with_covars else (None, *rest)
        radii, *out = gsplat.fully_fused_projection(means, cov, q, s, viewmats, Ks, W, H, calc_compensations=True)
        assert (radii > 0).all(-1).float().mean() > 0.5
        return tuple(out)

    assert torch.autograd.gradcheck(project, inputs)


def test_projection_backward_skips_culled_pairs():
    means, quats, scales, _, _, viewmats, Ks = scene(100)
    m, q = means.clone().requires_grad_(True), quats.clone().requires_grad_(True)
    radii, means2d, depths, conics, _ = gsplat.fully_fused_projection(m, None, q, scales, viewmats, Ks, W, H,
                                                                      near_plane=2.8)
    culled = ~(radii > 0).all(-1)
    assert culled.any() and (~culled).any()
    loss = lambda mask: (means2d.sum(-1) + depths + conics.sum(-1))[mask].sum()  # noqa: E731
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss(culled), (m, q), retain_graph=True))
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(loss(~culled), (m, q)))


# ----------------------------------------------------------------------------- spherical harmonics
@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_spherical_harmonics_matches_torch_impl_and_gradcheck(degree):
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=g) * 2
    coeffs = torch.randn(50, 25, 3, generator=g)
    torch.testing.assert_close(gsplat.spherical_harmonics(degree, dirs, coeffs),
                               ti._spherical_harmonics(degree, dirs, coeffs), rtol=1e-5, atol=1e-5)
    masks = torch.rand(50, generator=g) > 0.3
    masked = gsplat.spherical_harmonics(degree, dirs, coeffs, masks=masks)
    assert torch.all(masked[~masks] == 0)
    torch.testing.assert_close(masked[masks], ti._spherical_harmonics(degree, dirs, coeffs)[masks])
    d, c = dirs[:5].double().requires_grad_(True), coeffs[:5].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d, c: gsplat.spherical_harmonics(degree, d, c, masks=masks[:5]), (d, c))


# ----------------------------------------------------------------------------- tiles
@pytest.mark.parametrize("tile_size", [16, 8])
def test_isect_tiles_and_offsets_match_torch_impl_bitwise(tile_size):
    means2d, _, _, _, depths, radii = splats_2d(n=80, I=3)
    radii[0, :5] = 0  # culled
    radii[1, 5:8, 1] = 0  # one zero radius culls too
    tw, th = math.ceil(W / tile_size), math.ceil(H / tile_size)
    ours = gsplat.isect_tiles(means2d, radii, depths, tile_size, tw, th)
    ref = ti._isect_tiles(means2d, radii, depths, tile_size, tw, th)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert ours[1].dtype == torch.int64 and ours[2].dtype == torch.int32 and ours[0].shape == (3, 80)
    assert torch.equal(gsplat.isect_tiles(means2d, radii, depths, tile_size, tw, th, segmented=True)[1], ours[1])
    unsorted = gsplat.isect_tiles(means2d, radii, depths, tile_size, tw, th, sort=False)
    assert torch.equal(torch.sort(unsorted[1]).values, ours[1])
    offsets = gsplat.isect_offset_encode(ours[1], 3, tw, th)
    assert offsets.dtype == torch.int32 and offsets.shape == (3, th, tw)
    assert torch.equal(offsets, ti._isect_offset_encode(ref[1], 3, tw, th))
    assert torch.equal(gsplat.isect_offset_encode(ours[1][:0], 3, tw, th), torch.zeros(3, th, tw, dtype=torch.int32))


# ----------------------------------------------------------------------------- rasteriser
@pytest.mark.parametrize("opaque, with_bg", [(False, False), (True, True)])
def test_rasterize_to_pixels_matches_dense_reference(opaque, with_bg):
    means2d, conics, colors, opacities, depths, radii = splats_2d(opaque=opaque)
    conics[0, 0] = torch.tensor([0.05, 0.2, 0.05])  # indefinite: σ < 0 around its diagonals ...
    radii[0, 0] = 100  # ... and no 3σ box: every tile lists it
    offsets, flatten_ids = tiles(means2d, radii, depths)
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]]) if with_bg else None
    leaves = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opacities)]
    rgb, alpha = gsplat.rasterize_to_pixels(*leaves, W, H, 16, offsets, flatten_ids, backgrounds=bg, absgrad=True)
    valid = (radii > 0).all(-1)
    ref = [t.clone().requires_grad_(True) for t in (conics, colors, opacities)]
    rgb_r, alpha_r, last_r, xy_pp = dense_composite(means2d, *ref[:2], ref[2], depths, valid, W, H, bg, True)
    torch.testing.assert_close(rgb, rgb_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha, alpha_r, rtol=1e-5, atol=1e-6)
    if opaque:
        assert bool((alpha_r > 0.9998).any())  # the T <= 1e-4 stop was exercised
    # last_ids: each pixel's last blended Gaussian, as an index into flatten_ids
    _, _, last_ids = gsplat_torch.rasterize_to_pixels_3dgs_fwd(means2d, conics, colors, opacities, None, None,
                                                               W, H, 16, offsets, flatten_ids)
    hit = last_r >= 0
    image = torch.arange(2)[:, None, None].expand_as(last_r)
    assert torch.equal(flatten_ids[last_ids.long()][hit].long(), (image * 60 + last_r)[hit])
    assert bool(hit.any()) and torch.all(last_ids[~hit] == 0)
    # gradients, and absgrad = Σ over pixels of |∂L_pixel/∂μ2D|
    w_rgb, w_alpha = torch.randn_like(rgb), torch.randn_like(alpha)
    loss = (rgb * w_rgb).sum() + (alpha * w_alpha).sum()
    loss.backward()
    loss_r = (rgb_r * w_rgb).sum() + (alpha_r * w_alpha).sum()
    g_pp, *g_ref = torch.autograd.grad(loss_r, [xy_pp] + ref)
    torch.testing.assert_close(leaves[0].grad, g_pp.sum((2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(leaves[0].absgrad, g_pp.abs().sum((2, 3)), rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(leaves[1:], g_ref):
        torch.testing.assert_close(ours.grad, theirs, rtol=1e-4, atol=1e-4)
    assert leaves[0].grad.abs().sum() > 0 and leaves[0].absgrad.sum() > leaves[0].grad.abs().sum()


def test_rasterize_to_pixels_gradcheck_float64():
    means2d, conics, colors, opacities, depths, radii = splats_2d(n=6, I=1, seed=4, dtype=torch.float64)
    offsets, flatten_ids = tiles(means2d, radii, depths)
    bg = torch.tensor([[0.3, 0.6, 0.1]], dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (means2d, conics, colors, opacities, bg)]

    def raster(m, c, col, o, b):  # the wrapper casts alphas to float32; colours see T_final through bg
        return gsplat.rasterize_to_pixels(m, c, col, o, W, H, 16, offsets, flatten_ids, backgrounds=b)[0]

    assert torch.autograd.gradcheck(raster, inputs, fast_mode=True)


def test_rasterize_masked_tiles_render_background_only():
    means2d, conics, colors, opacities, depths, radii = splats_2d()
    offsets, flatten_ids = tiles(means2d, radii, depths)
    masks = torch.ones_like(offsets, dtype=torch.bool)
    masks[1, 0, 1] = False
    bg = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.2, 0.3]])
    rgb, alpha = gsplat.rasterize_to_pixels(means2d, conics, colors, opacities, W, H, 16, offsets, flatten_ids,
                                            backgrounds=bg, masks=masks)
    ref, ref_alpha = gsplat.rasterize_to_pixels(means2d, conics, colors, opacities, W, H, 16, offsets, flatten_ids,
                                                backgrounds=bg)
    assert torch.all(rgb[1, :16, 16:32] == bg[1]) and torch.all(alpha[1, :16, 16:32] == 0)
    assert bool((ref_alpha[1, :16, 16:32] > 0).any())
    keep = torch.ones_like(alpha[..., 0], dtype=torch.bool)
    keep[1, :16, 16:32] = False
    torch.testing.assert_close(rgb[keep], ref[keep])


# ----------------------------------------------------------------------------- gsplat.rasterization
def reference_rasterization(means, quats, scales, opacities, sh, viewmats, Ks, sh_degree, render_mode,
                            antialiased, backgrounds):
    """gsplat.rasterization's pipeline from gsplat's pure-torch functions and the dense reference."""
    covars = ti._quat_scale_to_covar_preci(quats, scales, True, False, False)[0]
    radii, means2d, depths, conics, comp = ti._fully_fused_projection(means, covars, viewmats, Ks, W, H,
                                                                      calc_compensations=antialiased)
    opac = opacities.expand_as(depths) * (comp if antialiased else 1.0)
    campos = torch.inverse(viewmats)[:, :3, 3]
    rgb = ti._spherical_harmonics(sh_degree, means[None] - campos[:, None], sh.expand(len(viewmats), -1, -1, -1))
    rgb = torch.clamp_min(rgb + 0.5, 0.0)
    feats = {"RGB": rgb, "D": depths[..., None], "ED": depths[..., None]}.get(render_mode)
    if feats is None:
        feats = torch.cat([rgb, depths[..., None]], -1)
    bg = backgrounds
    if bg is not None and render_mode in ("D", "ED"):
        bg = torch.zeros(len(viewmats), 1)
    elif bg is not None and "+" in render_mode:
        bg = torch.cat([bg, torch.zeros(len(viewmats), 1)], -1)
    out, alphas, _, _ = dense_composite(means2d, conics, feats, opac, depths, (radii > 0).all(-1), W, H, bg)
    if render_mode.endswith("ED"):
        out = torch.cat([out[..., :-1], out[..., -1:] / alphas.clamp(min=1e-10)], -1)
    return out, alphas


@pytest.mark.parametrize("render_mode", ["RGB", "D", "ED", "RGB+D", "RGB+ED"])
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_rasterization_matches_reference_for_every_render_mode(render_mode, rasterize_mode):
    means, quats, scales, opacities, sh, viewmats, Ks = scene(120)
    bg = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]]) if render_mode != "RGB" else None
    params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, sh)]
    out, alphas, meta = gsplat.rasterization(*params, viewmats, Ks, W, H, sh_degree=2, packed=False,
                                             render_mode=render_mode, rasterize_mode=rasterize_mode,
                                             backgrounds=bg, absgrad=True, near_plane=0.5, far_plane=50.0)
    ref_params = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, sh)]
    ref, ref_alphas = reference_rasterization(*ref_params, viewmats, Ks, 2, render_mode,
                                              rasterize_mode == "antialiased", bg)
    channels = {"RGB": 3, "D": 1, "ED": 1, "RGB+D": 4, "RGB+ED": 4}[render_mode]
    assert out.shape == (3, H, W, channels) and alphas.shape == (3, H, W, 1)
    assert meta["radii"].dtype == torch.int32 and meta["radii"].shape == (3, 120, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alphas, ref_alphas, rtol=1e-5, atol=1e-5)
    assert 0.05 < float(alphas.detach().mean()) < 0.95
    w = torch.randn_like(out)
    torch.autograd.backward([(out * w).sum() + alphas.sum()])
    torch.autograd.backward([(ref * w).sum() + ref_alphas.sum()])
    for name, ours, theirs in zip(("means", "quats", "scales", "opacities", "sh"), params, ref_params):
        if theirs.grad is None:  # SH colours do not reach depth-only renders
            assert ours.grad is None or not ours.grad.any()
            continue
        scale = theirs.grad.abs().max()
        torch.testing.assert_close(ours.grad / scale, theirs.grad / scale, rtol=0, atol=2e-4, msg=name)
    assert meta["means2d"].absgrad.shape == (3, 120, 2) and meta["means2d"].absgrad.sum() > 0


# ----------------------------------------------------------------------------- strategies
def _splat_params(n=300, seed=0):
    means, quats, scales, opacities, sh, viewmats, Ks = scene(n, seed)
    params = torch.nn.ParameterDict({
        "means": means, "quats": quats, "scales": torch.log(scales), "opacities": torch.logit(opacities),
        "sh0": sh[:, :1], "shN": sh[:, 1:],
    })
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    return params, optimizers, viewmats, Ks


def _render(params, viewmats, Ks, absgrad=False):
    return gsplat.rasterization(params["means"], params["quats"], torch.exp(params["scales"]),
                                torch.sigmoid(params["opacities"]), torch.cat([params["sh0"], params["shN"]], 1),
                                viewmats, Ks, W, H, sh_degree=2, packed=False, absgrad=absgrad,
                                render_mode="RGB+ED")


@pytest.mark.parametrize("absgrad", [False, True])
def test_default_strategy_duplicates_splits_and_prunes(absgrad, capsys):
    params, optimizers, viewmats, Ks = _splat_params()
    with torch.no_grad():
        params["scales"][::2] = math.log(0.2)  # large: split
        params["opacities"][:30] = torch.logit(torch.tensor(0.002))  # below prune_opa 0.005
    strategy = gsplat.DefaultStrategy(refine_start_iter=0, refine_every=1, grow_grad2d=1e-9, grow_scale3d=0.15,
                                      absgrad=absgrad, verbose=True)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state(scene_scale=1.0)
    n0 = len(params["means"])
    img, alphas, info = _render(params, viewmats, Ks, absgrad)
    strategy.step_pre_backward(params, optimizers, state, 1, info)
    (img.mean() + alphas.mean()).backward()
    visible = int((info["radii"] > 0).all(-1).any(0).sum())
    strategy.step_post_backward(params, optimizers, state, 1, info, packed=False)
    out = capsys.readouterr().out
    dupli, split = map(int, re.search(r"(\d+) GSs duplicated, (\d+) GSs split", out).groups())
    pruned = int(re.search(r"(\d+) GSs pruned", out).group(1))
    assert dupli > 0 and split > 0 and pruned >= 30 and dupli + split <= visible
    assert len(params["means"]) == n0 + dupli + split - pruned != n0
    assert all(len(p) == len(params["means"]) for p in params.values())


def test_default_strategy_1_5_3_never_resets_opacity():
    """docs/gaussians.md §6 relies on it: gsplat 1.5.3 tests ``step % reset_every == 0 & step > 0``,
    which parses as ``step % reset_every == (0 & step) > 0`` and is never true, so opacities are not
    reset at step ``reset_every``.  If a gsplat release fixes it, this fails: update the docs."""
    params, optimizers, viewmats, Ks = _splat_params()
    strategy = gsplat.DefaultStrategy(refine_start_iter=10_000, reset_every=4, refine_stop_iter=100)
    state = strategy.initialize_state()
    before = params["opacities"].detach().clone()
    img, alphas, info = _render(params, viewmats, Ks)
    strategy.step_pre_backward(params, optimizers, state, 4, info)
    img.mean().backward()
    strategy.step_post_backward(params, optimizers, state, 4, info, packed=False)
    assert torch.equal(params["opacities"], before)
    assert (torch.sigmoid(before) > strategy.prune_opa * 2).any()  # a reset would have lowered these


def test_mcmc_strategy_relocates_and_adds():
    params, optimizers, viewmats, Ks = _splat_params()
    with torch.no_grad():
        params["opacities"][:20] = torch.logit(torch.tensor(0.001))  # dead: relocated
    strategy = gsplat.MCMCStrategy(cap_max=1000, refine_start_iter=0, refine_every=1)
    state = strategy.initialize_state()
    n0 = len(params["means"])
    img, alphas, info = _render(params, viewmats, Ks)
    (img.mean() + alphas.mean()).backward()
    before = params["means"].detach().clone()
    strategy.step_post_backward(params, optimizers, state, 1, info, lr=1e-3)
    assert len(params["means"]) == int(1.05 * n0)
    assert torch.all(torch.sigmoid(params["opacities"][:20]) > 0.005)
    assert not torch.equal(params["means"][:n0], before)  # noise injection through quat_scale_to_covar_preci


def test_relocation_matches_equation_9():
    binoms = torch.tensor([[math.comb(n, k) if k <= n else 0 for k in range(10)] for n in range(10)],
                          dtype=torch.float32)
    opacities = torch.tensor([0.9, 0.5, 0.05, 0.3])
    ratios = torch.tensor([1, 2, 3, 7], dtype=torch.int32)
    scales = torch.rand(4, 3) + 0.1
    new_o, new_s = gsplat_torch.relocation(opacities, scales, ratios, binoms, 10)
    for j, (o, n) in enumerate(zip(opacities.tolist(), ratios.tolist())):
        o_new = 1 - (1 - o) ** (1 / n)
        denom = sum(math.comb(i - 1, k) * (-1) ** k / math.sqrt(k + 1) * o_new ** (k + 1)
                    for i in range(1, n + 1) for k in range(i))
        assert new_o[j].item() == pytest.approx(o_new, rel=1e-5)
        torch.testing.assert_close(new_s[j], scales[j] * (o / denom), rtol=1e-4, atol=0)
    assert torch.equal(new_s[0], scales[0] * 1.0)  # one copy keeps its scale


# ----------------------------------------------------------------------------- CPU launch shim
def test_cpu_launch_shim_supplies_the_stand_in_without_jit(tmp_path):
    """Under tests/cpu_launch (the shim of the launch.py end-to-end tests) importing gsplat gives the
    stand-in before gsplat.cuda._backend runs: no JIT compile starts and no build folder appears."""
    code = (
        "import gsplat, gsplat.cuda._backend as b, torch\n"
        "assert b._C.__gsplat_torch__ and b._C is __import__('sys').modules['gsplat.csrc']\n"
        "r = gsplat.isect_tiles(torch.zeros(1, 1, 2), torch.ones(1, 1, 2, dtype=torch.int32), torch.ones(1, 1),"
        " 16, 1, 1)\n"
        "print('ok', r[1].tolist())\n"
    )
    ext = tmp_path / "torch_extensions"
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "cpu_launch"), TORCH_EXTENSIONS_DIR=str(ext),
               OMP_NUM_THREADS="1")
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=f, stderr=subprocess.STDOUT,
                                cwd=str(tmp_path))
        deadline = time.monotonic() + 300
        while proc.poll() is None:  # a JIT build first creates its build folder: stop it at once
            if (ext.exists() and any(ext.iterdir())) or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"gsplat started a JIT build or hung: {list(ext.glob('*')) if ext.exists() else []}")
            time.sleep(0.05)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "ok [1065353216]" in out  # tile 0, the float32 bits of depth 1.0
    assert "Setting up CUDA" not in out and not (ext.exists() and any(ext.iterdir()))
