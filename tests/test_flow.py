"""flow.py: the interpolant, the conventions' helpers, time sampling, and Euler sampling driven
by a closed-form velocity reproducing the data distribution in every backend convention."""
import pytest
import torch

from analytic_cases import CONVENTIONS, MEANS, STDS, WEIGHTS, gaussian, mixture
from threestudio_rfds import flow


def test_interpolant_and_inversions():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = flow.interpolate(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], eps[3])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(v, flow.alpha_dot(t)[:, None, None, None] * x0 + flow.beta_dot(t)[:, None, None, None] * eps)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, v, t), eps)
    # dx_t/dt = v: a forward finite difference along t
    h = 1e-3
    x_s = flow.interpolate(x0, eps, t + h * (t < 1))
    fd = (x_s - x_t)[:3] / h
    torch.testing.assert_close(fd, v[:3], rtol=2e-3, atol=2e-3)


def test_shift_time_is_sd3_resolution_shift():
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(flow.shift_time(u, 1.0), u)
    s = flow.shift_time(u, 3.0)
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > u[1:-1]).all()  # shift > 1 moves toward noise
    with pytest.raises(ValueError, match="shift"):
        flow.shift_time(u, 0.0)


def test_time_grid_endpoints_and_shift():
    g = flow.time_grid(4)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    g3 = flow.time_grid(4, shift=3.0)
    torch.testing.assert_close(g3, flow.shift_time(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), 3.0))
    assert g3.dtype == torch.float32
    with pytest.raises(ValueError, match="num_steps"):
        flow.time_grid(0)


def test_convention_helpers():
    sd3 = flow.sd3_convention()
    t = torch.tensor([0.1, 0.6])
    out = torch.randn(2, 4)
    assert sd3.shift == 3.0 and sd3.velocity_sign == 1.0
    torch.testing.assert_close(sd3.model_timestep(t), 1000 * t)
    torch.testing.assert_close(sd3.to_velocity(out), out)
    insta = flow.instaflow_convention()
    torch.testing.assert_close(insta.model_timestep(t), 1000 * t)
    torch.testing.assert_close(insta.to_velocity(out), -out)
    insta_ref = flow.instaflow_convention("reference")
    torch.testing.assert_close(insta_ref.model_timestep(t), 1000 * (1 - t))
    torch.testing.assert_close(insta_ref.to_velocity(insta_ref.to_velocity(out)), out)


@pytest.mark.parametrize(
    "conv, lo, hi",
    [
        (flow.sd3_convention(shift=1.0), 0.2, 0.4),  # t = u
        (flow.sd3_convention(shift=3.0), 3 * 0.2 / 1.4, 3 * 0.4 / 1.8),  # t = shift(u)
        (flow.sd3_convention(shift=3.0, time_convention="reference"), 3 * 0.6 / 2.2, 3 * 0.8 / 2.6),  # shift(1 − u)
        (flow.instaflow_convention(), 0.2, 0.4),
        (flow.instaflow_convention("reference"), 0.6, 0.8),  # t = 1 − u, fed 1000·u
    ],
)
def test_convention_sample_time_step_percent_semantics(conv, lo, hi):
    g = torch.Generator().manual_seed(0)
    t = conv.sample_time(4000, 0.2, 0.4, generator=g)
    assert t.shape == (4000,)
    assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6
    assert t.min() < lo + 0.01 and t.max() > hi - 0.01  # the whole interval is reached
    if conv.reversed_timestep:  # the model is fed the percent itself
        ts = conv.model_timestep(t) / 1000
        assert ts.min() >= 0.2 - 1e-6 and ts.max() <= 0.4 + 1e-6


