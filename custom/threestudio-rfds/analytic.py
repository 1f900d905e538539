"""Closed-form optimal velocity models for testing and teaching (docs/math.md §1.2).

For data x0 ~ p and ε ~ N(0, I) independent, x_t = (1 − t)·x0 + t·ε, the flow-matching
optimum is v*(x, t) = E[ε − x0 | x_t = x].  For a Gaussian component N(μ, diag s²), with
a = 1 − t, b = t and V = a²s² + b² (per dimension):

    E[x0 | x_t] = μ + a·s²/V·(x_t − aμ),   E[ε | x_t] = b/V·(x_t − aμ),
    Cov(ε | x_t) = 1 − b²/V,               p(x_t) = N(aμ, V).

A mixture adds responsibilities r_k(x_t) ∝ π_k·N(x_t; aμ_k, V_k) and averages the
per-component posterior means.  The models answer like a real network: ``raw(x_t, timestep,
cond)`` reads ``timestep / convention.timestep_scale`` as its noise fraction and returns
``velocity_sign·v*`` for the given :class:`~threestudio_rfds.flow.FlowConvention`;
``velocity`` goes through the convention exactly as a backend does.  A convention that
mislabels the timestep (``instaflow_convention("reference")``, §2.3) therefore gets the
velocity of the wrong noise level, as the real InstaFlow UNet would.

Conditions: ``{"label": LongTensor [B]}``; label −1 (or no ``"label"``) is unconditional.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .flow import FlowConvention, sd3_convention
from .protocol import Cond


def _as_matrix(name: str, x, dim: Optional[int] = None) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x.reshape(1, -1) if x.ndim <= 1 else x
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{name} must have shape [K, D] (or [D]), got {tuple(x.shape)}")
    return x


def component_posteriors(x: Tensor, t: Tensor, mean: Tensor, std: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-component (E[x0|x_t], E[ε|x_t], log p(x_t)) for x [B, D], t [B], mean/std [K, D].

    Returns tensors of shape [B, K, D], [B, K, D] and [B, K]."""
    a = (1.0 - t)[:, None, None]
    b = t[:, None, None]
    var = std.pow(2)[None]
    v = a**2 * var + b**2
    r = x[:, None, :] - a * mean[None]
    x0_mean = mean[None] + a * var / v * r
    eps_mean = b / v * r
    log_p = -0.5 * (r**2 / v + torch.log(2 * math.pi * v)).sum(-1)
    return x0_mean, eps_mean, log_p


