"""The phases of scripts/device/run.sh: what each runs, its timeout, and the least time worth starting it.

Order is priority: when the budget runs short the later phases are cut or skipped, never the
earlier ones.  ``smoke`` gives the same phases with tiny models and sizes for a CPU check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

STEP = ["-m", "threestudio_rfds.steptime.guidance_step"]
ALL_CASES = "sd3-rfds,sd3-rfds-rev,instaflow-rfds,instaflow-rfds-rev"
NERF_CONFIGS = ["rfds-sd3.yaml", "rfds-rev-sd3.yaml", "rfds-sd3-low-memory.yaml", "rfds-rev-sd3-low-memory.yaml",
                "rfds-instaflow.yaml", "rfds-rev-instaflow.yaml"]
TARGET_MS = {"sd3-rfds": 25, "sd3-rfds-rev": 35, "instaflow-rfds": 25, "instaflow-rfds-rev": 35}
SD3_PEAK_GIB = 6.0


@dataclass
class Phase:
    name: str
    kind: str  # "models" | "step" | "train"
    timeout_s: float
    min_s: float  # skipped when less than this is left for it
    args: List[str] = field(default_factory=list)  # step: benchmark flags; train: [config file name]


def plan(smoke: bool) -> List[Phase]:
    """Every phase in priority order (GPU budget ≈ 9 min; see docs/performance.md)."""
    k = 4.0 if smoke else 1.0  # the CPU is slower; smoke runs only have to finish
    size = ["--tiny", "--steps", "1", "--warmup", "1"] if smoke else ["--steps", "10", "--warmup", "3"]
    early = "32" if smoke else "256"  # the 3D configs' first resolution milestone (256², then 512²)
    phases = [
        Phase("models", "models", 120 * k, 20),
        Phase("step-eager", "step", 90 * k, 20, size + ["--cases", ALL_CASES, "--label", "eager", "--profile", "PROFILE"]),
        Phase("step-compile-sd3", "step", 150 * k, 40,
              size + ["--cases", "sd3-rfds,sd3-rfds-rev", "--compile", "--compile-vae", "--label", "compile+vae"]),
    ]
    phases += [Phase(f"train:{c}", "train", (240 if smoke else 45), 20, [c]) for c in NERF_CONFIGS]
    phases += [
        Phase("step-cudagraphs", "step", 120 * k, 40, size + ["--cases", ALL_CASES, "--cuda-graphs", "--label", "cudagraphs"]),
        Phase("step-fp8-sd3", "step", 90 * k, 40,
              size + ["--cases", "sd3-rfds,sd3-rfds-rev", "--fp8", "--compile", "--label", "fp8+compile"]),
        Phase("step-compile-instaflow", "step", 90 * k, 40,
              size + ["--cases", "instaflow-rfds,instaflow-rfds-rev", "--compile", "--compile-vae", "--label", "compile+vae"]),
        # compile warm-up of each shape a 3D run meets (256² then 512², B and 2B passes); one static
        # graph per shape; a "progress" line after each resolution survives a cut
        Phase("step-warmup-shapes", "step", 150 * k, 60,
              size + ["--cases", "sd3-rfds-rev", "--compile", "--compile-vae", "--warmup-resolutions", early,
                      "--label", "compile+vae, warm-up per shape"]),
    ]
    return phases


def select(phases: List[Phase], spec: str) -> List[Phase]:
    """Phases whose name starts with one of the comma-separated prefixes in ``spec`` ("" = all)."""
    prefixes = [p.strip() for p in spec.split(",") if p.strip()]
    return [p for p in phases if not prefixes or any(p.name.startswith(x) for x in prefixes)]
