"""tests/nerfacc_torch.py, the pure-torch stand-in for nerfacc's compiled kernels, against dense
references; and threestudio's nerf-volume-renderer rendering on CPU through it."""
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nerfacc", reason="nerfacc is not installed")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import nerfacc_torch  # noqa: E402

nerfacc_torch.install()
import nerfacc  # noqa: E402
from nerfacc.data_specs import RayIntervals  # noqa: E402
from nerfacc.grid import _enlarge_aabb  # noqa: E402

_C = sys.modules["nerfacc.cuda._backend"]._C


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_chunks(gen, n_rays=12, max_len=70):
    cnts = torch.randint(0, max_len, (n_rays,), generator=gen)
    cnts[0], cnts[1] = 0, 1  # an empty and a single-element chunk; max_len > 32 crosses CUDA blocks
    starts = torch.cumsum(cnts, 0) - cnts
    ray_indices = torch.repeat_interleave(torch.arange(n_rays), cnts)
    return torch.stack([starts, cnts], -1), ray_indices


def _per_chunk(packed_info, x, fn):
    out = torch.zeros_like(x)
    for s, c in packed_info.tolist():
        if c:
            out[s : s + c] = fn(x[s : s + c])
    return out


# ----------------------------------------------------------------------------- install
def test_install_is_idempotent_and_replaces_backend():
    b1 = nerfacc_torch.install()
    b2 = nerfacc_torch.install()
    assert b1 is b2 is sys.modules["nerfacc.cuda._backend"]
    assert sys.modules["nerfacc.cuda"]._backend is b1
    for name in ("inclusive_sum", "exclusive_sum", "inclusive_prod_forward", "exclusive_prod_backward",
                 "ray_aabb_intersect", "traverse_grids", "importance_sampling", "searchsorted"):
        assert callable(getattr(b1._C, name))
    spec = b1._C.RaySegmentsSpec()
    assert spec.vals is None and spec.chunk_starts is None and spec.is_valid is None
    # pack_info accepts CPU tensors through every binding
    ri = torch.tensor([0, 0, 2, 2, 2])
    expect = torch.tensor([[0, 2], [2, 0], [2, 3]])
    assert torch.equal(nerfacc.pack_info(ri, 3), expect)
    assert torch.equal(nerfacc.volrend.pack_info(ri, 3), expect)


def test_install_after_nerfacc_was_imported():
    """A fresh nerfacc import (and a stale backend module) before install(), in this process."""
    saved = {k: v for k, v in sys.modules.items() if k == "nerfacc" or k.startswith("nerfacc.")}
    try:
        for k in saved:
            del sys.modules[k]
        import nerfacc as fresh

        assert fresh is not saved["nerfacc"]
        with pytest.raises(NotImplementedError):
            fresh.pack_info(torch.tensor([0, 1]))  # nerfacc's own CUDA-only guard
        stale = type(sys)("nerfacc.cuda._backend")
        stale._C = None  # what nerfacc's _backend leaves without a CUDA toolkit
        sys.modules["nerfacc.cuda._backend"] = stale
        fresh.cuda._backend = stale
        nerfacc_torch.install()
        nerfacc_torch.install()
        assert sys.modules["nerfacc.cuda._backend"] is not stale
        x = torch.tensor([1.0, 2.0, 3.0, 4.0])
        assert fresh.inclusive_sum(x, torch.tensor([[0, 1], [1, 3]])).tolist() == [1.0, 2.0, 5.0, 9.0]
        assert fresh.volrend.pack_info(torch.tensor([0, 1, 1])).tolist() == [[0, 1], [1, 2]]
    finally:
        for k in [k for k in sys.modules if k == "nerfacc" or k.startswith("nerfacc.")]:
            del sys.modules[k]
        sys.modules.update(saved)


# ----------------------------------------------------------------------------- scans
@pytest.mark.parametrize(
    "name, dense",
    [
        ("inclusive_sum", lambda x: torch.cumsum(x, 0)),
        ("exclusive_sum", lambda x: torch.cumsum(torch.cat([x.new_zeros(1), x[:-1]]), 0)),
        ("inclusive_prod", lambda x: torch.cumprod(x, 0)),
        ("exclusive_prod", lambda x: torch.cumprod(torch.cat([x.new_ones(1), x[:-1]]), 0)),
    ],
)
def test_packed_scans_forward_backward_match_dense(name, dense):
    gen = torch.Generator().manual_seed(1)
    packed_info, _ = _random_chunks(gen)
    n = int(packed_info[:, 1].sum())
    x = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.75).float()
    fn = getattr(nerfacc, name)
    xa = x.clone().requires_grad_(True)
    out = fn(xa, packed_info)
    xb = x.clone().requires_grad_(True)
    ref = _per_chunk(packed_info, xb, dense)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(n, generator=gen)
    (ga,) = torch.autograd.grad((out * w).sum(), xa)
    (gb,) = torch.autograd.grad((ref * w).sum(), xb)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4)
    # batched form (pure nerfacc python) agrees with the packed one on equal-length rows
    rows = torch.rand(5, 9, generator=gen) + 0.5
    info = torch.stack([torch.arange(5) * 9, torch.full((5,), 9)], -1)
    torch.testing.assert_close(fn(rows), fn(rows.reshape(-1), info).reshape(5, 9), rtol=1e-5, atol=1e-6)