class AnalyticFlow:
    """Base: a model that knows E[x0 | x_t] and E[ε | x_t] in closed form."""

    dim: int

    def __init__(self, convention: Optional[FlowConvention] = None):
        self.convention = convention if convention is not None else sd3_convention(shift=1.0)

    def posterior_means(self, x_t: Tensor, t: Tensor, cond: Optional[Cond] = None) -> Tuple[Tensor, Tensor]:
        """(E[x0 | x_t], E[ε | x_t]) at true noise level t [B], shaped like x_t."""
        shape, dtype = x_t.shape, x_t.dtype
        x = x_t.reshape(shape[0], -1).double()
        if x.shape[1] != self.dim:
            raise ValueError(f"x_t must have {self.dim} features per sample, got shape {tuple(shape)}")
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(shape[0])
        m0, me = self._posterior(x, t, cond or {})
        return m0.reshape(shape).to(dtype), me.reshape(shape).to(dtype)

    def _posterior(self, x: Tensor, t: Tensor, cond: Cond) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def raw(self, x_t: Tensor, timestep: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """The network-facing call: reads noise fraction = timestep / timestep_scale and
        returns velocity_sign·v*, like SD3 (ε − x0) or InstaFlow (x0 − ε)."""
        m0, me = self.posterior_means(x_t, timestep / self.convention.timestep_scale, cond)
        return self.convention.velocity_sign * (me - m0)

    def velocity(self, x_t: Tensor, t: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """v(x_t, t) in the project's notation, through the convention (as a backend does)."""
        return self.convention.to_velocity(self.raw(x_t, self.convention.model_timestep(t), cond))


class GaussianMixtureFlow(AnalyticFlow):
    """Data ~ Σ_k π_k N(μ_k, diag s_k²); component k has class ``labels[k]`` (default k).

    ``means`` [K, D]; ``stds`` a number, [K] (isotropic per component) or [K, D].
    Conditioning on class c restricts the mixture to the components labelled c."""

    def __init__(self, means, stds, weights=None, labels=None, convention: Optional[FlowConvention] = None):
        super().__init__(convention)
        self.means = _as_matrix("means", means)
        k, self.dim = self.means.shape
        s = torch.as_tensor(stds, dtype=torch.float64)
        if s.ndim == 1 and k > 1 and s.shape[0] == k:
            s = s[:, None]  # one std per component
        try:
            self.stds = torch.broadcast_to(s, (k, self.dim)).clone()
        except RuntimeError:
            raise ValueError(f"stds must be a number, [K] or [K, D] = [{k}, {self.dim}], got {tuple(s.shape)}") from None
        if not (self.stds > 0).all():
            raise ValueError("stds must be > 0")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or not (w > 0).all():
            raise ValueError(f"weights must be {k} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        self.labels = torch.arange(k) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels.shape != (k,) or (self.labels < 0).any():
            raise ValueError(f"labels must be {k} non-negative class ids, got {self.labels.tolist()}")
        self.num_classes = int(self.labels.max()) + 1

    def _log_prior(self, cond: Cond, batch: int, device) -> Tensor:
        """log π_k restricted to the components of each sample's label: [B, K]."""
        log_w = self.weights.log().to(device).expand(batch, -1)
        label = cond.get("label")
        if label is None:
            return log_w
        label = label.reshape(-1).to(device).expand(batch)
        if ((label < -1) | (label >= self.num_classes)).any():
            raise ValueError(f"label must be -1 (unconditional) or in [0, {self.num_classes - 1}], got {label.tolist()}")
        keep = (label[:, None] == -1) | (label[:, None] == self.labels.to(device)[None])
        return log_w.masked_fill(~keep, -math.inf)

    def _posterior(self, x: Tensor, t: Tensor, cond: Cond) -> Tuple[Tensor, Tensor]:
        m0, me, log_p = component_posteriors(x, t, self.means.to(x.device), self.stds.to(x.device))
        r = torch.softmax(self._log_prior(cond, x.shape[0], x.device) + log_p, dim=1)[..., None]
        return (r * m0).sum(1), (r * me).sum(1)

    def log_prob(self, x_t: Tensor, t: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """log p_t(x_t) [B] of the (conditional) marginal at noise level t; differentiable in x_t."""
        x = x_t.reshape(x_t.shape[0], -1).double()
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        _, _, log_p = component_posteriors(x, t, self.means, self.stds)
        return torch.logsumexp(self._log_prior(cond or {}, x.shape[0], x.device) + log_p, dim=1)

    def sample(self, n: int, label: int = -1, generator: Optional[torch.Generator] = None) -> Tensor:
        """n draws of x0 [n, D] (float32) from the data distribution of ``label``."""
        logits = self._log_prior({"label": torch.tensor([label])}, 1, "cpu")[0]
        k = torch.multinomial(logits.softmax(0), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).float()

    def nearest_component(self, x0: Tensor) -> Tensor:
        """Index of the closest component mean for each row of x0 [n, D]."""
        return torch.cdist(x0.double().reshape(x0.shape[0], -1), self.means).argmin(1)


class GaussianFlow(GaussianMixtureFlow):
    """Data ~ N(μ, diag s²) (ignores conditions).

    ``rectified=True`` uses the straight (ideally rectified) coupling x0 = μ + s·ε instead of
    independent (x0, ε): then x_t = aμ + (a·s + b)·ε determines ε, E[ε | x_t] = ε and every
    flow trajectory is a straight line (docs/math.md §4.3)."""

    def __init__(self, mean, std, rectified: bool = False, convention: Optional[FlowConvention] = None):
        super().__init__(_as_matrix("mean", mean), _as_matrix("std", std), convention=convention)
        self.rectified = rectified

    def _log_prior(self, cond: Cond, batch: int, device) -> Tensor:
        return self.weights.log().to(device).expand(batch, -1)  # conditions are ignored

    def _posterior(self, x: Tensor, t: Tensor, cond: Cond) -> Tuple[Tensor, Tensor]:
        if not self.rectified:
            m0, me, _ = component_posteriors(x, t, self.means.to(x.device), self.stds.to(x.device))
            return m0[:, 0], me[:, 0]
        a, mu, s = (1.0 - t)[:, None], self.means.to(x.device), self.stds.to(x.device)
        eps = (x - a * mu) / (a * s + t[:, None])
        return mu + s * eps, eps

    def log_prob(self, x_t: Tensor, t: Tensor, cond: Optional[Cond] = None) -> Tensor:
        """log p_t(x_t) [B]: N(aμ, a²s² + b²), or N(aμ, (a·s + b)²) for the rectified coupling."""
        if not self.rectified:
            return super().log_prob(x_t, t, cond)
        x = x_t.reshape(x_t.shape[0], -1).double()
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        a = 1.0 - t
        return torch.distributions.Normal(a * self.means, a * self.stds + t).log_prob(x).sum(1)

    def eps_posterior_var(self, t: Tensor) -> Tensor:
        """Cov(ε | x_t) per dimension [len(t), D]: 1 − b²/V (independent of x_t), 0 if rectified."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        if self.rectified:
            return torch.zeros(t.shape[0], self.dim, dtype=torch.float64)
        return 1.0 - t**2 / ((1.0 - t) ** 2 * self.stds**2 + t**2)


__all__: Sequence[str] = ["AnalyticFlow", "GaussianMixtureFlow", "GaussianFlow", "component_posteriors"]
