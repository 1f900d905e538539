"""Pure-torch stand-in for nerfacc 0.5.3's compiled backend (``nerfacc.cuda._backend._C``).

nerfacc 0.5.3 sends every kernel through ``nerfacc.cuda._backend._C`` (CUDA only; on a machine
with nvcc but no GPU its import even attempts a JIT build that fails).  :func:`install` puts a
module at ``sys.modules["nerfacc.cuda._backend"]`` whose ``_C`` implements, with torch ops only
(CPU or CUDA tensors), the functions of nerfacc/cuda/csrc/nerfacc.cpp:

* scans (csrc/scan.cu): ``inclusive_sum``, ``exclusive_sum`` (with ``normalize`` and the reversed
  ``backward`` scan), ``inclusive_prod_forward/backward``, ``exclusive_prod_forward/backward``;
* grids (csrc/grid.cu, include/utils_grid.cuh): ``ray_aabb_intersect``, ``traverse_grids``;
* pdf (csrc/pdf.cu): ``importance_sampling`` (both overloads), ``searchsorted``;
* ``RaySegmentsSpec`` (include/data_spec.hpp): a plain attribute holder, undefined tensors = None.

``opencv_lens_undistortion`` and ``opencv_lens_undistortion_fisheye`` (csrc/camera.cu) are not
implemented: they raise NotImplementedError (threestudio never calls them).

One nerfacc Python function refuses CPU tensors: ``nerfacc.pack.pack_info`` (``if
ray_indices.is_cuda: ... else: raise NotImplementedError``), reached by
``nerfacc.volrend.render_weight_from_density`` with ``ray_indices``.  :func:`install` replaces the
code object of that one function (so every binding of it, ``nerfacc.pack_info`` and
``nerfacc.volrend.pack_info`` included, runs the same body without the device check).  Nothing
else of nerfacc is touched.

Float arithmetic follows the kernels' float32 operation order; the known deviations are noted
where they occur (uninitialised memory in the C++ becomes zeros or a stated value).
"""
from __future__ import annotations

import sys
import types
from typing import Optional

import torch
from torch import Tensor

__all__ = ["install"]

_MODULE_NAME = "nerfacc.cuda._backend"


# ----------------------------------------------------------------------------- data spec
class RaySegmentsSpec:
    """Mirror of ``struct RaySegmentsSpec`` (include/data_spec.hpp); undefined tensors are None."""

    def __init__(self) -> None:
        self.vals: Optional[Tensor] = None
        self.chunk_starts: Optional[Tensor] = None
        self.chunk_cnts: Optional[Tensor] = None
        self.ray_indices: Optional[Tensor] = None
        self.is_left: Optional[Tensor] = None
        self.is_right: Optional[Tensor] = None
        self.is_valid: Optional[Tensor] = None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        shape = None if self.vals is None else tuple(self.vals.shape)
        return f"RaySegmentsSpec(vals={shape})"


def _starts_from_cnts(cnts: Tensor) -> Tensor:
    """``RaySegmentsSpec::compute_chunk_start``: exclusive cumsum of the counts."""
    return torch.cumsum(cnts, 0) - cnts


def _chunk_layout(chunk_starts: Tensor, chunk_cnts: Tensor):
    """(rows, cols, elems, max_cnt): element ``elems[i]`` is column ``cols[i]`` of chunk ``rows[i]``."""
    device = chunk_cnts.device
    cnts = chunk_cnts.long().clamp_min(0)
    n = cnts.numel()
    rows = torch.repeat_interleave(torch.arange(n, device=device), cnts)
    offsets = torch.cumsum(cnts, 0) - cnts
    cols = torch.arange(rows.numel(), device=device) - offsets[rows]
    elems = chunk_starts.long()[rows] + cols
    max_cnt = int(cnts.max().item()) if n > 0 and rows.numel() > 0 else 0
    return rows, cols, elems, max_cnt


# ----------------------------------------------------------------------------- scans
def _packed_scan(chunk_starts, chunk_cnts, inputs, op: str, exclusive: bool, normalize: bool, reverse: bool):
    """One scan of include/utils_scan.cuh over each chunk of a flattened tensor.

    ``reverse`` is the thrust::reverse_iterator form used by the backward passes: the chunk is
    scanned from its last element to its first.  Elements outside every chunk come back as 0
    (the C++ leaves them uninitialised).
    """
    outputs = torch.zeros_like(inputs)
    if inputs.numel() == 0 or chunk_cnts.numel() == 0:
        return outputs
    rows, cols, elems, max_cnt = _chunk_layout(chunk_starts, chunk_cnts)
    if rows.numel() == 0:
        return outputs
    init = 0.0 if op == "sum" else 1.0
    n_rows = chunk_cnts.numel()
    cnts = chunk_cnts.long().clamp_min(0)
    # scan-order column: reversed chunks are read from their end
    scol = (cnts[rows] - 1 - cols) if reverse else cols
    dense = torch.full((n_rows, max_cnt), init, dtype=inputs.dtype, device=inputs.device)
    dense[rows, scol] = inputs[elems]
    dense0 = dense
    if exclusive:
        dense = torch.cat([torch.full_like(dense[:, :1], init), dense[:, :-1]], dim=1)
    scanned = torch.cumsum(dense, 1) if op == "sum" else torch.cumprod(dense, 1)
    out = scanned[rows, scol]
    if normalize:
        # block_total: the chunk's inclusive total, clamped with fmaxf(total, 1e-10)
        total = dense0.sum(1).clamp_min(1e-10)
        divided = out / total[rows]
        out = torch.where(scol == 0, out, divided) if exclusive else divided
    outputs[elems] = out
    return outputs


def inclusive_sum(chunk_starts, chunk_cnts, inputs, normalize: bool, backward: bool):
    """``inclusive_sum`` (csrc/scan.cu): per-chunk cumsum; ``backward`` scans each chunk reversed."""
    return _packed_scan(chunk_starts, chunk_cnts, inputs, "sum", False, normalize, backward)