def test_sample_time_uniform_and_checks():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_time(20000, 0.1, 0.9, generator=g)
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 0.8**2 / 12) < 0.003
    with pytest.raises(ValueError, match="min_t"):
        flow.sample_time(2, -0.1, 0.5)
    with pytest.raises(ValueError, match="max_t"):
        flow.sample_time(2, 0.1, 1.5)
    with pytest.raises(ValueError, match="min_t"):
        flow.sample_time(2, 0.6, 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        flow.sample_time(0, 0.1, 0.5)
    with pytest.raises(ValueError, match="time_convention"):
        flow.sd3_convention(time_convention="paper")
    with pytest.raises(ValueError, match="time_convention"):
        flow.instaflow_convention("ref")


def test_euler_sample_checks():
    with pytest.raises(ValueError, match="timesteps"):
        flow.euler_sample(lambda x, t: x, torch.zeros(2, 2), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="timesteps"):
        flow.euler_sample(lambda x, t: x, torch.zeros(2, 2), torch.tensor([1.5, 0.0]))


def _sample(model, n=4000, steps=50, label=-1, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 2, generator=g)
    cond = {"label": torch.full((n,), label)}
    return flow.euler_sample(lambda x, t: model.velocity(x, t, cond), eps, flow.time_grid(steps, model.convention.shift))


# Tolerances: 4000 samples give a standard error ≈ 0.016 on a component mean (spread ≤ 0.6,
# ≥ 1000 samples) and ≈ 0.007 on a weight; 50 Euler steps add a bias of ≤ 0.05 (measured).
MEAN_TOL, STD_REL_TOL, WEIGHT_TOL = 0.08, 0.10, 0.03


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_euler_sampler_reproduces_the_mixture(name):
    m = mixture(CONVENTIONS[name]())
    x = _sample(m)
    k = m.nearest_component(x)
    frac = torch.bincount(k, minlength=3).float() / len(k)
    w = torch.tensor(WEIGHTS) / sum(WEIGHTS)
    assert (frac - w).abs().max() < WEIGHT_TOL, frac
    for j in range(3):
        xs = x[k == j]
        assert (xs.mean(0) - torch.tensor(MEANS[j])).abs().max() < MEAN_TOL, (j, xs.mean(0))
        assert ((xs.std(0) / torch.tensor(STDS[j])) - 1).abs().max() < STD_REL_TOL, (j, xs.std(0))


@pytest.mark.parametrize("name", list(CONVENTIONS))
@pytest.mark.parametrize("rectified", [False, True])
def test_euler_sampler_reproduces_the_gaussian(name, rectified):
    m = gaussian(CONVENTIONS[name](), rectified=rectified)
    x = _sample(m)
    assert (x.mean(0) - torch.tensor(MEANS[1])).abs().max() < MEAN_TOL
    assert ((x.std(0) / torch.tensor(STDS[1])) - 1).abs().max() < STD_REL_TOL


def test_euler_sampler_conditional_class():
    m = mixture(flow.sd3_convention(shift=3.0))
    x = _sample(m, n=1000, label=2)
    assert (m.nearest_component(x) == 2).float().mean() > 0.99
    assert (x.mean(0) - torch.tensor(MEANS[2])).abs().max() < MEAN_TOL


def test_rectified_coupling_is_exact_in_one_euler_step():
    """A straight flow needs one step: x0 = ε − v (what InstaFlow's one-step sampler relies on)."""
    m = gaussian(flow.instaflow_convention(), rectified=True)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(100, 2, generator=g)
    x = flow.euler_sample(lambda x, t: m.velocity(x, t, {}), eps, flow.time_grid(1))
    torch.testing.assert_close(x, m.means.float() + m.stds.float() * eps)


def test_instaflow_reference_time_convention_breaks_sampling():
    """Sampling with the reference's time labels (1000·(1 − t)) does not give the data: the
    mismatch (docs/math.md §2.3) is real; the "model" convention above is exact."""
    m = mixture(flow.instaflow_convention("reference"))
    x = _sample(m)
    k = m.nearest_component(x)
    errs = [(x[k == j].mean(0) - torch.tensor(MEANS[j])).abs().max().item() for j in range(3)]
    assert max(errs) > 0.3, errs
