"""rfds.py's contract: batches, logs, non-finite model output, grad_clip, weightings, CFG,
reproducibility — on the closed-form models (real VelocityModels)."""
import pytest
import torch

from analytic_cases import labels, mixture
from threestudio_rfds import flow, rfds as R
from threestudio_rfds.analytic import GaussianFlow
from threestudio_rfds.protocol import cfg_velocity

B = 3


class CountingModel:
    """Wraps a model: counts calls and batch sizes, optionally corrupts entries with NaN/inf."""

    def __init__(self, model, corrupt=False):
        self.model, self.corrupt, self.calls = model, corrupt, []
        self.convention = model.convention

    def velocity(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        v = self.model.velocity(x_t, t, cond)
        if self.corrupt:
            v = v.clone()
            v[0, 0] = float("nan")
            v[1, 1] = float("inf")
        return v


def _image_model():
    """A Gaussian on 4×4×4 'latents' so x0 can be image-shaped [B, 4, 4, 4]."""
    return GaussianFlow(torch.linspace(-1, 1, 64), 0.5, convention=flow.sd3_convention(3.0))


def _run(name, model, x0, **kw):
    b = x0.shape[0]
    cond, uncond = labels(b, 1), labels(b, -1)
    g = torch.Generator().manual_seed(kw.pop("seed", 0))
    if name == "rfds":
        return R.rfds(model, x0, cond, uncond, kw.pop("scale", 3.0), generator=g, **kw)
    if name == "rfds-rev":
        return R.rfds_rev(model, x0, cond, uncond, kw.pop("scale", 3.0), generator=g, **kw)
    return R.irfds_loss(model, torch.zeros_like(x0), x0, cond, uncond=uncond, guidance_scale=kw.pop("scale", 3.0),
                        generator=g, **kw)


ALL = ["rfds", "rfds-rev", "irfds"]


@pytest.mark.parametrize("name", ALL)
def test_batch_shapes_and_scalar_logs(name):
    x0 = torch.randn(B, 4, 4, 4, requires_grad=True)
    out = _run(name, _image_model(), x0)
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.grad.shape == out.eps.shape == out.x_t.shape == out.v_pred.shape == x0.shape
    assert out.t.shape == out.weights.shape == (B,)
    assert len(set(out.t.tolist())) == B  # one noise level per sample
    logs = out.logs()
    assert {"loss", "grad_norm", "t_min", "t_max", "t_mean", "num_nonfinite"} <= set(logs)
    for k, v in logs.items():
        assert torch.is_tensor(v) and v.ndim == 0 and not v.requires_grad, k
    out.loss.backward()
    assert x0.grad.shape == x0.shape and torch.isfinite(x0.grad).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batched", [True, False])
def test_nonfinite_model_output_is_replaced_and_counted(name, batched):
    """nonfinite="zero" (opt-in): NaN/inf in v̂ become 0 and are counted."""
    model = CountingModel(mixture(flow.sd3_convention(3.0)), corrupt=True)
    x0 = torch.randn(B, 2, requires_grad=True)
    kw = {} if name == "irfds" else {"cfg_batched": batched}
    out = _run(name, model, x0, nonfinite="zero", **kw)
    # v[0, 0] = NaN and v[1, 1] = inf survive CFG; RFDS-Rev also counts its inner iRFDS pass
    expected = 4 if name == "rfds-rev" else 2
    assert out.num_nonfinite.item() == expected
    assert torch.isfinite(out.v_pred).all() and torch.isfinite(out.grad).all() and torch.isfinite(out.loss)
    assert out.v_pred[0, 0] == 0 and out.v_pred[1, 1] == 0
    assert out.logs()["num_nonfinite"].item() == expected
    out.loss.backward()
    assert torch.isfinite(x0.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_model_output_is_an_error_by_default(name):
    model = CountingModel(mixture(flow.sd3_convention(3.0)), corrupt=True)
    with pytest.raises(ValueError, match=r"v̂ \(the model's .*\) contains \d+ non-finite values.*nonfinite='zero'"):
        _run(name, model, torch.randn(B, 2))


@pytest.mark.parametrize("name", ["rfds", "rfds-rev"])
def test_grad_clip_clips_elementwise(name):
    model = mixture(flow.sd3_convention(3.0))
    x0 = (4 * torch.randn(8, 2)).requires_grad_()
    free = _run(name, model, x0, scale=7.5)
    assert free.grad.abs().max() > 0.5
    out = _run(name, model, x0, scale=7.5, grad_clip=0.5)
    torch.testing.assert_close(out.grad, free.grad.clamp(-0.5, 0.5))
    out.loss.backward()
    torch.testing.assert_close(x0.grad, 2 * out.grad / x0.numel(), rtol=0, atol=0)  # exactly, whatever |x0|
    assert x0.grad.abs().max() <= 2 * 0.5 / x0.numel()


def test_weightings_behave_as_documented():
    model = mixture(flow.sd3_convention(3.0))
    n = 4000
    x0 = torch.randn(n, 2)
    outs = {w: _run("rfds", model, x0, weighting=w, scale=1.0) for w in R.WEIGHTINGS}
    base = outs["none"]
    assert (base.weights == 1).all()
    # same seed → same t, ε; the gradient is w(t)·(v̂ − v)
    for w, out in outs.items():
        torch.testing.assert_close(out.t, base.t)
        torch.testing.assert_close(out.grad, out.weights[:, None] * base.grad)
    a, b = flow.alpha(base.t), flow.beta(base.t)
    torch.testing.assert_close(outs["sds"].weights, a * b**2 / (a**2 + b**2))
    sig = outs["sigmoid"].weights
    assert (sig > 0).all() and (sig < 1).all() and sig.std() > 0.1
    assert abs(sig.mean().item() - 0.5) < 0.01  # E[sigmoid(u)] = 1/2 for u ~ N(0, 1)
    assert abs(torch.corrcoef(torch.stack([sig, base.t]))[0, 1].item()) < 0.05  # independent of t


def test_sds_weighting_is_sds_on_the_eps_prediction():
    """w_sds·(v̂ − v) = (1 − ᾱ)·(ε̂ − ε) at the VP noise level of equal SNR (ᾱ = a²/(a² + b²))."""
    t = torch.rand(64)
    a, b = flow.alpha(t), flow.beta(t)
    x0, eps, v_hat = torch.randn(64, 2), torch.randn(64, 2), torch.randn(64, 2)
    x_t = flow.interpolate(x0, eps, t)
    lhs = R.rfds_weighting("sds", t)[:, None] * (v_hat - flow.velocity_target(x0, eps))
    alphabar = a**2 / (a**2 + b**2)
    rhs = (1 - alphabar)[:, None] * (flow.eps_from_velocity(x_t, v_hat, t) - eps)
    torch.testing.assert_close(lhs, rhs)


@pytest.mark.parametrize("name", ["rfds", "rfds-rev"])
def test_cfg_batched_equals_sequential(name):
    batched = CountingModel(mixture(flow.sd3_convention(3.0)))
    seq = CountingModel(mixture(flow.sd3_convention(3.0)))
    x0 = torch.randn(B, 2)
    o1 = _run(name, batched, x0, cfg_batched=True, scale=7.5)
    o2 = _run(name, seq, x0, cfg_batched=False, scale=7.5)
    torch.testing.assert_close(o1.v_pred, o2.v_pred, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o1.loss, o2.loss)
    inner = [B] if name == "rfds-rev" else []
    assert batched.calls == inner + [2 * B] and seq.calls == inner + [B, B]


def test_cfg_definition_and_scale_one_skips_uncond():
    m = CountingModel(mixture(flow.sd3_convention(3.0)))
    x, t = torch.randn(B, 2), torch.rand(B)
    v_c, v_u = m.model.velocity(x, t, labels(B, 1)), m.model.velocity(x, t, labels(B, -1))
    torch.testing.assert_close(cfg_velocity(m, x, t, labels(B, 1), labels(B, -1), 4.0), v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(cfg_velocity(m, x, t, labels(1, 1), labels(1, -1), 0.0), v_u)  # batch-1 conds broadcast
    m.calls.clear()
    torch.testing.assert_close(cfg_velocity(m, x, t, labels(B, 1), labels(B, -1), 1.0), v_c)
    assert m.calls == [B]


def test_rfds_rev_with_no_inner_step_is_rfds_and_inner_steps_refine():
    m = mixture(flow.instaflow_convention())
    x0 = torch.randn(B, 2)
    t, eps = torch.rand(B), torch.randn(B, 2)
    c, u = labels(B, 1), labels(B, -1)
    plain = R.rfds(m, x0, c, u, 3.0, t=t, eps=eps)
    rev0 = R.rfds_rev(m, x0, c, u, 3.0, t=t, eps=eps, n_inner=0)
    torch.testing.assert_close(rev0.grad, plain.grad)
    rev1 = R.rfds_rev(m, x0, c, u, 3.0, t=t, eps=eps)
    torch.testing.assert_close(rev1.eps, R.irfds_update(m, x0, eps, t, c))
    rev2 = R.rfds_rev(m, x0, c, u, 3.0, t=t, eps=eps, n_inner=2)
    torch.testing.assert_close(rev2.eps, R.irfds_update(m, x0, rev1.eps, t, c))
    torch.testing.assert_close(rev1.t, t)


def test_rfds_rev_inner_model_drives_only_the_irfds_updates():
    m = mixture(flow.instaflow_convention())
    x0, t, eps = torch.randn(B, 2), torch.rand(B), torch.randn(B, 2)
    c, u = labels(B, 1), labels(B, -1)
    inner = CountingModel(m)
    rev = R.rfds_rev(m, x0, labels(B, 0), u, 3.0, t=t, eps=eps, inner_model=inner, inner_cond=c)
    assert inner.calls == [B]  # one conditional pass, no CFG
    torch.testing.assert_close(rev.eps, R.irfds_update(m, x0, eps, t, c))
    plain = R.rfds(m, x0, labels(B, 0), u, 3.0, t=t, eps=rev.eps)
    torch.testing.assert_close(rev.grad, plain.grad)


def test_generator_reproducibility_and_given_t_eps():
    m = mixture(flow.sd3_convention(3.0))
    x0 = torch.randn(B, 2)
    o1, o2 = _run("rfds", m, x0, seed=5, weighting="sigmoid"), _run("rfds", m, x0, seed=5, weighting="sigmoid")
    for k in ("t", "eps", "weights", "grad"):
        torch.testing.assert_close(getattr(o1, k), getattr(o2, k))
    o3 = R.rfds(m, x0, labels(B, 1), labels(B, -1), 3.0, t=o1.t, eps=o1.eps)
    torch.testing.assert_close(o3.grad, o1.grad / o1.weights[:, None])


def test_step_percent_range_is_respected():
    m = mixture(flow.sd3_convention(3.0, time_convention="reference"))
    out = R.rfds(m, torch.randn(512, 2), labels(512, 1), labels(512, -1), 1.0,
                 min_step_percent=0.1, max_step_percent=0.2, generator=torch.Generator().manual_seed(0))
    lo, hi = flow.shift_time(torch.tensor([0.8, 0.9]), 3.0).tolist()
    assert out.t.min() >= lo - 1e-6 and out.t.max() <= hi + 1e-6


def test_noise_regulariser():
    g = torch.Generator().manual_seed(0)
    assert R.noise_regulariser(torch.randn(100000, generator=g)) < 1e-4
    torch.testing.assert_close(R.noise_regulariser(torch.full((10,), 2.0)), torch.tensor(4.0 + 1.0))
    e = torch.randn(4, 16, generator=g, requires_grad=True)
    out = R.irfds_loss(mixture(), torch.zeros(4, 2), e[:, :2], labels(4, 1), reg_weight=0.0)
    out_reg = R.irfds_loss(mixture(), torch.zeros(4, 2), e[:, :2], labels(4, 1), reg_weight=2.0, t=out.t)
    torch.testing.assert_close(out_reg.loss - out.loss, 2.0 * R.noise_regulariser(e[:, :2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    """Device handling: generators, CPU time grids and the analytic model's CPU parameters."""
    dev = torch.device("cuda")
    m = mixture(flow.sd3_convention(3.0))
    x0 = torch.randn(B, 2, device=dev, requires_grad=True)
    c, u = {"label": torch.ones(B, dtype=torch.long, device=dev)}, {"label": torch.full((B,), -1, device=dev)}
    g = torch.Generator(device=dev).manual_seed(0)
    for fn in (R.rfds, R.rfds_rev):
        out = fn(m, x0, c, u, 3.0, weighting="sigmoid", generator=g)
        out.loss.backward()
        assert out.grad.device.type == "cuda" and x0.grad.device.type == "cuda"
        assert all(v.device.type == "cuda" for v in out.logs().values())
    eps = torch.zeros(B, 2, device=dev, requires_grad=True)
    R.irfds_loss(m, x0.detach(), eps, c, generator=g).loss.backward()
    assert eps.grad.device.type == "cuda"
    x = flow.euler_sample(lambda x, t: m.velocity(x, t, c), torch.randn(B, 2, device=dev), flow.time_grid(4))
    assert x.device.type == "cuda" and torch.isfinite(x).all()


# ---------------------------------------------------------------- paper parity (issue 13)
@pytest.mark.parametrize("weighting", R.WEIGHTINGS)
@pytest.mark.parametrize("name", ["rfds", "rfds-rev"])
def test_logged_loss_is_the_weighted_flow_matching_loss(name, weighting):
    """The value of ``loss`` (logged as loss_rfds) is mean_b w_b·mean_i (v̂ − v)² (docs/math.md §3.1),
    not mean(g²) = mean_b w_b²·mse_b; the gradient stays 2g/(n·B)."""
    x0 = torch.randn(B, 4, 4, 4, requires_grad=True)
    out = _run(name, _image_model(), x0, weighting=weighting, scale=2.0)
    mse = (out.v_pred - (out.eps - x0.detach())).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.loss.detach(), (out.weights * mse).mean())
    if weighting == "sigmoid":  # w < 1: w·mse and w²·mse differ
        assert (out.loss.detach() - (out.weights**2 * mse).mean()).abs() > 1e-3
    out.loss.backward()
    torch.testing.assert_close(x0.grad, 2 * out.grad / (x0[0].numel() * B))


@pytest.mark.parametrize("weighting", ["none", "sigmoid"])
def test_reference_batch_scaling_reproduces_the_paper_gradient(weighting):
    """batch_scaling='reference' gives exactly the gradient of the paper code's
    mean(w · mse(ε − x0, v̂) / B) (RFDS_sd3.py; w = 1 for InstaFlow): every sample weighted by mean(w),
    1/B of ours for w = 1."""
    import torch.nn.functional as F

    model, b = _image_model(), 4
    x0 = torch.randn(b, 4, 4, 4)
    grads = {}
    for scaling in R.BATCH_SCALINGS:
        x = x0.clone().requires_grad_(True)
        out = R.rfds(model, x, labels(b, 1), labels(b, -1), 2.0, weighting=weighting, batch_scaling=scaling,
                     generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        grads[scaling] = (x.grad, out)
    g_ours, ours = grads["per-sample"]
    g_ref, ref = grads["reference"]
    torch.testing.assert_close(ref.t, ours.t)
    # the paper's loss, written as its code does, on the same (t, ε, v̂) and the same drawn weights
    x = x0.clone().requires_grad_(True)
    paper = (ours.weights * F.mse_loss(ours.eps - x, ours.v_pred, reduction="mean") / b).mean()
    paper.backward()
    torch.testing.assert_close(g_ref, x.grad)
    torch.testing.assert_close(ref.loss.detach(), paper.detach())  # its logged value too
    if weighting == "none":
        torch.testing.assert_close(g_ref, g_ours / b)
    else:
        assert (g_ref * b - g_ours).abs().max() > 1e-4  # mean(w) for all vs each sample's own w
    with pytest.raises(ValueError, match="batch_scaling must be one of.*per-sample.*got 'paper'"):
        R.rfds(model, x0, labels(b, 1), labels(b, -1), 2.0, batch_scaling="paper")


def test_reference_irfds_schedule_draws_the_papers_grid():
    """SD3: the 15 timesteps of FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(15) (1000 … 8.93),
    whatever the step percents; InstaFlow: integer k ∈ [1000·min, 1000·max], noise level 1 − k/1000,
    network timestep k (the paper's mislabelling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(15)
    grid = sched.timesteps / 1000
    assert grid[0] == 1.0 and abs(grid[-1].item() - 0.0089286) < 1e-6
    n = 3000
    calls = []

    class Spy:
        def __init__(self, m):
            self.m, self.convention = m, m.convention

        def velocity(self, x, t, c):
            calls.append(t.clone())
            return self.m.velocity(x, t, c)

    sd3 = Spy(mixture(flow.sd3_convention(3.0)))
    out = R.irfds_loss(sd3, torch.zeros(n, 2), torch.randn(n, 2), labels(n, 1), schedule="reference",
                       min_step_percent=0.5, max_step_percent=0.6, generator=torch.Generator().manual_seed(0))
    hits = (out.t[:, None] - grid[None]).abs().min(1).values
    assert hits.max() < 1e-6  # every t on the grid ...
    assert len(set(torch.round(out.t * 1e5).tolist())) == 15  # ... all 15 points drawn, percents ignored
    torch.testing.assert_close(calls[-1], out.t)
    # InstaFlow, model convention: x_t at 1 − k/1000, velocity asked at time k/1000 (timestep k)
    for conv in (flow.instaflow_convention("model"), flow.instaflow_convention("reference")):
        inst = Spy(mixture(conv))
        out = R.irfds_loss(inst, torch.zeros(n, 2), torch.randn(n, 2), labels(n, 1), schedule="reference",
                           min_step_percent=0.1, max_step_percent=0.8, generator=torch.Generator().manual_seed(0))
        k = torch.round((1 - out.t) * 1000)
        torch.testing.assert_close(1 - out.t, k / 1000)  # integer timesteps
        assert k.min() == 100 and k.max() == 800  # noise levels [0.2, 0.9]
        timestep = conv.model_timestep(calls[-1])
        torch.testing.assert_close(timestep, k, rtol=0, atol=1e-3)
    # the default draws continuous percents (SD3: shift(u), u in [0.02, 0.98])
    out = R.irfds_loss(sd3, torch.zeros(n, 2), torch.randn(n, 2), labels(n, 1), generator=torch.Generator().manual_seed(0))
    assert len(set(out.t.tolist())) == n
    with pytest.raises(ValueError, match="schedule must be one of.*model.*reference.*got 'paper'"):
        R.irfds_loss(sd3, torch.zeros(2, 2), torch.randn(2, 2), labels(2, 1), schedule="paper")