def exclusive_sum(chunk_starts, chunk_cnts, inputs, normalize: bool, backward: bool):
    """``exclusive_sum`` (csrc/scan.cu): per-chunk exclusive cumsum (reversed when ``backward``)."""
    return _packed_scan(chunk_starts, chunk_cnts, inputs, "sum", True, normalize, backward)


def inclusive_prod_forward(chunk_starts, chunk_cnts, inputs):
    """``inclusive_prod_forward`` (csrc/scan.cu): per-chunk cumprod."""
    return _packed_scan(chunk_starts, chunk_cnts, inputs, "prod", False, False, False)


def exclusive_prod_forward(chunk_starts, chunk_cnts, inputs):
    """``exclusive_prod_forward`` (csrc/scan.cu): per-chunk exclusive cumprod (first value 1)."""
    return _packed_scan(chunk_starts, chunk_cnts, inputs, "prod", True, False, False)


def inclusive_prod_backward(chunk_starts, chunk_cnts, inputs, outputs, grad_outputs):
    """``inclusive_prod_backward``: reversed inclusive sum of grad*out, / inputs.clamp_min(1e-10)."""
    g = _packed_scan(chunk_starts, chunk_cnts, grad_outputs * outputs, "sum", False, False, True)
    return g / inputs.clamp_min(1e-10)


def exclusive_prod_backward(chunk_starts, chunk_cnts, inputs, outputs, grad_outputs):
    """``exclusive_prod_backward``: reversed exclusive sum of grad*out, / inputs.clamp_min(1e-10)."""
    g = _packed_scan(chunk_starts, chunk_cnts, grad_outputs * outputs, "sum", True, False, True)
    return g / inputs.clamp_min(1e-10)


# ----------------------------------------------------------------------------- ray / aabb
def _f32(x) -> Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


def ray_aabb_intersect(rays_o, rays_d, aabbs, near_plane: float, far_plane: float, miss_value: float):
    """``ray_aabb_intersect`` (csrc/grid.cu + device ``ray_aabb_intersect`` of utils_grid.cuh).

    Slab test axis by axis in the kernel's order (x, then y, then z, each with its early miss),
    ``tmax <= 0`` is a miss, hits are clamped to [near, far] with fmaxf/fminf.  Returns
    (t_mins, t_maxs, hits), each [n_rays, n_aabbs]; misses get ``miss_value``.
    """
    o = rays_o.float()[:, None, :]
    d = rays_d.float()[:, None, :]
    inv = 1.0 / d
    lo = aabbs.float()[None, :, :3]
    hi = aabbs.float()[None, :, 3:]
    pos = inv >= 0
    a = (lo - o) * inv
    b = (hi - o) * inv
    t0 = torch.where(pos, a, b)  # per-axis entry
    t1 = torch.where(pos, b, a)  # per-axis exit
    tmin, tmax = t0[..., 0], t1[..., 0]
    hit = torch.ones_like(tmin, dtype=torch.bool)
    for ax in (1, 2):
        tmin_t, tmax_t = t0[..., ax], t1[..., ax]
        miss = (tmin > tmax_t) | (tmin_t > tmax)
        hit = hit & ~miss
        tmin = torch.where(tmin_t > tmin, tmin_t, tmin)
        tmax = torch.where(tmax_t < tmax, tmax_t, tmax)
    hit = hit & ~(tmax <= 0)
    near = _f32(near_plane).to(tmin.device)
    far = _f32(far_plane).to(tmin.device)
    tmin = torch.fmax(tmin, near)
    tmax = torch.fmin(tmax, far)
    miss_v = _f32(miss_value).to(tmin.device)
    t_mins = torch.where(hit, tmin, miss_v)
    t_maxs = torch.where(hit, tmax, miss_v)
    return [t_mins.contiguous(), t_maxs.contiguous(), hit.contiguous()]


# ----------------------------------------------------------------------------- traverse_grids
_EPS = 1e-6  # ``float eps = 1e-6f`` of traverse_grids_kernel


def _segments(t_sorted, t_indices, hits, near_planes, far_planes, n_grids):
    """The per-ray loop ``for i in [0, 2*n_grids-1)`` of traverse_grids_kernel, vectorised.

    Returns (valid, level, this_tmin, this_tmax), each [n_rays, 2*n_grids-1]."""
    S = 2 * n_grids - 1
    idx = t_indices[:, :S].long()
    nxt = t_indices[:, 1 : S + 1].long()
    entering = idx < n_grids
    level = idx % n_grids
    hit_l = hits.gather(1, level)
    next_entering = nxt < n_grids
    level = torch.where(entering, level, nxt % n_grids)
    hit_2 = hits.gather(1, level)
    valid = hit_l & (entering | (~next_entering & hit_2))
    this_tmin = torch.fmax(t_sorted[:, :S].float(), near_planes.float()[:, None])
    this_tmax = torch.fmin(t_sorted[:, 1 : S + 1].float(), far_planes.float()[:, None])
    valid = valid & ~(this_tmin >= this_tmax)
    return valid, level, this_tmin, this_tmax


