"""The closed-form velocity models are right: Tweedie's formula, the interpolant identity, the
flow-matching optimum, and the backend conventions they present themselves in."""
import pytest
import torch

from analytic_cases import CONVENTIONS, MEANS, gaussian, labels, mixture
from threestudio_rfds import flow
from threestudio_rfds.analytic import GaussianFlow, GaussianMixtureFlow
from threestudio_rfds.protocol import VelocityModel


@pytest.mark.parametrize("make", [mixture, gaussian])
@pytest.mark.parametrize("label", [-1, 0, 1])
def test_tweedie_and_interpolant_identity(make, label):
    """E[ε|x_t] = −t·∇log p_t(x_t) (autograd of the closed-form density) and x_t = a·E[x0|x_t] + b·E[ε|x_t]."""
    m = make()
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(16, 2, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.98 + 0.01
    cond = labels(16, label)
    (score,) = torch.autograd.grad(m.log_prob(x, t, cond).sum(), x)
    x0_mean, eps_mean = m.posterior_means(x.detach(), t, cond)
    torch.testing.assert_close(eps_mean, -t[:, None] * score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.interpolate(x0_mean, eps_mean, t), x.detach(), rtol=1e-9, atol=1e-9)


def test_velocity_is_the_flow_matching_optimum():
    """v* minimises E‖v(x_t) − (ε − x0)‖²: perturbing it in any fixed direction costs more."""
    m = mixture()
    g = torch.Generator().manual_seed(1)
    x0 = m.sample(20000, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.rand(20000, generator=g)
    x_t = flow.interpolate(x0, eps, t)
    v = m.velocity(x_t, t, {})
    target = flow.velocity_target(x0, eps)
    base = (v - target).pow(2).sum(1).mean()
    # the residual is uncorrelated with any function of x_t (here: x_t itself and a constant)
    resid = v - target
    assert resid.mean(0).abs().max() < 0.03
    assert (resid * x_t).mean(0).abs().max() < 0.05
    for delta in ([0.1, 0.0], [0.0, -0.1]):
        assert (v + torch.tensor(delta) - target).pow(2).sum(1).mean() > base + 0.005


def test_conditioning_selects_components_and_unconditional_is_the_marginal():
    m = mixture()
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([0.5, 0.5])
    x0_c, _ = m.posterior_means(x, t, labels(2, 1))
    x0_u, _ = m.posterior_means(x, t, labels(2, -1))
    x0_none, _ = m.posterior_means(x, t, {})
    torch.testing.assert_close(x0_u, x0_none)
    # conditional on class 1 at t → 0 the posterior mean is x itself; at t → 1 it is μ_1
    x0_end, _ = m.posterior_means(x, torch.tensor([1.0, 1.0]), labels(2, 1))
    torch.testing.assert_close(x0_end, torch.tensor([MEANS[1]] * 2))
    assert not torch.allclose(x0_c, x0_u)
    # a class made of two components: conditioning gives their mixture
    m2 = GaussianMixtureFlow(MEANS, 0.3, labels=[0, 1, 0])
    assert m2.num_classes == 2
    s = m2.sample(4000, label=0, generator=torch.Generator().manual_seed(0))
    k = torch.bincount(m2.nearest_component(s), minlength=3)
    assert k[1] == 0 and abs(k[0].item() - k[2].item()) < 300


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_raw_output_follows_the_backend_convention(name):
    """raw() is fed the model timestep and returns velocity_sign·v; velocity() undoes both."""
    conv = CONVENTIONS[name]()
    m = mixture(conv)
    ref = mixture(flow.sd3_convention(shift=1.0))
    assert isinstance(m, VelocityModel)
    x = torch.randn(8, 2)
    t = torch.rand(8)
    v = ref.raw(x, 1000 * t, {})  # SD3: timestep 1000·σ, output ε − x0
    torch.testing.assert_close(m.raw(x, conv.model_timestep(t), {}), conv.velocity_sign * v)
    torch.testing.assert_close(m.velocity(x, t, {}), v)
    if conv.name == "instaflow":  # InstaFlow predicts x0 − ε
        torch.testing.assert_close(m.raw(x, 1000 * t, {}), -v)


def test_instaflow_reference_time_convention_reads_the_wrong_noise_level():
    """The reference labels noise level t with timestep 1000·(1 − t); the model reads 1 − t."""
    m_ref = mixture(flow.instaflow_convention("reference"))
    m = mixture(flow.instaflow_convention("model"))
    x, t = torch.randn(8, 2), torch.full((8,), 0.3)
    torch.testing.assert_close(m_ref.velocity(x, t, {}), m.velocity(x, 1 - t, {}))
    assert not torch.allclose(m_ref.velocity(x, t, {}), m.velocity(x, t, {}))


def test_rectified_gaussian_coupling_is_straight():
    """Rectified coupling: E[ε|x_t] is the ε that produced x_t, the velocity is constant in t."""
    m = gaussian(rectified=True)
    eps = torch.randn(64, 2, dtype=torch.float64)
    x0 = m.means + m.stds * eps
    vs = []
    for tv in (0.1, 0.5, 0.9):
        t = torch.full((64,), tv, dtype=torch.float64)
        x_t = flow.interpolate(x0, eps, t)
        x0_mean, eps_mean = m.posterior_means(x_t, t)
        torch.testing.assert_close(eps_mean, eps)
        torch.testing.assert_close(x0_mean, x0)
        vs.append(m.velocity(x_t, t))
    torch.testing.assert_close(vs[0], vs[2])
    assert m.eps_posterior_var(torch.tensor([0.5])).abs().max() == 0


def test_gaussian_ignores_conditions_and_accepts_any_trailing_shape():
    m = GaussianFlow(torch.zeros(12), 0.5)
    x = torch.randn(3, 3, 2, 2)
    v = m.velocity(x, torch.rand(3), {"label": torch.tensor([5, 6, 7])})
    assert v.shape == x.shape and v.dtype == x.dtype


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(means=[[0.0, 0.0]], stds=[[0.0, 1.0]]), "stds"),
        (dict(means=[[0.0, 0.0]], stds=[[1.0, 1.0, 1.0]]), "stds"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=1.0, weights=[1.0, -1.0]), "weights"),
        (dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=1.0, labels=[0, -2]), "labels"),
    ],
)
def test_bad_model_parameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GaussianMixtureFlow(**kwargs)


def test_bad_label_and_feature_count():
    m = mixture()
    with pytest.raises(ValueError, match="label"):
        m.velocity(torch.zeros(2, 2), torch.rand(2), labels(2, 3))
    with pytest.raises(ValueError, match="x_t"):
        m.velocity(torch.zeros(2, 3), torch.rand(2), {})
