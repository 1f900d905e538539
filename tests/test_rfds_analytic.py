"""RFDS, RFDS-Rev and iRFDS driven by closed-form optimal velocities (docs/math.md §3–§5):
where they converge, how noisy their gradients are, and the noise-refinement identities."""
import pytest
import torch
import torch.nn.functional as F

from analytic_cases import CONVENTIONS, MEANS, STDS, WEIGHTS, gaussian, labels, mixture
from threestudio_rfds import flow, rfds as R
from threestudio_rfds.analytic import GaussianMixtureFlow

ALGOS = {"rfds": R.rfds, "rfds-rev": R.rfds_rev}


def _optimise(algo, model, label, scale=1.0, batch=8, steps=400, seed=0, **kw):
    """Adam on free particles x0 [B, 2] from N(0, 2²); the learning rate drops at 3/4."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.nn.Parameter(2 * torch.randn(batch, 2, generator=g))
    opt = torch.optim.Adam([x0], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3 * steps // 4], 0.2)
    cond, uncond = labels(batch, label), labels(batch, -1)
    for _ in range(steps):
        out = ALGOS[algo](model, x0, cond, uncond, scale, generator=g, **kw)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return x0.detach()


@pytest.mark.parametrize("conv", ["sd3-shift3", "instaflow"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_converges_to_the_conditional_mode(algo, conv):
    """Without CFG both algorithms drive every particle to the mode μ_1 of class 1 (measured:
    mean distance ≤ 0.055, max ≤ 0.12)."""
    x0 = _optimise(algo, mixture(CONVENTIONS[conv]()), label=1)
    d = (x0 - torch.tensor(MEANS[1])).norm(dim=1)
    assert d.mean() < 0.1 and d.max() < 0.2, d


@pytest.mark.parametrize("algo", list(ALGOS))
def test_reference_time_conventions(algo):
    """SD3 "reference" (step percents index the descending σ table) is still exact; InstaFlow
    "reference" (timestep 1000·(1 − t) for noise level t, §2.3) is biased: the particles stop
    short of μ_1 = (2, 1) (measured ≈ (1.60, 0.84) for RFDS, (1.72, 0.92) for RFDS-Rev)."""
    mu = torch.tensor(MEANS[1])
    x_sd3 = _optimise(algo, mixture(flow.sd3_convention(3.0, "reference")), label=1)
    assert (x_sd3 - mu).norm(dim=1).mean() < 0.1
    x_insta = _optimise(algo, mixture(flow.instaflow_convention("reference")), label=1)
    assert (x_insta - mu).norm(dim=1).mean() > 0.2


@pytest.mark.parametrize("algo", list(ALGOS))
def test_cfg_pushes_past_the_mode_away_from_the_other_classes(algo):
    """w = 3 (diffusers CFG) moves the fixed point from μ_1 along μ_1 − E[x0] (measured ≈ 1.6 away)."""
    x0 = _optimise(algo, mixture(flow.sd3_convention(3.0)), label=1, scale=3.0)
    mu = torch.tensor(MEANS[1])
    marginal_mean = (torch.tensor(WEIGHTS)[:, None] * torch.tensor(MEANS)).sum(0) / sum(WEIGHTS)
    direction = (mu - marginal_mean) / (mu - marginal_mean).norm()
    assert ((x0 - mu) @ direction).min() > 0.5


def _bimodal(conv):
    """Class 0 = two components (μ_0 and μ_2, 3.2 apart); class 1 = μ_1."""
    return GaussianMixtureFlow(MEANS, STDS, weights=WEIGHTS, labels=[0, 1, 0], convention=CONVENTIONS[conv]())


def _near_mode_fraction(x0):
    modes = torch.tensor([MEANS[0], MEANS[2]])
    return (torch.cdist(x0, modes).min(1).values < 0.3).float().mean().item()


@pytest.mark.parametrize("conv", ["sd3-shift3", "instaflow"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_bimodal_class_full_noise_range_averages_the_modes(algo, conv):
    """With t over the full range [0.02, 0.98] the high-noise terms (where the class looks
    unimodal) dominate: no particle reaches a mode, they gather between them (docs/math.md §3.3;
    measured 0/16 at a mode for both algorithms, both conventions)."""
    x0 = _optimise(algo, _bimodal(conv), label=0, batch=16)
    assert _near_mode_fraction(x0) <= 0.125
    assert (x0 - torch.tensor([-1.0, -1.25])).norm(dim=1).mean() < 1.0  # the class mean


def test_bimodal_class_low_noise_range_finds_the_modes():
    """max_step_percent = 0.5 (InstaFlow, t ≤ 0.5): RFDS sends every particle to a mode (measured
    16/16); RFDS-Rev less often (measured 9/16 and 13/16 for two seeds)."""
    m = _bimodal("instaflow")
    for seed in (0, 1):
        f_rfds = _near_mode_fraction(_optimise("rfds", m, label=0, batch=16, seed=seed, max_step_percent=0.5))
        f_rev = _near_mode_fraction(_optimise("rfds-rev", m, label=0, batch=16, seed=seed, max_step_percent=0.5))
        assert f_rfds >= 0.9 and f_rev <= f_rfds, (f_rfds, f_rev)


# ------------------------------------------------------------------ gradient variance (§5.1)
def _grad_stats(algo, model, x0, scale, n=20000, seed=0):
    """Total variance tr Cov[g] and ‖E g‖² of the RFDS gradient over n draws of (t, ε) at x0."""
    x = torch.tensor(x0).expand(n, 2).contiguous()
    g = ALGOS[algo](model, x, labels(n, 1), labels(n, -1), scale, generator=torch.Generator().manual_seed(seed)).grad
    return g.var(0).sum().item(), g.mean(0).pow(2).sum().item()


# (convention, x0, w, measured var(RFDS-Rev)/var(RFDS)) — docs/math.md §5.1 has the full table
VARIANCE_CASES = [
    ("sd3-shift3", [2.0, 1.0], 1.0, 0.20),
    ("sd3-shift3", [0.5, 0.5], 1.0, 0.73),
    ("sd3-shift3", [2.0, 1.0], 7.5, 0.95),
    ("instaflow", [2.0, 1.0], 1.0, 0.13),
    ("instaflow", [0.5, 0.5], 1.0, 0.64),
    ("instaflow", [2.0, 1.0], 7.5, 0.92),
]


@pytest.mark.parametrize("conv, x0, scale, measured", VARIANCE_CASES)
def test_rfds_rev_has_lower_gradient_variance(conv, x0, scale, measured):
    m = mixture(CONVENTIONS[conv]())
    v_rfds, _ = _grad_stats("rfds", m, x0, scale)
    v_rev, _ = _grad_stats("rfds-rev", m, x0, scale)
    ratio = v_rev / v_rfds
    assert ratio < 1.0 and abs(ratio - measured) < 0.04, ratio


@pytest.mark.parametrize("conv", ["sd3-shift3", "instaflow"])
def test_rfds_rev_gradient_variance_is_higher_off_mode_with_cfg(conv):
    """Off the mode with CFG (w = 7.5) RFDS-Rev's variance is *higher* (measured ×1.70 SD3,
    ×1.90 InstaFlow), because its mean gradient is larger; the variance relative to ‖E g‖² is lower."""
    m = mixture(CONVENTIONS[conv]())
    v_rfds, m_rfds = _grad_stats("rfds", m, [0.5, 0.5], 7.5)
    v_rev, m_rev = _grad_stats("rfds-rev", m, [0.5, 0.5], 7.5)
    assert v_rev / v_rfds > 1.4
    assert m_rev > m_rfds
    assert v_rev / m_rev < v_rfds / m_rfds


# ------------------------------------------------------------------ iRFDS (§4)
def _invert(model, x0, cond, reg_weight, steps=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.nn.Parameter(torch.randn(x0.shape, generator=g))
    opt = torch.optim.Adam([eps], lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2 * steps // 3], 0.2)
    for _ in range(steps):
        out = R.irfds_loss(model, x0, eps, cond, reg_weight=reg_weight, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return eps.detach()


def _regenerate(model, eps, cond, steps=100):
    grid = flow.time_grid(steps, model.convention.shift)
    return flow.euler_sample(lambda x, t: model.velocity(x, t, cond), eps, grid)


@pytest.mark.parametrize("conv", ["sd3-shift3", "instaflow"])
def test_irfds_inverts_a_straight_flow_exactly(conv):
    """Rectified coupling: the optimised ε regenerates x0 (measured max error 0.015)."""
    m = gaussian(CONVENTIONS[conv](), rectified=True)
    x0 = m.sample(64, generator=torch.Generator().manual_seed(1))
    eps = _invert(m, x0, {}, reg_weight=0.0)
    err = (_regenerate(m, eps, {}) - x0).norm(dim=1)
    assert err.max() < 0.05, err.max()


@pytest.mark.parametrize("conv", ["sd3-shift3", "instaflow"])
def test_irfds_inverts_the_mixture_with_the_regulariser(conv):
    """Curved (1-rectified) flow: iRFDS + R(ε) regenerates x0 to mean error 0.044 / max 0.12
    (measured, SD3) and 0.046 / 0.14 (InstaFlow); without R(ε) it is biased (next test)."""
    m = mixture(CONVENTIONS[conv]())
    x0 = m.sample(64, label=1, generator=torch.Generator().manual_seed(1))
    cond = labels(64, 1)
    eps = _invert(m, x0, cond, reg_weight=1.0)
    err = (_regenerate(m, eps, cond) - x0).norm(dim=1)
    assert err.mean() < 0.1 and err.max() < 0.3, (err.mean(), err.max())


def test_irfds_without_regulariser_is_biased_on_a_curved_flow():
    """Independent coupling, R = 0: the per-t fixed points ε = b(x0 − μ)/(a s²) disagree, the
    minimiser over t is not the ODE inverse (measured mean regeneration error 0.76 with shift 3)."""
    m = gaussian(flow.sd3_convention(3.0))
    x0 = m.sample(64, generator=torch.Generator().manual_seed(1))
    eps = _invert(m, x0, {}, reg_weight=0.0)
    err = (_regenerate(m, eps, {}) - x0).norm(dim=1)
    assert err.mean() > 0.3


def test_iterated_irfds_update_converges_to_the_exact_noise():
    """ε ← irfds_update(ε) with "auto" step is ε ← E[ε|x_t]; for the straight flow it contracts to ε*."""
    m = gaussian(flow.instaflow_convention(), rectified=True)
    g = torch.Generator().manual_seed(0)
    eps_true = torch.randn(32, 2, generator=g)
    x0 = (m.means + m.stds * eps_true).float()
    eps = torch.randn(32, 2, generator=g)
    for _ in range(60):
        t = m.convention.sample_time(32, 0.02, 0.98, generator=g)
        eps = R.irfds_update(m, x0, eps, t, {})
    torch.testing.assert_close(eps, eps_true, atol=1e-3, rtol=0)


# ------------------------------------------------------------------ refined-noise statistics (§4.3)
@pytest.mark.parametrize("t_val", [0.2, 0.5, 0.8])
def test_refined_noise_statistics(t_val):
    """x0 ~ data, ε ~ N(0, I): one inner step ε' = E[ε|x_t] has mean 0 and covariance
    I − E[Cov(ε|x_t)] = diag(b²/V) ≺ I (closed form); for the straight coupling ε' = ε."""
    g = torch.Generator().manual_seed(0)
    n = 40000
    for rectified in (False, True):
        m = gaussian(flow.sd3_convention(3.0), rectified=rectified)
        eps = torch.randn(n, 2, generator=g)
        # the straight coupling pairs x0 = μ + s·ε; the independent one draws x0 separately
        x0 = (m.means + m.stds * eps).float() if rectified else m.sample(n, generator=g)
        t = torch.full((n,), t_val)
        eps_ref = R.irfds_update(m, x0, eps, t, {})
        expected_var = 1.0 - m.eps_posterior_var(torch.tensor([t_val]))[0].float()
        assert eps_ref.mean(0).abs().max() < 0.02
        torch.testing.assert_close(eps_ref.var(0), expected_var, atol=0.03, rtol=0)
        off_diag = torch.cov(eps_ref.T)[0, 1]
        assert off_diag.abs() < 0.02
        if rectified:
            torch.testing.assert_close(eps_ref, eps, atol=1e-5, rtol=0)
        else:
            assert (expected_var < 0.999).all()  # strictly inside I: not N(0, I)