def _enumerate_cells(o, d, tmin, tmax, amin, amax, level, binaries):
    """``setup_traversal`` + repeated ``single_traversal`` (utils_grid.cuh) for P ray segments.

    Returns (T [P,J] = ``fminf(min(tdist), this_tmax)`` of each visited cell, occ [P,J],
    alive [P,J]) in visiting order; J is the longest walk.
    """
    device = o.device
    P = o.shape[0]
    res = torch.tensor(binaries.shape[1:], device=device, dtype=torch.long)
    rx, ry, rz = [int(v) for v in binaries.shape[1:]]
    flat_bin = binaries.reshape(-1).bool()
    if P == 0:
        e = torch.zeros(0, 0, device=device)
        return e, e.bool(), e.bool()
    res_f = res.float()
    inv = 1.0 / d
    eps = _f32(_EPS).to(device)
    voxel = (amax - amin) / res_f
    ray_start = o + d * (tmin + eps)[:, None]
    ray_end = o + d * (tmax - eps)[:, None]

    def to_index(p):
        u = ((p - amin) / (amax - amin)) * res_f
        u = torch.nan_to_num(u, nan=0.0).clamp(-(2.0**30), 2.0**30)
        i = u.to(torch.int32).long()  # int(x): truncation toward zero
        return torch.minimum(torch.maximum(i, torch.zeros_like(i)), res - 1)

    cur = to_index(ray_start)
    final = to_index(ray_end)
    index_delta = (d > 0).long()
    start_index = cur + index_delta
    tmax_xyz = ((amin + ((start_index.float() * voxel) - ray_start)) * inv) + tmin[:, None]
    zero = d == 0.0
    tmax3 = tmax[:, None].expand(-1, 3)
    tdist = torch.where(zero, tmax3, tmax_xyz)
    step_f = torch.where(zero, torch.zeros_like(d), torch.where(d > 0, torch.ones_like(d), -torch.ones_like(d)))
    step = step_f.long()
    delta = torch.where(zero, tmax3, voxel * inv * step_f)
    overflow = final + step
    level = level.long()
    alive = torch.ones(P, dtype=torch.bool, device=device)
    Ts, occs, alives = [], [], []
    cap = 4 * (rx + ry + rz) + 16
    for _ in range(cap):
        T = torch.fmin(torch.fmin(tdist[:, 0], torch.fmin(tdist[:, 1], tdist[:, 2])), tmax)
        cell = cur[:, 0] * (ry * rz) + cur[:, 1] * rz + cur[:, 2] + level * (rx * ry * rz)
        cell = cell.clamp(0, flat_bin.numel() - 1)
        Ts.append(T)
        occs.append(flat_bin[cell] & alive)
        alives.append(alive.clone())
        cx = (tdist[:, 0] < tdist[:, 1]) & (tdist[:, 0] < tdist[:, 2])
        cy = ~cx & (tdist[:, 1] < tdist[:, 2])
        cz = ~cx & ~cy
        onehot = torch.stack([cx, cy, cz], dim=1) & alive[:, None]
        cur = torch.where(onehot, cur + step, cur)
        tdist = torch.where(onehot, tdist + delta, tdist)
        ov = ((cur == overflow) & onehot).any(dim=1)
        alive = alive & ~ov
        if not bool(alive.any()):
            break
    return torch.stack(Ts, 1), torch.stack(occs, 1), torch.stack(alives, 1)


def _calc_dt(t: Tensor, cone_angle: Tensor, step_size: Tensor) -> Tensor:
    """``_calc_dt``: clamp(t * cone_angle, step_size, 1e10) = fmaxf(step, fminf(t*cone, 1e10))."""
    return torch.fmax(step_size, torch.fmin(t * cone_angle, _f32(1e10).to(t.device)))


