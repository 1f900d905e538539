"""Measure ``rfds-bench run --gpus`` scheduling: M sleep-only launches of length L on N fake GPUs.

    python -m threestudio_rfds.bench.measure_fanout [--length 2] [--runs 8] [--gpus 1 2 4]

The fake ``launch.py`` (standard library only) sleeps L seconds and writes one test render, so a
run's wall time is L plus process start-up.  Ideal wall time is ⌈M/N⌉·L; the overhead per run is
(wall − ideal) / ⌈M/N⌉ — process start-up, ledger claim and record, and the poll interval — and
the start gap is the mean time a GPU slot sat free between one run's end and the next run's start.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Dict, List

FAKE_LAUNCH = r'''
import os, sys, time, zlib, struct
start = time.time()
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
root = args["exp_root_dir"].strip("'")
save = os.path.join(root, args["name"], args["tag"], "save", "it1-test")
time.sleep(max(0.0, float(os.environ["FAKE_LENGTH_S"]) - (time.time() - start)))
os.makedirs(save, exist_ok=True)
def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) \
    + chunk(b"IDAT", zlib.compress(b"\x00\x80\x80\x80")) + chunk(b"IEND", b"")
open(os.path.join(save, "0.png"), "wb").write(png)
'''


def _fake_threestudio(root: str) -> str:
    os.makedirs(os.path.join(root, "configs"), exist_ok=True)
    os.makedirs(os.path.join(root, "threestudio"), exist_ok=True)
    open(os.path.join(root, "threestudio", "__init__.py"), "w").close()  # for the preflight's import
    with open(os.path.join(root, "launch.py"), "w") as f:
        f.write(FAKE_LAUNCH)
    with open(os.path.join(root, "configs", "sleep.yaml"), "w") as f:
        f.write("name: sleep\n")
    return root


def measure(n_gpus: int, n_runs: int, length: float, work: str) -> Dict[str, float]:
    from .ledger import Ledger
    from .runner import run_suite
    from .suite import parse_suite

    ts = _fake_threestudio(os.path.join(work, "threestudio"))
    out = os.path.join(work, f"out-{n_gpus}")
    suite = parse_suite({"name": "sleep", "configs": ["configs/sleep.yaml"],
                         "prompts": [f"prompt {i}" for i in range(n_runs)]})
    os.environ["FAKE_LENGTH_S"] = str(length)
    t0 = time.monotonic()
    counts = run_suite(suite, ts, out, gpus=",".join(str(i) for i in range(n_gpus)), progress_every=1e9,
                       log=lambda s: None)
    wall = time.monotonic() - t0
    assert counts["done"] == n_runs, counts
    recs = [r for r in Ledger(os.path.join(out, "ledger.jsonl")).records() if r["status"] == "done"]
    gaps: List[float] = []
    for g in {r["gpu"] for r in recs}:
        spans = sorted((r["start_time"], r["end_time"]) for r in recs if r["gpu"] == g)
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    waves = math.ceil(n_runs / n_gpus)
    ideal = waves * length
    return {"gpus": n_gpus, "runs": n_runs, "length": length, "ideal": ideal, "wall": wall,
            "overhead_per_run": (wall - ideal) / waves,
            "run_wall_minus_L": sum(r["wall_time_s"] for r in recs) / len(recs) - length,
            "start_gap": sum(gaps) / len(gaps) if gaps else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=float, default=2.0, help="seconds each fake launch sleeps (L)")
    ap.add_argument("--runs", type=int, default=8, help="runs in the suite (M)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="fake GPU counts (N) to try")
    args = ap.parse_args(argv)
    print(f"{'N':>3} {'M':>3} {'L (s)':>6} {'ideal (s)':>10} {'wall (s)':>9} {'overhead/run (s)':>17} "
          f"{'run wall − L (s)':>17} {'start gap (s)':>14}")
    with tempfile.TemporaryDirectory() as work:
        for n in args.gpus:
            r = measure(n, args.runs, args.length, work)
            print(f"{r['gpus']:>3} {r['runs']:>3} {r['length']:>6.1f} {r['ideal']:>10.1f} {r['wall']:>9.2f} "
                  f"{r['overhead_per_run']:>17.3f} {r['run_wall_minus_L']:>17.3f} {r['start_gap']:>14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
