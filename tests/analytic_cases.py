"""Shared closed-form test problems (threestudio_rfds.analytic) for the flow / RFDS tests."""
import torch

from threestudio_rfds.analytic import GaussianFlow, GaussianMixtureFlow
from threestudio_rfds.flow import instaflow_convention, sd3_convention

# three well separated 2-D classes, unequal weights and anisotropic spreads
MEANS = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
STDS = [[0.3, 0.3], [0.5, 0.4], [0.2, 0.6]]
WEIGHTS = [1.0, 2.0, 1.0]

CONVENTIONS = {
    "sd3-shift1": lambda: sd3_convention(shift=1.0),
    "sd3-shift3": lambda: sd3_convention(shift=3.0),
    "instaflow": lambda: instaflow_convention("model"),
}


def mixture(convention=None) -> GaussianMixtureFlow:
    return GaussianMixtureFlow(MEANS, STDS, weights=WEIGHTS, convention=convention)


def gaussian(convention=None, rectified=False) -> GaussianFlow:
    return GaussianFlow(MEANS[1], STDS[1], rectified=rectified, convention=convention)


def labels(batch: int, label: int) -> dict:
    return {"label": torch.full((batch,), label, dtype=torch.long)}