def _traverse_loop(valid, pairs_of, cellT, cellOcc, cellAlive, this_tmin, near, step, cone, limit):
    """traverse_grids_kernel as a per-ray state machine (any step size / cone angle / limit).

    Each iteration every unfinished ray takes one action of the kernel (one march step, one
    emitted sample, one cell entry or one traversal step), so the loop mirrors the C++ control
    flow literally.  Returns the emitted steps (ray, t_last, t_next, continuous) in per-ray order
    and the terminate planes."""
    device = near.device
    R, S = valid.shape
    ncell = cellAlive.sum(1) if cellAlive.numel() else torch.zeros(0, dtype=torch.long, device=device)
    # next valid slot >= s (S means none)
    nv = torch.full((R, S + 1), S, dtype=torch.long, device=device)
    for s in range(S - 1, -1, -1):
        nv[:, s] = torch.where(valid[:, s], torch.full_like(nv[:, s], s), nv[:, s + 1])
    DONE, SEG, MARCH, CELL, EMPTY, ADV, OCC = range(7)
    phase = torch.full((R,), SEG, dtype=torch.long, device=device)
    slot = torch.zeros(R, dtype=torch.long, device=device)
    j = torch.zeros(R, dtype=torch.long, device=device)
    t_last = near.float().clone()
    cont = torch.zeros(R, dtype=torch.bool, device=device)
    nsamp = torch.zeros(R, dtype=torch.long, device=device)
    dt_m = torch.zeros(R, dtype=torch.float32, device=device)
    thr = torch.zeros(R, dtype=torch.float32, device=device)
    pair = torch.zeros(R, dtype=torch.long, device=device)
    half = _f32(0.5).to(device)
    recs = []
    ar = torch.arange(R, device=device)
    lim_on = limit > 0
    it = 0
    while True:
        it += 1
        if it > 10_000_000:  # pragma: no cover
            raise RuntimeError("traverse_grids stand-in: no progress")
        # ADVANCE: single_traversal -> next cell or leave the segment
        m = phase == ADV
        if m.any():
            jn = j + 1
            over = jn >= ncell[pair]
            j = torch.where(m, jn, j)
            slot = torch.where(m & over, slot + 1, slot)
            phase = torch.where(m, torch.where(over, SEG, CELL), phase)
        # SEG: next valid segment; march to this_tmin when not continuous
        m = phase == SEG
        if m.any():
            s_new = nv[ar, slot.clamp(max=S)]
            done = m & (s_new >= S)
            phase = torch.where(done, DONE, phase)
            m = m & ~done
            slot = torch.where(m, s_new, slot)
            sc = slot.clamp(max=S - 1)
            pair = torch.where(m, pairs_of[ar, sc], pair)
            j = torch.where(m, torch.zeros_like(j), j)
            tmin_s = this_tmin[ar, sc]
            if float(step) <= 0.0:
                t_last = torch.where(m & ~cont, tmin_s, t_last)
                phase = torch.where(m, CELL, phase)
            else:
                dt = _calc_dt(t_last, cone, step)
                dt_m = torch.where(m & ~cont, dt, dt_m)
                thr = torch.where(m & ~cont, tmin_s, thr)
                phase = torch.where(m, torch.where(cont, CELL, MARCH), phase)
        # MARCH (segment start, dt fixed when the march began)
        m = phase == MARCH
        if m.any():
            stop = t_last + dt_m * half >= thr
            t_last = torch.where(m & ~stop, t_last + dt_m, t_last)
            phase = torch.where(m & stop, CELL, phase)
        # CELL: the outer while condition, then the cell's t_traverse and occupancy
        m = phase == CELL
        if m.any():
            if lim_on:
                capped = m & (nsamp >= limit)
                slot = torch.where(capped, slot + 1, slot)
                phase = torch.where(capped, SEG, phase)
                m = m & ~capped
            pc = pair.clamp(max=max(cellT.shape[0] - 1, 0))
            jc = j.clamp(max=max(cellT.shape[1] - 1, 0))
            T = cellT[pc, jc]
            occ = cellOcc[pc, jc]
            thr = torch.where(m, T, thr)
            empty = m & ~occ
            cont = torch.where(empty, torch.zeros_like(cont), cont)
            if float(step) <= 0.0:
                t_last = torch.where(empty, T, t_last)
                phase = torch.where(empty, ADV, phase)
            else:
                dt = _calc_dt(t_last, cone, step)
                dt_m = torch.where(empty, dt, dt_m)
                phase = torch.where(empty, EMPTY, phase)
            phase = torch.where(m & occ, OCC, phase)
        # EMPTY: march through an empty cell (dt fixed on entry)
        m = phase == EMPTY
        if m.any():
            stop = t_last + dt_m * half >= thr
            t_last = torch.where(m & ~stop, t_last + dt_m, t_last)
            phase = torch.where(m & stop, ADV, phase)
        # OCC: one emitted step inside an occupied cell
        m = phase == OCC
        if m.any():
            if lim_on:
                capped = m & (nsamp >= limit)
                phase = torch.where(capped, ADV, phase)
                m = m & ~capped
            if float(step) <= 0.0:
                t_next = thr
                emit = m
            else:
                dt = _calc_dt(t_last, cone, step)
                stop = t_last + dt * half >= thr
                phase = torch.where(m & stop, ADV, phase)
                emit = m & ~stop
                t_next = t_last + dt
            if emit.any():
                recs.append((ar[emit], t_last[emit], t_next[emit], cont[emit]))
                nsamp = nsamp + emit.long()
                cont = cont | emit
                t_last = torch.where(emit, t_next, t_last)
                phase = torch.where(emit & (t_next >= thr), ADV, phase)
        if not bool((phase != DONE).any()):
            break
    if recs:
        ray = torch.cat([r[0] for r in recs])
        order = torch.argsort(ray, stable=True)
        out = [torch.cat([r[k] for r in recs])[order] for k in range(4)]
    else:
        z = torch.zeros(0, device=device)
        out = [z.long(), z, z, z.bool()]
    return out[0], out[1], out[2], out[3], t_last