# ------------------------------------------------------------------ identities (§4.1)
class LinearVelocity:
    """An arbitrary (wrong) velocity model: v = x·W + t·c, to test identities that hold for any v."""

    convention = flow.sd3_convention(3.0)

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w, self.c = torch.randn(2, 2, generator=g), torch.randn(2, generator=g)

    def velocity(self, x_t, t, cond):
        return x_t @ self.w + t[:, None] * self.c


def test_reference_sd3_update_identity():
    """ε' = ε + (1 − σ)(v + x0 − ε) = x_t + (1 − σ)·v for any v; with v* it is E[ε | x_t]."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    sigma = torch.rand(16, generator=g)
    s = sigma[:, None]
    for model in (LinearVelocity(), mixture(flow.sd3_convention(3.0))):
        x_t = flow.interpolate(x0, eps, sigma)
        v = model.velocity(x_t, sigma, {})
        reference = eps + (1 - s) * (v + x0 - eps)
        torch.testing.assert_close(reference, x_t + (1 - s) * v)
        torch.testing.assert_close(R.irfds_update(model, x0, eps, sigma, {}), reference)
        torch.testing.assert_close(flow.eps_from_velocity(x_t, v, sigma), reference)
    _, eps_post = model.posterior_means(x_t, sigma)
    torch.testing.assert_close(reference, eps_post, atol=1e-5, rtol=1e-5)


def test_reference_instaflow_update_identity():
    """The InstaFlow reference's ε' = ε + (x0 − ε − v_net) with v_net = −v is step size 1: x0 + v."""
    m = mixture(flow.instaflow_convention())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.rand(16, generator=g)
    v_net = m.raw(flow.interpolate(x0, eps, t), m.convention.model_timestep(t), {})
    torch.testing.assert_close(R.irfds_update(m, x0, eps, t, {}, step_size=1.0), eps + (x0 - eps - v_net))


def test_rfds_loss_matches_the_reference_mse_up_to_batch_scale():
    """w = 1: the loss value is mse(v̂, ε − x0) (the reference's, before its /B) and ∂L/∂x0 = 2g/numel."""
    m = mixture(flow.sd3_convention(3.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, generator=g).requires_grad_()
    out = R.rfds(m, x0, labels(4, 1), labels(4, -1), 2.0, generator=g)
    torch.testing.assert_close(out.loss, F.mse_loss(out.v_pred, out.eps - x0.detach()))
    out.loss.backward()
    torch.testing.assert_close(x0.grad, 2 * out.grad / x0.numel())
    v_cfg = m.velocity(out.x_t, out.t, labels(4, -1)) + 2.0 * (
        m.velocity(out.x_t, out.t, labels(4, 1)) - m.velocity(out.x_t, out.t, labels(4, -1)))
    torch.testing.assert_close(out.grad, v_cfg - (out.eps - x0.detach()))
