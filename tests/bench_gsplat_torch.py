"""Benchmark of tests/gsplat_torch.py: ms per ``gsplat.rasterization`` forward + backward on CPU.

    OMP_NUM_THREADS=1 python tests/bench_gsplat_torch.py [--gaussians 4096] [--views 4] [--size 64]

Gaussians in a ball of radius 0.5 with scales 0.02-0.05 and opacity 0.1 (a typical sphere
initialisation), cameras on a circle at distance 3 looking at the centre, fov 45°, SH degree 3,
render_mode "RGB+ED", packed=False, absgrad=True.  Prints the median of ``--repeat`` runs after one
warm-up, and the number of tile intersections.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gsplat_torch  # noqa: E402

gsplat_torch.install()
import gsplat  # noqa: E402
from test_gsplat_torch import look_at  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussians", type=int, default=4096)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    n, size = args.gaussians, args.size
    d = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
    means = d * 0.5 * torch.rand(n, 1) ** (1 / 3)
    params = [means, torch.randn(n, 4), torch.rand(n, 3) * 0.03 + 0.02, torch.full((n,), 0.1),
              torch.randn(n, 16, 3) * 0.1]
    params = [p.requires_grad_(True) for p in params]
    angles = [2 * math.pi * i / args.views for i in range(args.views)]
    viewmats = torch.stack([look_at([3 * math.sin(a), 0.3, 3 * math.cos(a)]) for a in angles])
    f = 0.5 * size / math.tan(math.radians(22.5))
    Ks = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]]).expand(args.views, 3, 3).contiguous()

    def step() -> int:
        out, alphas, meta = gsplat.rasterization(*params, viewmats, Ks, size, size, sh_degree=3, packed=False,
                                                 render_mode="RGB+ED", absgrad=True)
        (out.mean() + alphas.mean()).backward()
        return int(meta["isect_ids"].numel())

    n_isects = step()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"gsplat_torch: {n} Gaussians, {args.views} x {size}x{size}, {n_isects} intersections, "
          f"{torch.get_num_threads()} thread(s): {1000 * statistics.median(times):.0f} ms per rasterization "
          f"forward+backward (median of {args.repeat}; min {1000 * min(times):.0f} ms)")


if __name__ == "__main__":
    main()