def _traverse_fast(valid, pairs_of, pair_ray, cellT, cellOcc, cellAlive, this_tmin, this_tmax, near, step, limit):
    """traverse_grids_kernel for ``step_size > 0`` and ``cone_angle == 0`` without a per-step loop.

    With a zero cone angle every march (empty cell, segment start or occupied cell) advances
    ``t_last`` by the same ``dt = step_size``, so ``t_last`` runs through one float32 sequence
    t_0 = near, t_{k+1} = t_k + dt per ray, and step k is consumed by the first context (segment
    start march, or a visited cell) whose threshold exceeds its midpoint t_k + dt/2; it is emitted
    when that context is an occupied cell.  Same outputs as :func:`_traverse_loop`."""
    device = near.device
    R, S = valid.shape
    dt = step
    half = dt * 0.5  # exact in float32
    near = near.float()
    # sequence t[:, k]; extend until every ray's midpoints pass its last threshold
    need = torch.where(valid, this_tmax, torch.full_like(this_tmax, -float("inf"))).amax(1) if S else near
    has = valid.any(1) if S else torch.zeros_like(near, dtype=torch.bool)
    cols = [near]
    t = near
    target = torch.where(has, need, near)
    while True:
        if len(cols) > 200_000:
            raise RuntimeError("traverse_grids stand-in: too many marching steps")
        block = []
        for _ in range(64):
            t = t + dt
            block.append(t)
        cols.extend(block)
        if not bool(((t + half) < target).any()):
            break
    tseq = torch.stack(cols, 1)  # [R, K+1]
    mid = (tseq + half)[:, :-1].contiguous()  # [R, K]
    K = mid.shape[1]
    k0 = torch.zeros(R, dtype=torch.long, device=device)
    cont = torch.zeros(R, dtype=torch.bool, device=device)
    em_ray, em_k, em_cont, em_key = [], [], [], []
    J = cellT.shape[1] if cellT.numel() else 0
    for s in range(S):
        rows = torch.nonzero(valid[:, s]).flatten()
        if rows.numel() == 0:
            continue
        p = pairs_of[rows, s]
        alive = cellAlive[p]
        occ = cellOcc[p] & alive
        empty = alive & ~cellOcc[p]
        march_thr = torch.where(cont[rows], torch.full_like(near[rows], -float("inf")), this_tmin[rows, s])
        thr = torch.cat([march_thr[:, None], torch.where(alive, cellT[p], torch.full_like(cellT[p], -float("inf")))], 1)
        thr = torch.cummax(thr, 1).values
        n = torch.searchsorted(mid[rows], thr.contiguous(), side="left")  # steps with midpoint < thr
        n = torch.maximum(n, k0[rows][:, None])
        lo, hi = n[:, :-1], n[:, 1:]  # cell j consumes steps [lo_j, hi_j)
        cnt = torch.where(occ, hi - lo, torch.zeros_like(lo))
        E = torch.cumsum(empty.long(), 1)  # empty cells up to and including j
        flat_cnt = cnt.reshape(-1)
        pr = torch.arange(rows.numel(), device=device).repeat_interleave(J)
        jj = torch.arange(J, device=device).repeat(rows.numel())
        sel = flat_cnt > 0
        pr, jj, c_sel, lo_sel = pr[sel], jj[sel], flat_cnt[sel], lo.reshape(-1)[sel]
        e_pr = pr.repeat_interleave(c_sel)
        e_j = jj.repeat_interleave(c_sel)
        first = torch.cumsum(c_sel, 0) - c_sel
        e_k = lo_sel.repeat_interleave(c_sel) + (torch.arange(e_pr.numel(), device=device) - first.repeat_interleave(c_sel))
        e_E = E[e_pr, e_j]
        same_prev = torch.zeros_like(e_pr, dtype=torch.bool)
        prev_E = torch.zeros_like(e_E)
        if e_pr.numel() > 1:
            same_prev[1:] = e_pr[1:] == e_pr[:-1]
            prev_E[1:] = e_E[:-1]
        e_cont = torch.where(same_prev, e_E == prev_E, cont[rows][e_pr] & (e_E == 0))
        em_ray.append(rows[e_pr])
        em_k.append(e_k)
        em_cont.append(e_cont)
        em_key.append(rows[e_pr] * S + s)
        # state after the segment
        E_tot = E[:, -1] if J else torch.zeros(rows.numel(), dtype=torch.long, device=device)
        any_em = cnt.sum(1) > 0
        last_j = torch.where(cnt > 0, torch.arange(J, device=device)[None, :], -1).amax(1) if J else torch.full_like(rows, -1)
        E_last = E[torch.arange(rows.numel(), device=device), last_j.clamp_min(0)] if J else E_tot
        cont[rows] = torch.where(any_em, E_tot == E_last, cont[rows] & (E_tot == 0))
        k0[rows] = n[:, -1]
    if em_ray:
        key = torch.cat(em_key)
        order = torch.argsort(key, stable=True)
        ray = torch.cat(em_ray)[order]
        k = torch.cat(em_k)[order]
        c = torch.cat(em_cont)[order]
    else:
        ray = torch.zeros(0, dtype=torch.long, device=device)
        k = ray.clone()
        c = ray.bool()
    terminate = tseq[torch.arange(R, device=device), k0.clamp(max=K)]
    t_last = tseq[ray, k]
    t_next = tseq[ray, k + 1]
    if limit > 0 and ray.numel():
        cnts = torch.bincount(ray, minlength=R)
        starts = torch.cumsum(cnts, 0) - cnts
        rank = torch.arange(ray.numel(), device=device) - starts[ray]
        keep = rank < limit
        capped = cnts >= limit
        idx_last = (starts + limit - 1).clamp(max=max(ray.numel() - 1, 0))
        terminate = torch.where(capped, t_next[idx_last], terminate)
        ray, t_last, t_next, c = ray[keep], t_last[keep], t_next[keep], c[keep]
    return ray, t_last, t_next, c, terminate


def _pack_outputs(n_rays, ray, t_last, t_next, cont, compute_intervals, compute_samples, over_allocate, limit, rays_mask, device):
    """Write the emitted steps out as the kernel's two RaySegmentsSpec (intervals, samples)."""
    cnt_s = torch.bincount(ray, minlength=n_rays) if ray.numel() else torch.zeros(n_rays, dtype=torch.long, device=device)
    n_edges = torch.where(cont, 1, 2).long()
    nxt_cont = torch.zeros_like(cont)
    if ray.numel() > 1:
        nxt_cont[:-1] = cont[1:] & (ray[1:] == ray[:-1])
    cnt_i = torch.zeros(n_rays, dtype=torch.long, device=device).index_add_(0, ray, n_edges) if ray.numel() else cnt_s.clone()
    # local positions inside each ray's chunk
    e_start = torch.cumsum(n_edges, 0) - n_edges  # global edge offset
    ray_first_edge = (torch.cumsum(cnt_i, 0) - cnt_i)[ray] if ray.numel() else e_start
    loc_left = e_start - ray_first_edge  # local index of this step's first edge
    loc_right = loc_left + n_edges - 1
    s_first = (torch.cumsum(cnt_s, 0) - cnt_s)[ray] if ray.numel() else e_start
    loc_s = torch.arange(ray.numel(), device=device) - s_first
    intervals, samples = RaySegmentsSpec(), RaySegmentsSpec()
    if over_allocate:
        pre_i = torch.full((n_rays,), limit * 2, dtype=torch.long, device=device) * rays_mask.long()
        pre_s = torch.full((n_rays,), limit, dtype=torch.long, device=device) * rays_mask.long()
        base_i, base_s = _starts_from_cnts(pre_i), _starts_from_cnts(pre_s)
        size_i, size_s = int(pre_i.sum().item()), int(pre_s.sum().item())
    else:
        base_i, base_s = _starts_from_cnts(cnt_i), _starts_from_cnts(cnt_s)
        size_i, size_s = int(cnt_i.sum().item()), int(cnt_s.sum().item())
    if compute_intervals:
        vals = torch.zeros(size_i, dtype=torch.float32, device=device)
        ridx = torch.zeros(size_i, dtype=torch.long, device=device)
        is_left = torch.zeros(size_i, dtype=torch.bool, device=device)
        is_right = torch.zeros(size_i, dtype=torch.bool, device=device)
        if ray.numel():
            pl = base_i[ray] + loc_left
            pr = base_i[ray] + loc_right
            nc = ~cont
            vals[pl[nc]] = t_last[nc]
            is_left[pl[nc]] = True
            ridx[pl] = ray
            vals[pr] = t_next
            ridx[pr] = ray
            is_right[pr] = True
            is_left[pr] = nxt_cont
        intervals.vals, intervals.ray_indices = vals, ridx
        intervals.is_left, intervals.is_right = is_left, is_right
        intervals.chunk_cnts = cnt_i
        intervals.chunk_starts = _starts_from_cnts(cnt_i)
    if compute_samples:
        vals = torch.zeros(size_s, dtype=torch.float32, device=device)
        ridx = torch.zeros(size_s, dtype=torch.long, device=device)
        is_valid = torch.zeros(size_s, dtype=torch.bool, device=device)
        if ray.numel():
            ps = base_s[ray] + loc_s
            vals[ps] = (t_next + t_last) * 0.5
            ridx[ps] = ray
            is_valid[ps] = True
        samples.vals, samples.ray_indices, samples.is_valid = vals, ridx, is_valid
        samples.chunk_cnts = cnt_s
        samples.chunk_starts = _starts_from_cnts(cnt_s)
    return intervals, samples