def test_scan_normalize_and_reverse_flags():
    gen = torch.Generator().manual_seed(2)
    packed_info, _ = _random_chunks(gen)
    starts, cnts = packed_info.unbind(-1)
    x = torch.rand(int(cnts.sum()), generator=gen)
    inc = _C.inclusive_sum(starts, cnts, x, True, False)
    exc = _C.exclusive_sum(starts, cnts, x, True, False)
    inc_ref = _per_chunk(packed_info, x, lambda v: torch.cumsum(v, 0) / v.sum().clamp_min(1e-10))
    exc_ref = _per_chunk(packed_info, x, lambda v: torch.cat([v.new_zeros(1), torch.cumsum(v, 0)[:-1]]) / v.sum())
    torch.testing.assert_close(inc, inc_ref)
    torch.testing.assert_close(exc, exc_ref)
    rev = _C.exclusive_sum(starts, cnts, x, False, True)
    rev_ref = _per_chunk(packed_info, x, lambda v: torch.flip(torch.cumsum(torch.flip(v, [0]), 0), [0]) - v)
    torch.testing.assert_close(rev, rev_ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- volume rendering
def _dense_weights(t_starts, t_ends, sigmas):
    """numpy float64 reference: w_i = T_i (1 - exp(-sigma_i dt_i)), T_i = exp(-sum_{j<i} sigma_j dt_j)."""
    sd = (sigmas * (t_ends - t_starts)).astype(np.float64)
    trans = np.exp(-np.concatenate([np.zeros_like(sd[..., :1]), np.cumsum(sd, -1)[..., :-1]], -1))
    return trans * (1.0 - np.exp(-sd)), trans


def test_packed_and_batched_rendering_match_dense_reference():
    gen = torch.Generator().manual_seed(3)
    n_rays, n_s = 6, 40
    t = torch.sort(torch.rand(n_rays, n_s + 1, generator=gen) * 4 + 1, -1).values
    t_starts, t_ends = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    sig = torch.rand(n_rays, n_s, generator=gen) * 3
    rgb = torch.rand(n_rays, n_s, 3, generator=gen)
    w_ref, tr_ref = _dense_weights(t_starts.numpy(), t_ends.numpy(), sig.numpy())
    color_ref = (w_ref[..., None] * rgb.numpy()).sum(1)
    opac_ref = w_ref.sum(1)

    sig_b = sig.clone().requires_grad_(True)
    sig_p = sig.clone().reshape(-1).requires_grad_(True)
    ray_indices = torch.arange(n_rays).repeat_interleave(n_s)

    outs = {}
    for mode, s_var in (("batched", sig_b), ("packed", sig_p)):
        if mode == "batched":
            fn = lambda ts, te, ri: (rgb, s_var)
            res = nerfacc.rendering(t_starts, t_ends, rgb_sigma_fn=fn)
        else:
            fn = lambda ts, te, ri: (rgb.reshape(-1, 3)[: ts.shape[0]], s_var)
            res = nerfacc.rendering(t_starts.reshape(-1), t_ends.reshape(-1), ray_indices, n_rays=n_rays, rgb_sigma_fn=fn)
        colors, opacities, depths, extras = res
        np.testing.assert_allclose(colors.detach().numpy(), color_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(opacities[:, 0].detach().numpy(), opac_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(extras["trans"].detach().reshape(n_rays, n_s).numpy(), tr_ref, rtol=1e-4, atol=1e-6)
        (g,) = torch.autograd.grad(colors.sum() + depths.sum(), s_var)
        outs[mode] = g.reshape(n_rays, n_s)
    torch.testing.assert_close(outs["packed"], outs["batched"], rtol=1e-4, atol=1e-5)
    assert outs["packed"].abs().sum() > 0

    # render_weight_from_alpha goes through exclusive_prod: packed vs batched vs reference
    alphas = torch.rand(n_rays, n_s, generator=gen) * 0.3
    a_p = alphas.reshape(-1).clone().requires_grad_(True)
    a_b = alphas.clone().requires_grad_(True)
    w_p, _ = nerfacc.render_weight_from_alpha(a_p, ray_indices=ray_indices, n_rays=n_rays)
    w_b, _ = nerfacc.render_weight_from_alpha(a_b)
    a = alphas.numpy().astype(np.float64)
    w_np = a * np.cumprod(np.concatenate([np.ones((n_rays, 1)), 1 - a[:, :-1]], 1), 1)
    np.testing.assert_allclose(w_p.detach().reshape(n_rays, n_s).numpy(), w_np, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_p.reshape(n_rays, n_s), w_b)
    (gp,) = torch.autograd.grad(w_p.sum(), a_p)
    (gb,) = torch.autograd.grad(w_b.sum(), a_b)
    torch.testing.assert_close(gp.reshape(n_rays, n_s), gb, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- ray / aabb
def _slab_reference(o, d, aabb):
    o, d = o.astype(np.float64), d.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (aabb[:3] - o) / d
        t2 = (aabb[3:] - o) / d
    lo = np.nanmax(np.where(np.isnan(t1), -np.inf, np.minimum(t1, t2)), -1)
    hi = np.nanmin(np.where(np.isnan(t1), np.inf, np.maximum(t1, t2)), -1)
    return lo, hi, (hi >= lo) & (hi > 0)


def test_ray_aabb_intersect_matches_slab_method():
    gen = torch.Generator().manual_seed(4)
    n = 400
    o = torch.randn(n, 3, generator=gen) * 2
    d = torch.nn.functional.normalize(-o + 1.5 * torch.randn(n, 3, generator=gen), dim=-1)
    d[:20, 1] = 0.0  # axis-parallel in y
    d[:20] = torch.nn.functional.normalize(d[:20], dim=-1)
    aabbs = torch.tensor([[-1.0, -0.5, -0.8, 1.0, 0.7, 1.2], [-2.0, -2.0, -2.0, 2.0, 2.0, 2.0]])
    t_mins, t_maxs, hits = nerfacc.ray_aabb_intersect(o, d, aabbs, near_plane=0.2, far_plane=3.0, miss_value=-7.0)
    assert t_mins.shape == (n, 2) and hits.dtype == torch.bool
    for k in range(2):
        lo, hi, hit = _slab_reference(o.numpy(), d.numpy(), aabbs[k].numpy().astype(np.float64))
        clear = np.abs(hi - lo) > 1e-4  # leave grazing rays to float rounding
        assert np.array_equal(hits[:, k].numpy()[clear], hit[clear])
        h = hits[:, k].numpy() & clear
        np.testing.assert_allclose(t_mins[:, k].numpy()[h], np.maximum(lo[h], 0.2), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t_maxs[:, k].numpy()[h], np.minimum(hi[h], 3.0), rtol=1e-5, atol=1e-5)
        assert np.all(t_mins[:, k].numpy()[~hits[:, k].numpy()] == -7.0)
    assert 50 < int(hits[:, 0].sum()) < n  # both hits and misses were exercised
    # the kernel clamps t_min only from below: an entry beyond the far plane stays beyond it
    lo, hi, hit = _slab_reference(o.numpy(), d.numpy(), aabbs[1].numpy().astype(np.float64))
    beyond = hits[:, 1].numpy() & (lo > 3.0 + 1e-3)
    assert beyond.any() and np.all(t_mins[:, 1].numpy()[beyond] > 3.0)


# ----------------------------------------------------------------------------- traverse_grids
def _ref_traverse_ray(o, d, near, far, binaries, aabbs, t_sorted, t_indices, hits, step, cone, limit):
    """traverse_grids_kernel for one ray, transcribed line by line in numpy float32 scalars."""
    f = np.float32
    G = binaries.shape[0]
    res = np.array(binaries.shape[1:])
    eps, half = f(1e-6), f(0.5)
    step, cone = f(step), f(cone)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = f(1.0) / d

    def calc_dt(t):
        return np.fmax(step, np.fmin(t * cone, f(1e10)))

    emits, n_samples, t_last, cont = [], 0, f(near), False
    for i in range(2 * G - 1):
        entering = t_indices[i] < G
        level = t_indices[i] % G
        if not hits[level]:
            continue
        if not entering:
            if t_indices[i + 1] < G:
                continue
            level = t_indices[i + 1] % G
            if not hits[level]:
                continue
        tmin = np.fmax(f(t_sorted[i]), f(near))
        tmax = np.fmin(f(t_sorted[i + 1]), f(far))
        if tmin >= tmax:
            continue
        if not cont:
            if step <= 0:
                t_last = tmin
            else:
                dt = calc_dt(t_last)
                while not (t_last + dt * half >= tmin):
                    t_last = f(t_last + dt)
        amin, amax = aabbs[level, :3], aabbs[level, 3:]
        resf = res.astype(f)
        voxel = (amax - amin) / resf
        ray_start = o + d * (tmin + eps)
        ray_end = o + d * (tmax - eps)
        cur = np.clip((((ray_start - amin) / (amax - amin)) * resf).astype(np.int64), 0, res - 1)
        final = np.clip((((ray_end - amin) / (amax - amin)) * resf).astype(np.int64), 0, res - 1)
        start_index = cur + (d > 0).astype(np.int64)
        with np.errstate(invalid="ignore", over="ignore"):
            tmax_xyz = ((amin + ((start_index.astype(f) * voxel) - ray_start)) * inv) + tmin
            step_f = np.where(d == 0, f(0), np.where(d > 0, f(1), f(-1))).astype(f)
            delta = np.where(d == 0, tmax, voxel * inv * step_f).astype(f)
        tdist = np.where(d == 0, tmax, tmax_xyz).astype(f)
        step_i = step_f.astype(np.int64)
        overflow = final + step_i
        while limit <= 0 or n_samples < limit:
            T = np.fmin(np.fmin(tdist[0], np.fmin(tdist[1], tdist[2])), tmax)
            if not binaries[level, cur[0], cur[1], cur[2]]:
                if step <= 0:
                    t_last = T
                else:
                    dt = calc_dt(t_last)
                    while not (t_last + dt * half >= T):
                        t_last = f(t_last + dt)
                cont = False
            else:
                while limit <= 0 or n_samples < limit:
                    if step <= 0:
                        t_next = T
                    else:
                        dt = calc_dt(t_last)
                        if t_last + dt * half >= T:
                            break
                        t_next = f(t_last + dt)
                    emits.append((t_last, t_next, cont))
                    n_samples += 1
                    cont = True
                    t_last = t_next
                    if t_next >= T:
                        break
            if tdist[0] < tdist[1] and tdist[0] < tdist[2]:
                a = 0
            elif tdist[1] < tdist[2]:
                a = 1
            else:
                a = 2
            cur[a] += step_i[a]
            tdist[a] = f(tdist[a] + delta[a])
            if cur[a] == overflow[a]:
                break
    return emits, t_last


def _edges_from_emits(emits):
    vals, left, right = [], [], []
    for t_last, t_next, cont in emits:
        if not cont:
            vals.append(t_last), left.append(True), right.append(False)
        else:
            left[-1] = True
        vals.append(t_next), left.append(False), right.append(True)
    return vals, left, right


def _scene(seed, G, res=(8, 6, 10), R=40, p_occ=0.5):
    gen = torch.Generator().manual_seed(seed)
    roi = torch.tensor([-1.0, -0.8, -1.2, 1.0, 0.9, 1.1])
    aabbs = torch.stack([_enlarge_aabb(roi, 2**i) for i in range(G)])
    binaries = torch.rand(G, *res, generator=gen) < p_occ
    o = torch.randn(R, 3, generator=gen) * 3
    d = torch.nn.functional.normalize(-o + torch.randn(R, 3, generator=gen), dim=-1)
    d[:4, 0] = 0.0
    near = torch.rand(R, generator=gen) * 0.5
    far = torch.full((R,), 1e10)
    far[4:10] = 3.0
    return o, d, binaries, aabbs, near, far


@pytest.mark.parametrize(
    "G, step, cone, limit",
    [(1, 0.07, 0.0, -1), (2, 0.05, 0.0, -1), (3, 0.11, 0.0, 9), (2, 0.03, 0.04, -1), (2, 0.0, 0.0, -1), (1, 0.05, 0.02, 6)],
)
def test_traverse_grids_matches_kernel_transcription(G, step, cone, limit):
    o, d, binaries, aabbs, near, far = _scene(10 + G, G)
    t_mins, t_maxs, hits = nerfacc.ray_aabb_intersect(o, d, aabbs)
    t_sorted, t_indices = torch.sort(torch.cat([t_mins, t_maxs], -1), -1)
    args = (o, d, torch.ones(len(o), dtype=torch.bool), binaries, aabbs, t_sorted, t_indices, hits,
            near, far, step, cone, True, True, True, limit, False)
    results = [_C.traverse_grids(*args)]
    if cone == 0.0 and step > 0:
        results.append(_C.traverse_grids(*args, _force_loop=True))  # both code paths
    n_total = 0
    for intervals, samples, term in results:
        for r in range(len(o)):
            emits, t_end = _ref_traverse_ray(
                o[r].numpy(), d[r].numpy(), near[r].item(), far[r].item(), binaries.numpy(), aabbs.numpy(),
                t_sorted[r].numpy(), t_indices[r].numpy(), hits[r].numpy(), step, cone, limit,
            )
            s0, c = samples.chunk_starts[r].item(), samples.chunk_cnts[r].item()
            assert c == len(emits)
            mids = [np.float32((tn + tl) * np.float32(0.5)) for tl, tn, _ in emits]
            assert np.array_equal(samples.vals[s0 : s0 + c].numpy(), np.array(mids, np.float32).reshape(-1))
            assert torch.all(samples.ray_indices[s0 : s0 + c] == r) and torch.all(samples.is_valid[s0 : s0 + c])
            vals, left, right = _edges_from_emits(emits)
            i0, ci = intervals.chunk_starts[r].item(), intervals.chunk_cnts[r].item()
            assert ci == len(vals)
            assert np.array_equal(intervals.vals[i0 : i0 + ci].numpy(), np.array(vals, np.float32).reshape(-1))
            assert intervals.is_left[i0 : i0 + ci].tolist() == left
            assert intervals.is_right[i0 : i0 + ci].tolist() == right
            assert np.float32(term[r].item()) == t_end  # terminate plane, bit for bit
            n_total += c
    assert n_total > 50  # the scene produced samples to compare


def test_traverse_grids_full_grid_covers_near_to_far_and_stops_at_aabb():
    R = 30
    gen = torch.Generator().manual_seed(5)
    aabb = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    binaries = torch.ones(1, 16, 16, 16, dtype=torch.bool)
    o = torch.randn(R, 3, generator=gen)
    o = 3.0 * o / o.norm(dim=-1, keepdim=True)
    d = torch.nn.functional.normalize(-o + 0.3 * torch.randn(R, 3, generator=gen), dim=-1)
    near = torch.full((R,), 0.5)
    near[:5] = 2.5  # near plane inside the box for a few rays
    far = torch.full((R,), 1e10)
    far[5:10] = 3.2
    step = 0.02
    intervals, samples, term = nerfacc.traverse_grids(o, d, binaries, aabb[None], near, far, step_size=step)
    t_min, t_max, hit = nerfacc.ray_aabb_intersect(o, d, aabb[None])
    covered = 0
    for r in range(R):
        s0, c = samples.packed_info[r].tolist()
        if not hit[r, 0]:
            assert c == 0
            continue
        lo = max(t_min[r, 0].item(), near[r].item())
        hi = min(t_max[r, 0].item(), far[r].item())
        if lo >= hi:
            assert c == 0
            continue
        i0, ci = intervals.packed_info[r].tolist()
        edges = intervals.vals[i0 : i0 + ci]
        assert ci == c + 1  # one continuous run through a full grid
        assert intervals.is_left[i0 : i0 + ci].tolist() == [True] * c + [False]
        assert intervals.is_right[i0 : i0 + ci].tolist() == [False] + [True] * c
        np.testing.assert_allclose(torch.diff(edges).numpy(), step, rtol=0, atol=2e-5)
        # marching starts on the near plane's step lattice
        k = torch.round((edges - near[r]) / step)
        np.testing.assert_allclose((near[r] + k * step).numpy(), edges.numpy(), atol=5e-5)
        mids = samples.vals[s0 : s0 + c]
        assert mids[0] >= lo - 1e-5 and mids[0] - step < lo + 1e-5  # first midpoint right after entry
        assert mids[-1] < hi + 1e-5 and mids[-1] + step >= hi - 1e-5  # last before exit / far plane
        assert abs(term[r].item() - edges[-1].item()) < 1e-6
        covered += 1
    assert covered > 10


def test_traverse_grids_over_allocate_and_mask():
    o, d, binaries, aabbs, near, far = _scene(7, 2, R=25)
    mask = torch.ones(len(o), dtype=torch.bool)
    mask[::3] = False
    lim = 8
    a_int, a_smp, a_term = nerfacc.traverse_grids(o, d, binaries, aabbs, near, far, step_size=0.05,
                                                  traverse_steps_limit=lim, over_allocate=True, rays_mask=mask)
    b_int, b_smp, b_term = nerfacc.traverse_grids(o, d, binaries, aabbs, near, far, step_size=0.05,
                                                  traverse_steps_limit=lim)
    assert a_smp.vals.numel() == lim * int(mask.sum())  # pre-allocated layout
    cnt = a_smp.packed_info[:, 1]
    assert torch.all(cnt[~mask] == 0) and torch.equal(cnt[mask], b_smp.packed_info[mask, 1])
    assert int(cnt.max()) == lim
    base = torch.cumsum(mask.long() * lim, 0) - mask.long() * lim
    for r in torch.nonzero(mask).flatten().tolist():
        s, c = b_smp.packed_info[r].tolist()
        torch.testing.assert_close(a_smp.vals[base[r] : base[r] + c], b_smp.vals[s : s + c], rtol=0, atol=0)
        assert a_term[r] == b_term[r]
    assert int(a_smp.is_valid.sum()) == int(cnt.sum())


def test_occgrid_estimator_sampling_on_cpu():
    est = nerfacc.OccGridEstimator(roi_aabb=[-1, -1, -1, 1, 1, 1], resolution=16)
    est.train()
    # a ball of density: occupancy from nerfacc's own update
    sigma_ball = lambda x: (x.norm(dim=-1, keepdim=True) < 0.6).float() * 50.0
    est._update(step=0, occ_eval_fn=lambda x: sigma_ball(x) * 0.01)
    assert 0 < int(est.binaries.sum()) < est.binaries.numel()
    o = torch.tensor([[0.0, 0.0, -3.0], [0.3, 0.1, -3.0], [2.5, 2.5, -3.0]])
    d = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), dim=-1)

    def sigma_fn(ts, te, ri):
        x = o[ri] + d[ri] * ((ts + te) / 2)[:, None]
        return sigma_ball(x)[:, 0]

    ri, ts, te = est.sampling(o, d, sigma_fn=sigma_fn, render_step_size=0.01, alpha_thre=0.01)
    assert ri.numel() > 0 and torch.all(te > ts)
    assert set(ri.tolist()) == {0, 1}  # the third ray misses the ball
    x = o[ri] + d[ri] * ((ts + te) / 2)[:, None]
    assert torch.all(x.norm(dim=-1) < 0.6 + 0.01)
    # early stopping: the dense ball is opaque long before its back side
    assert ts[ri == 0].max() < 3.0


# ----------------------------------------------------------------------------- pdf
def _ref_importance(bins, cdfs, n, bias):
    """inverse-CDF reference with torch.searchsorted (batched rows), kernel conventions."""
    u_floor, u_ceil = cdfs[:, :1], cdfs[:, -1:]
    u = u_floor + (torch.arange(n, dtype=torch.float32)[None] + bias) * ((u_ceil - u_floor) / n)
    p = torch.searchsorted(cdfs[:, :-1].contiguous(), u.contiguous(), right=True)
    E = cdfs.shape[1] - 1
    p0, p1 = (p - 1).clamp(0, E), p.clamp(0, E)
    u0, u1, t0, t1 = cdfs.gather(1, p0), cdfs.gather(1, p1), bins.gather(1, p0), bins.gather(1, p1)
    flat = (u1 - u0) < 1e-10
    t = torch.where(flat, (t0 + t1) / 2, (u - u0) * ((t1 - t0) / torch.where(flat, 1, u1 - u0)) + t0)
    mid = (t[:, 1:] + t[:, :-1]) / 2
    first = torch.maximum(t[:, :1] - (t[:, 1:2] - t[:, :1]) / 2, bins[:, :1])
    last = torch.minimum(t[:, -1:] + (t[:, -1:] - t[:, -2:-1]) / 2, bins[:, -1:])
    return torch.cat([first, mid, last], 1), t


def test_importance_sampling_batched_and_packed_match_reference():
    gen = torch.Generator().manual_seed(6)
    R, E, n = 7, 12, 16
    bins = torch.sort(torch.rand(R, E, generator=gen) * 3, -1).values
    w = torch.rand(R, E - 1, generator=gen)
    w[:, 3] = 0.0  # a flat stretch of the CDF
    cdfs = torch.cat([torch.zeros(R, 1), torch.cumsum(w, -1)], -1)
    cdfs = cdfs / cdfs[:, -1:]
    edges_ref, samp_ref = _ref_importance(bins, cdfs, n, 0.5)

    iv, sm = nerfacc.importance_sampling(RayIntervals(vals=bins), cdfs, n, stratified=False)
    assert iv.vals.shape == (R, n + 1) and sm.vals.shape == (R, n)
    torch.testing.assert_close(sm.vals, samp_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(iv.vals, edges_ref, rtol=1e-5, atol=1e-6)

    # the same rays packed (flattened with packed_info) give the same batched result
    info = torch.stack([torch.arange(R) * E, torch.full((R,), E)], -1)
    iv_p, sm_p = nerfacc.importance_sampling(RayIntervals(vals=bins.reshape(-1), packed_info=info), cdfs.reshape(-1), n)
    torch.testing.assert_close(sm_p.vals, sm.vals)
    torch.testing.assert_close(iv_p.vals, iv.vals)

    # per-ray counts: packed outputs with edges/flags
    n_r = torch.tensor([n, 3, 0, 5, n, 2, 7])
    iv_t, sm_t = nerfacc.importance_sampling(RayIntervals(vals=bins), cdfs, n_r)
    assert torch.equal(sm_t.packed_info[:, 1], n_r)
    assert torch.equal(iv_t.packed_info[:, 1], (n_r + 1) * (n_r > 0))
    for r in range(R):
        if n_r[r] == 0:
            continue
        e_ref, s_ref = _ref_importance(bins[r : r + 1], cdfs[r : r + 1], int(n_r[r]), 0.5)
        s0, c = sm_t.packed_info[r].tolist()
        torch.testing.assert_close(sm_t.vals[s0 : s0 + c], s_ref[0], rtol=1e-5, atol=1e-6)
        i0, ci = iv_t.packed_info[r].tolist()
        torch.testing.assert_close(iv_t.vals[i0 : i0 + ci], e_ref[0], rtol=1e-5, atol=1e-6)
        assert iv_t.is_left[i0 : i0 + ci].tolist() == [True] * c + [False]
        assert iv_t.is_right[i0 : i0 + ci].tolist() == [False] + [True] * c

    # stratified: one jitter per ray, spacing of a linear CDF stays exactly 1/n
    lin = torch.linspace(0, 1, 5).expand(R, -1).contiguous()
    _, sm_s = nerfacc.importance_sampling(RayIntervals(vals=lin), lin, 8, stratified=True)
    np.testing.assert_allclose(torch.diff(sm_s.vals, dim=-1).numpy(), 1 / 8, atol=1e-6)
    off = sm_s.vals[:, 0] * 8
    assert torch.all((off > 0) & (off <= 1)) and off.std() > 0


def test_searchsorted_matches_torch_reference():
    gen = torch.Generator().manual_seed(8)
    R, E, Q = 5, 9, 13
    key = torch.sort(torch.rand(R, E, generator=gen), -1).values
    query = torch.rand(R, Q, generator=gen) * 1.4 - 0.2  # some outside the key range
    ids_l, ids_r = nerfacc.searchsorted(RayIntervals(vals=key), RayIntervals(vals=query))
    p = torch.searchsorted(key[:, :-1].contiguous(), query, right=True)
    assert torch.equal(ids_l, (p - 1).clamp(0, E - 1)) and torch.equal(ids_r, p.clamp(0, E - 1))
    inside = (query >= key[:, :1]) & (query < key[:, -1:])
    assert torch.all(key.gather(1, ids_l)[inside] <= query[inside])
    assert torch.all(query[inside] < key.gather(1, ids_r)[inside])
    # flattened key and query with packed_info: absolute indices into the flattened key
    kc = torch.tensor([E, 4, E, 2, 6])
    kflat = torch.cat([key[r, : kc[r]] for r in range(R)])
    kinfo = torch.stack([torch.cumsum(kc, 0) - kc, kc], -1)
    qc = torch.tensor([3, 0, Q, 5, 1])
    qflat = torch.cat([query[r, : qc[r]] for r in range(R)])
    qinfo = torch.stack([torch.cumsum(qc, 0) - qc, qc], -1)
    fl, fr = nerfacc.searchsorted(RayIntervals(vals=kflat, packed_info=kinfo), RayIntervals(vals=qflat, packed_info=qinfo))
    q_ray = torch.repeat_interleave(torch.arange(R), qc)
    fl2, fr2 = nerfacc.searchsorted(
        RayIntervals(vals=kflat, packed_info=kinfo), RayIntervals(vals=qflat, packed_info=qinfo, ray_indices=q_ray)
    )
    assert torch.equal(fl, fl2) and torch.equal(fr, fr2)
    for i, r in enumerate(q_ray.tolist()):
        ks = kflat[kinfo[r, 0] : kinfo[r, 0] + kc[r]]
        pp = int(torch.searchsorted(ks[:-1], qflat[i : i + 1], right=True))
        assert fl[i] == kinfo[r, 0] + min(max(pp - 1, 0), kc[r] - 1)
        assert fr[i] == kinfo[r, 0] + min(pp, kc[r] - 1)


def test_prop_net_estimator_sampling_and_loss_on_cpu():
    from nerfacc.estimators.prop_net import PropNetEstimator

    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Softplus(), torch.nn.Linear(8, 1), torch.nn.Softplus())
    est = PropNetEstimator()  # no optimizer: creating one imports torch._dynamo (seconds)
    est.train()
    sigma = lambda ts, te: net(((ts + te) / 2)[..., None])[..., 0]
    t_starts, t_ends = est.sampling([sigma], [16], num_samples=24, n_rays=6, near_plane=0.5, far_plane=2.5,
                                    stratified=True, requires_grad=True)
    assert t_starts.shape == (6, 24) and torch.all(t_ends >= t_starts)
    assert t_starts.min() >= 0.5 - 1e-6 and t_ends.max() <= 2.5 + 1e-6
    trans = torch.exp(-torch.cumsum(torch.rand(6, 24) * 0.2, -1))
    loss = est.compute_loss(trans)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ----------------------------------------------------------------------------- threestudio
@pytest.fixture(scope="module")
def ts_cpu(ts):
    """threestudio imported on CPU, with get_device() answering cpu for every binding."""
    threestudio = ts
    from threestudio.utils import misc

    def _cpu_device():
        return torch.device("cpu")

    old = misc.get_device.__code__
    misc.get_device.__code__ = _cpu_device.__code__
    try:
        yield threestudio
    finally:
        misc.get_device.__code__ = old


def _ts_renderer(threestudio, estimator, background, grid_prune=True):
    torch.manual_seed(0)
    geometry = threestudio.find("implicit-volume")({
        "radius": 1.0,
        "normal_type": "finite_difference",
        "pos_encoding_config": {"otype": "ProgressiveBandFrequency", "n_frequencies": 4},
        "mlp_network_config": {"otype": "VanillaMLP", "activation": "ReLU", "output_activation": "none",
                               "n_neurons": 16, "n_hidden_layers": 1},
    })
    material = threestudio.find("no-material")({"n_output_dims": 3, "color_activation": "sigmoid"})
    if background == "solid":
        bg = threestudio.find("solid-color-background")({"color": [0.2, 0.3, 0.4]})
    else:
        bg = threestudio.find("neural-environment-map-background")({
            "dir_encoding_config": {"otype": "ProgressiveBandFrequency", "n_frequencies": 2},
        })
    renderer = threestudio.find("nerf-volume-renderer")(
        {"radius": 1.0, "num_samples_per_ray": 64, "estimator": estimator, "grid_prune": grid_prune,
         "num_samples_per_ray_importance": 32, "near_plane": 1.0, "far_plane": 5.0},
        geometry=geometry, material=material, background=bg,
    )
    return geometry, renderer


def _camera_rays(h=4, w=4):
    ys, xs = torch.meshgrid(torch.linspace(-0.3, 0.3, h), torch.linspace(-0.3, 0.3, w), indexing="ij")
    d = torch.nn.functional.normalize(torch.stack([xs, ys, torch.ones_like(xs)], -1), dim=-1)
    o = torch.tensor([0.0, 0.0, -3.0]).expand(h, w, 3)
    return o[None].contiguous(), d[None].contiguous()


@pytest.mark.parametrize(
    "estimator, background, grid_prune",
    [("occgrid", "solid", True), ("occgrid", "env", False), ("importance", "env", True)],
)
def test_threestudio_nerf_volume_renderer_on_cpu(ts_cpu, estimator, background, grid_prune):
    geometry, renderer = _ts_renderer(ts_cpu, estimator, background, grid_prune)
    renderer.train()
    assert all(p.device.type == "cpu" for p in renderer.parameters())
    if estimator == "occgrid" and grid_prune:
        renderer.update_step(0, 0)  # nerfacc's occupancy update through the geometry's density
        assert int(renderer.estimator.binaries.sum()) > 0
    rays_o, rays_d = _camera_rays()
    out = renderer(rays_o, rays_d, light_positions=torch.tensor([[0.0, 0.0, -5.0]]))
    rgb = out["comp_rgb"]
    assert rgb.shape == (1, 4, 4, 3) and torch.isfinite(rgb).all()
    assert torch.isfinite(out["opacity"]).all() and float(out["opacity"].detach().max()) > 0.05
    assert out["ray_indices"].numel() > 16  # real samples, not validate_empty_rays' placeholder
    rgb.mean().backward()
    grads = [p.grad for p in geometry.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(torch.isfinite(g).all() for g in grads)