def traverse_grids(
    rays_o, rays_d, rays_mask, binaries, aabbs, t_sorted, t_indices, hits,
    near_planes, far_planes, step_size: float, cone_angle: float,
    compute_intervals: bool, compute_samples: bool, compute_terminate_planes: bool,
    traverse_steps_limit: int, over_allocate: bool, _force_loop: bool = False,
):
    """``traverse_grids`` (csrc/grid.cu, traverse_grids_kernel): ray marching through binary grids.

    Mirrors the kernel: segments between the sorted ray/grid intersections, the DDA cell walk of
    ``setup_traversal``/``single_traversal`` (eps 1e-6), marching with ``_calc_dt`` (dt fixed
    per empty-cell/segment-start march, recomputed per emitted step), continuous runs sharing an
    edge, ``traverse_steps_limit`` and ``over_allocate`` (data at the pre-allocated offsets,
    chunk_starts recomputed from the real counts; ``rays_mask`` only used then, as in the C++).
    Returns (intervals, samples, terminate_planes); terminate planes of masked-out rays (left
    uninitialised by the C++) are their near planes.  ``step_size > 0`` with ``cone_angle == 0``
    takes a loop-free path (:func:`_traverse_fast`); ``_force_loop`` selects the literal one.
    """
    if over_allocate and not traverse_steps_limit > 0:
        raise RuntimeError("traverse_steps_limit must be > 0 when over_allocate is true")
    device = rays_o.device
    R = rays_o.shape[0]
    G = binaries.shape[0]
    o = rays_o.float()
    d = rays_d.float()
    step = _f32(step_size).to(device)
    cone = _f32(cone_angle).to(device)
    near = near_planes.float()
    valid, level, this_tmin, this_tmax = _segments(t_sorted, t_indices, hits.bool(), near, far_planes, G)
    if over_allocate:
        valid = valid & rays_mask.bool()[:, None]
    S = valid.shape[1]
    pr, ps = torch.nonzero(valid, as_tuple=True)
    pairs_of = torch.full((R, S), -1, dtype=torch.long, device=device)
    pairs_of[pr, ps] = torch.arange(pr.numel(), device=device)
    lv = level[pr, ps]
    ab = aabbs.float()[lv]
    cellT, cellOcc, cellAlive = _enumerate_cells(
        o[pr], d[pr], this_tmin[pr, ps], this_tmax[pr, ps], ab[:, :3], ab[:, 3:], lv, binaries
    )
    limit = int(traverse_steps_limit)
    if float(step) > 0 and float(cone) == 0.0 and not _force_loop:
        ray, t_last, t_next, cont, term = _traverse_fast(
            valid, pairs_of, pr, cellT, cellOcc, cellAlive, this_tmin, this_tmax, near, step, limit
        )
    else:
        ray, t_last, t_next, cont, term = _traverse_loop(
            valid, pairs_of, cellT, cellOcc, cellAlive, this_tmin, near, step, cone, limit
        )
    intervals, samples = _pack_outputs(
        R, ray, t_last, t_next, cont, compute_intervals, compute_samples, over_allocate, limit,
        rays_mask if rays_mask is not None else torch.ones(R, dtype=torch.bool, device=device), device,
    )
    terminate = term.clone() if compute_terminate_planes else None
    return intervals, samples, terminate


# ----------------------------------------------------------------------------- pdf
def _dense_rows(spec: RaySegmentsSpec, data: Tensor, n_rows: Optional[int] = None):
    """Rows of ``data`` laid out like ``spec`` (batched or flattened): (dense [N, E], lengths [N])."""
    if spec.vals.dim() > 1:
        E = spec.vals.shape[-1]
        dense = data.reshape(-1, E)
        return dense, torch.full((dense.shape[0],), E, dtype=torch.long, device=data.device)
    cnts = spec.chunk_cnts.long()
    rows, cols, elems, max_cnt = _chunk_layout(spec.chunk_starts, cnts)
    dense = torch.zeros((cnts.numel(), max(max_cnt, 1)), dtype=data.dtype, device=data.device)
    dense[rows, cols] = data[elems]
    return dense, cnts


def _upper_bound_rows(dense: Tensor, lengths: Tensor, values: Tensor) -> Tensor:
    """``upper_bound(data, base, last, v)`` of pdf.cu per row: first index in [0, len-1) whose value
    is > v, else len-1 (the last element is never compared)."""
    L = (lengths - 1).clamp_min(0)
    cols = torch.arange(dense.shape[1], device=dense.device)
    padded = torch.where(cols[None, :] < L[:, None], dense, torch.full_like(dense, float("inf")))
    p = torch.searchsorted(padded.contiguous(), values.contiguous(), right=True)
    return torch.minimum(p, L[:, None])


def _sample_rows(vals_d, cdfs_d, lengths, n_per_row: Tensor, n_max: int, stratified: bool):
    """importance_sampling_kernel for every (row, sid < n_max): returns samples [N, n_max]."""
    device = cdfs_d.device
    N = cdfs_d.shape[0]
    L = (lengths - 1).clamp_min(0)
    ar = torch.arange(N, device=device)
    u_floor = cdfs_d[ar, 0]
    u_ceil = cdfs_d[ar, L]
    u_step = (u_ceil - u_floor) / n_per_row.clamp_min(1).float()
    if stratified:
        bias = 1.0 - torch.rand(N, device=device, dtype=torch.float32)  # curand_uniform: (0, 1]
    else:
        bias = torch.full((N,), 0.5, device=device, dtype=torch.float32)
    sid = torch.arange(n_max, device=device, dtype=torch.float32)
    u = u_floor[:, None] + (sid[None, :] + bias[:, None]) * u_step[:, None]
    p = _upper_bound_rows(cdfs_d, lengths, u)
    p0 = torch.minimum((p - 1).clamp_min(0), L[:, None])
    p1 = torch.minimum(p.clamp_min(0), L[:, None])
    u_lo, u_up = cdfs_d.gather(1, p0), cdfs_d.gather(1, p1)
    t_lo, t_up = vals_d.gather(1, p0), vals_d.gather(1, p1)
    flat = (u_up - u_lo) < 1e-10
    scaling = (t_up - t_lo) / torch.where(flat, torch.ones_like(u_up), u_up - u_lo)
    t = torch.where(flat, (t_lo + t_up) * 0.5, (u - u_lo) * scaling + t_lo)
    return t


def _edges_rows(samples: Tensor, n_per_row: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """compute_intervels_kernel: edges [N, n_max+1] between samples, ends clamped to [t_min, t_max].

    A row with a single sample gets [t_min, t_max] (the kernel reads past the row there)."""
    N, n_max = samples.shape
    device = samples.device
    edges = torch.zeros((N, n_max + 1), dtype=samples.dtype, device=device)
    if n_max == 0:
        return edges
    ar = torch.arange(N, device=device)
    if n_max > 1:
        edges[:, 1:n_max] = (samples[:, 1:] + samples[:, :-1]) * 0.5
    s0 = samples[:, 0]
    s1 = samples[:, 1] if n_max > 1 else s0
    first = torch.fmax(s0 - (s1 - s0) * 0.5, t_min)
    last_i = (n_per_row - 1).clamp_min(0)
    sl = samples[ar, last_i]
    sp = samples[ar, (last_i - 1).clamp_min(0)]
    last = torch.fmin(sl + (sl - sp) * 0.5, t_max)
    single = n_per_row == 1
    edges[:, 0] = torch.where(single, t_min, first)
    edges[ar, last_i + 1] = torch.where(single, t_max, last)
    return edges


def importance_sampling(ray_segments: RaySegmentsSpec, cdfs: Tensor, n_intervels_per_ray, stratified: bool):
    """``importance_sampling`` (csrc/pdf.cu), both overloads: inverse-CDF sampling + new intervals.

    int ``n_intervels_per_ray``: batched outputs ``samples.vals`` [..., n] and ``intervals.vals``
    [..., n+1] (for a flattened input: [n_rays, n], [n_rays, n+1]).  Stratified sampling draws one
    uniform (0, 1] offset per ray, as the kernel's per-ray Philox state does.
    Tensor ``n_intervels_per_ray``: packed outputs (samples: chunk_starts/cnts, ray_indices;
    intervals: cnts = (n+1)*(n>0) with is_left/is_right).  That overload of nerfacc 0.5.3's C++
    allocates wrong sizes (``memalloc_data(false, false)``); this implements its evident intent.
    """
    cdfs = cdfs.float()
    vals = ray_segments.vals.float()
    vals_d, lengths = _dense_rows(ray_segments, vals)
    cdfs_d, _ = _dense_rows(ray_segments, cdfs)
    N = vals_d.shape[0]
    device = cdfs.device
    ar = torch.arange(N, device=device)
    L = (lengths - 1).clamp_min(0)
    t_min, t_max = vals_d[ar, 0], vals_d[ar, L]
    samples, intervals = RaySegmentsSpec(), RaySegmentsSpec()
    if isinstance(n_intervels_per_ray, Tensor):
        n_r = n_intervels_per_ray.reshape(-1).long().to(device)
        n_max = int(n_r.max().item()) if n_r.numel() else 0
        s = _sample_rows(vals_d, cdfs_d, lengths, n_r, n_max, stratified)
        e = _edges_rows(s, n_r, t_min, t_max)
        cols = torch.arange(n_max + 1, device=device)
        ms = cols[None, :n_max] < n_r[:, None]
        cnt_i = (n_r + 1) * (n_r > 0).long()
        mi = cols[None, :] < cnt_i[:, None]
        samples.vals = s[ms]
        samples.chunk_cnts = n_r
        samples.chunk_starts = _starts_from_cnts(n_r)
        samples.ray_indices = ar[:, None].expand(-1, n_max)[ms]
        intervals.vals = e[mi]
        intervals.chunk_cnts = cnt_i
        intervals.chunk_starts = _starts_from_cnts(cnt_i)
        intervals.ray_indices = ar[:, None].expand(-1, n_max + 1)[mi]
        intervals.is_left = (cols[None, :] < n_r[:, None]).expand(N, -1)[mi]
        intervals.is_right = (cols[None, :] > 0).expand(N, -1)[mi]
        return [intervals, samples]
    n = int(n_intervels_per_ray)
    n_r = torch.full((N,), n, dtype=torch.long, device=device)
    s = _sample_rows(vals_d, cdfs_d, lengths, n_r, n, stratified)
    e = _edges_rows(s, n_r, t_min, t_max)
    lead = tuple(ray_segments.vals.shape[:-1]) if ray_segments.vals.dim() > 1 else (N,)
    samples.vals = s.reshape(lead + (n,))
    intervals.vals = e.reshape(lead + (n + 1,))
    return [intervals, samples]


def searchsorted(query: RaySegmentsSpec, key: RaySegmentsSpec):
    """``searchsorted`` (csrc/pdf.cu): ids (left, right) with key[left] <= query < key[right].

    Upper bound over each key row without its last element, clamped to the row; batched queries
    get indices relative to the row, flattened queries absolute indices into ``key.vals``."""
    q = query.vals.float()
    device = q.device
    if q.dim() > 1:
        qd = q.reshape(-1, q.shape[-1])
        ray = torch.arange(qd.shape[0], device=device)[:, None].expand_as(qd).reshape(-1)
        qv = qd.reshape(-1)
    else:
        qv = q
        if query.ray_indices is not None:
            ray = query.ray_indices.long()
        else:
            pos = torch.arange(q.numel(), device=device)
            ray = torch.searchsorted(query.chunk_starts.long().contiguous(), pos, right=True) - 1
    key_d, lengths = _dense_rows(key, key.vals.float())
    if key.vals.dim() > 1:
        base = torch.arange(key_d.shape[0], device=device) * key.vals.shape[-1]
    else:
        base = key.chunk_starts.long()
    if qv.numel() == 0:
        e = torch.zeros(q.shape, dtype=torch.long, device=device)
        return [e, e.clone()]
    ray_c = ray.clamp(0, max(key_d.shape[0] - 1, 0))
    # queries laid out as dense rows (one per key row) for a row-wise search
    order = torch.argsort(ray_c, stable=True)
    cnt = torch.bincount(ray_c, minlength=key_d.shape[0])
    first = torch.cumsum(cnt, 0) - cnt
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device) - first[ray_c[order]]
    qdense = torch.zeros((key_d.shape[0], max(int(cnt.max().item()), 1)), dtype=qv.dtype, device=device)
    qdense[ray_c, rank] = qv
    p = _upper_bound_rows(key_d, lengths, qdense)[ray_c, rank]
    L = (lengths[ray_c] - 1).clamp_min(0)
    left = torch.minimum((p - 1).clamp_min(0), L)
    right = torch.minimum(p.clamp_min(0), L)
    if q.dim() <= 1:
        left = left + base[ray_c]
        right = right + base[ray_c]
    return [left.reshape(q.shape), right.reshape(q.shape)]


# ----------------------------------------------------------------------------- cameras
def opencv_lens_undistortion(*args, **kwargs):
    """``opencv_lens_undistortion`` (csrc/camera.cu): not implemented in the torch stand-in."""
    raise NotImplementedError("nerfacc_torch: opencv_lens_undistortion is not implemented")


def opencv_lens_undistortion_fisheye(*args, **kwargs):
    """``opencv_lens_undistortion_fisheye`` (csrc/camera.cu): not implemented in the stand-in."""
    raise NotImplementedError("nerfacc_torch: opencv_lens_undistortion_fisheye is not implemented")


# ----------------------------------------------------------------------------- install
def _pack_info_any_device(ray_indices, n_rays=None):
    """nerfacc.pack.pack_info without its CUDA-only guard (body otherwise unchanged)."""
    assert ray_indices.dim() == 1, "ray_indices must be a 1D tensor with shape (n_samples)."
    device = ray_indices.device
    dtype = ray_indices.dtype
    if n_rays is None:
        n_rays = ray_indices.max().item() + 1
    chunk_cnts = torch.zeros((n_rays,), device=device, dtype=dtype)
    chunk_cnts.index_add_(0, ray_indices, torch.ones_like(ray_indices))
    chunk_starts = chunk_cnts.cumsum(dim=0, dtype=dtype) - chunk_cnts
    packed_info = torch.stack([chunk_starts, chunk_cnts], dim=-1)
    return packed_info


_C_NAMES = (
    "RaySegmentsSpec", "inclusive_sum", "exclusive_sum", "inclusive_prod_forward",
    "inclusive_prod_backward", "exclusive_prod_forward", "exclusive_prod_backward",
    "ray_aabb_intersect", "traverse_grids", "importance_sampling", "searchsorted",
    "opencv_lens_undistortion", "opencv_lens_undistortion_fisheye",
)


def _build_backend() -> types.ModuleType:
    C = types.ModuleType("nerfacc_torch._C")
    C.__doc__ = "Pure-torch functions standing in for nerfacc's compiled _C."
    g = globals()
    for name in _C_NAMES:
        setattr(C, name, g[name])
    backend = types.ModuleType(_MODULE_NAME)
    backend.__doc__ = "nerfacc.cuda._backend replaced by tests/nerfacc_torch.py (pure torch)."
    backend._C = C
    backend.__nerfacc_torch__ = True
    return backend


def install() -> types.ModuleType:
    """Make nerfacc run on pure torch: ``sys.modules["nerfacc.cuda._backend"]._C`` becomes this
    module's functions and ``nerfacc.pack.pack_info`` accepts CPU tensors.  Idempotent; works
    whether or not nerfacc was imported before.  Returns the backend module."""
    import nerfacc.cuda  # noqa: F401  (its lazy wrappers import _C from sys.modules at each call)
    import nerfacc.pack

    backend = sys.modules.get(_MODULE_NAME)
    if backend is None or not getattr(backend, "__nerfacc_torch__", False):
        backend = _build_backend()
        sys.modules[_MODULE_NAME] = backend
    setattr(sys.modules["nerfacc.cuda"], "_backend", backend)
    target = getattr(nerfacc.pack.pack_info, "__wrapped__", nerfacc.pack.pack_info)
    if target.__code__ is not _pack_info_any_device.__code__:
        target.__code__ = _pack_info_any_device.__code__
    return backend
