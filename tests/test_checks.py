"""Bad input raises ValueError naming the argument (checks.py and its users in rfds/flow)."""
import re

import numpy as np
import pytest
import torch

from analytic_cases import labels, mixture
from threestudio_rfds import checks, flow, rfds as R
from threestudio_rfds.protocol import cfg_velocity

B = 2


@pytest.fixture(scope="module")
def model():
    return mixture(flow.sd3_convention(3.0))


def _rfds(model, fn=R.rfds, x0=None, cond=None, **kw):
    x0 = torch.zeros(B, 2) if x0 is None else x0
    cond = labels(B, 1) if cond is None else cond
    return fn(model, x0, cond, labels(B, -1), 3.0, **kw)


BAD_RFDS = [
    (dict(t=torch.tensor([0.5, 1.5])), r"t must lie in \[0, 1\]"),
    (dict(t=torch.tensor([-0.1, 0.5])), r"t must lie in \[0, 1\]"),
    (dict(t=torch.tensor([0.5, float("nan")])), r"t must lie in \[0, 1\]"),
    (dict(t=torch.tensor([[0.5], [0.5]])), r"t must have shape \[B\]"),
    (dict(t=0.5), "t must be a tensor"),
    (dict(t=torch.tensor([0.5, 0.5, 0.5])), "batch sizes must match, got x0=2, t=3"),
    (dict(min_step_percent=0.6, max_step_percent=0.5), r"min_step_percent \(0.6\) must be <= max_step_percent"),
    (dict(min_step_percent=-0.1), r"min_step_percent must be a number in \[0.0, 1.0\]"),
    (dict(max_step_percent=1.5), r"max_step_percent must be a number in \[0.0, 1.0\]"),
    (dict(eps=torch.zeros(B, 3)), r"eps must have the shape of x0 \(2, 2\), got \(2, 3\)"),
    (dict(eps=torch.full((B, 2), float("inf"))), "eps contains 4 non-finite"),
    (dict(x0=torch.tensor([[0.0, float("nan")], [0.0, 0.0]])), "x0 contains 1 non-finite"),
    (dict(x0=torch.zeros(2)), r"x0 must be a batched tensor of shape \[B, \.\.\.\]"),
    (dict(cond=labels(3, 1)), "cond has batch size 3; it must be 1 or match the latent batch size 2"),
    (dict(weighting="linear"), r"weighting must be one of \['none', 'sigmoid', 'sds'\], got 'linear'"),
    (dict(grad_clip=0.0), "grad_clip must be > 0 or None"),
]


@pytest.mark.parametrize("fn", [R.rfds, R.rfds_rev])
@pytest.mark.parametrize("kw, msg", BAD_RFDS)
def test_rfds_bad_input(model, fn, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _rfds(model, fn, **kw)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(inner_step=0.0), "inner_step must be 'auto' or a number > 0, got 0.0"),
        (dict(inner_step="half"), "inner_step must be 'auto' or a number > 0, got 'half'"),
        (dict(inner_step=True), "inner_step must be 'auto'"),
        (dict(n_inner=-1), "n_inner must be an integer >= 0, got -1"),
        (dict(n_inner=1.5), "n_inner must be an integer >= 0"),
    ],
)
def test_rfds_rev_bad_inner_settings(model, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _rfds(model, R.rfds_rev, **kw)


def test_uncond_batch_mismatch(model):
    with pytest.raises(ValueError, match="uncond has batch size 3"):
        R.rfds(model, torch.zeros(B, 2), labels(B, 1), labels(3, -1), 3.0)


def test_irfds_bad_input(model):
    x0, eps, t, c = torch.zeros(B, 2), torch.zeros(B, 2), torch.full((B,), 0.5), labels(B, 1)
    with pytest.raises(ValueError, match="step_size must be 'auto' or a number > 0, got -1"):
        R.irfds_update(model, x0, eps, t, c, step_size=-1)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        R.irfds_update(model, x0, eps, t + 1, c)
    with pytest.raises(ValueError, match="t must be a tensor of noise levels"):
        R.irfds_update(model, x0, eps, None, c)
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        R.irfds_update(model, x0, torch.zeros(B, 3), t, c)
    with pytest.raises(ValueError, match="batch sizes must match, got x0=2, t=3"):
        R.irfds_update(model, x0, eps, torch.full((3,), 0.5), c)
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        R.irfds_loss(model, x0, torch.zeros(B, 3), c)
    with pytest.raises(ValueError, match="x0 contains"):
        R.irfds_loss(model, x0 / 0, eps, c)
    with pytest.raises(ValueError, match="min_step_percent"):
        R.irfds_loss(model, x0, eps, c, min_step_percent=0.9, max_step_percent=0.1)


@pytest.mark.parametrize("fn", [R.rfds, R.rfds_rev])
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "7.5", None])
def test_guidance_scale_must_be_a_finite_number(model, fn, scale):
    with pytest.raises(ValueError, match=rf"guidance_scale must be a finite number >= 0 .*, got {re.escape(repr(scale))}"):
        fn(model, torch.zeros(B, 2), labels(B, 1), labels(B, -1), scale)


def test_irfds_non_finite_inputs_and_bad_weight(model):
    x0, eps, t, c = torch.zeros(B, 2), torch.zeros(B, 2), torch.full((B,), 0.5), labels(B, 1)
    nan = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    with pytest.raises(ValueError, match="eps contains 1 non-finite"):
        R.irfds_update(model, x0, nan, t, c)
    with pytest.raises(ValueError, match="x0 contains 1 non-finite"):
        R.irfds_update(model, nan, eps, t, c)
    with pytest.raises(ValueError, match="eps contains 1 non-finite"):
        R.irfds_loss(model, x0, nan.clone().requires_grad_(), c)
    with pytest.raises(ValueError, match=r"reg_weight must be a finite number >= 0.0, got -1"):
        R.irfds_loss(model, x0, eps, c, reg_weight=-1)


def test_cfg_velocity_checks_batch_and_scale(model):
    with pytest.raises(ValueError, match="batch sizes must match, got x_t=2, t=3"):
        cfg_velocity(model, torch.zeros(B, 2), torch.full((3,), 0.5), labels(B, 1), labels(B, -1), 3.0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0 .*, got nan"):
        cfg_velocity(model, torch.zeros(B, 2), torch.full((B,), 0.5), labels(B, 1), labels(B, -1), float("nan"))


def test_flow_bad_input():
    with pytest.raises(ValueError, match=r"t_max must be a number in \[0.0, 1.0\], got 1.5"):
        flow.time_grid(4, t_max=1.5)
    with pytest.raises(ValueError, match=r"t_min must be a number in \[0.0, 0.5\], got 0.7"):
        flow.time_grid(4, t_max=0.5, t_min=0.7)
    with pytest.raises(ValueError, match="time_convention must be 'model' or 'reference', got 'paper'"):
        flow.sd3_convention(time_convention="paper")
    with pytest.raises(ValueError, match="time_convention"):
        flow.instaflow_convention(time_convention="Model")
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow.shift_time(torch.tensor([0.5]), -1.0)
    with pytest.raises(ValueError, match=r"min_t \(0.5\) must be <= max_t \(0.2\)"):
        flow.sample_time(2, 0.5, 0.2)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1\]"):
        flow.euler_sample(lambda x, t: x, torch.zeros(2, 2), torch.tensor([1.0, -0.5]))


def test_check_helpers():
    with pytest.raises(ValueError, match=r"lr must be a number in \[0, 1\], got 2"):
        checks.check_range("lr", 2, 0, 1)
    with pytest.raises(ValueError, match=r"lr must be a number in \[0, 1\], got '0.5'"):
        checks.check_range("lr", "0.5", 0, 1)
    checks.check_range("lr", 1, 0, 1)
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        checks.check_choice("mode", "c", ("a", "b"))
    checks.check_choice("mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match="x contains 2 non-finite"):
        checks.check_finite("x", torch.tensor([float("nan"), float("-inf"), 0.0]))
    with pytest.raises(ValueError, match=r"rgb must have 4 dimensions, got shape \(3, 2\)"):
        checks.check_shape("rgb", torch.zeros(3, 2), ndim=4)
    with pytest.raises(ValueError, match=r"rgb must have 3 channels in dim 1, got shape \(1, 4, 2, 2\)"):
        checks.check_shape("rgb", torch.zeros(1, 4, 2, 2), channels=3)
    with pytest.raises(ValueError, match="rgb must be a tensor, got list"):
        checks.check_shape("rgb", [1, 2])
    with pytest.raises(ValueError, match="batch sizes must match, got a=1, b=2"):
        checks.check_batch(("a", "b"), torch.zeros(1), torch.zeros(2))
    assert checks.check_batch(("a", "b"), torch.zeros(2), torch.zeros(2, 5)) == 2
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        checks.check_time("t", torch.tensor([1.0001]))
    checks.check_time("t", torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"w must be a finite number >= 0, got True"):
        checks.check_number("w", True, low=0)
    checks.check_number("w", 0, low=0)
    checks.check_number("w", np.float32(7.5))  # NumPy scalars are numbers too


class Exploding:
    """A velocity model that must never be called."""

    convention = flow.sd3_convention()

    def velocity(self, x_t, t, cond):
        raise AssertionError("the model was called before the options were checked")


@pytest.mark.parametrize("fn", [R.rfds, R.rfds_rev])
@pytest.mark.parametrize("kw", [dict(weighting="bogus"), dict(grad_clip=-1.0), dict(t=torch.tensor([2.0, 0.5])),
                                dict(min_step_percent=0.9, max_step_percent=0.1)])
def test_options_are_checked_before_the_model_runs(fn, kw):
    with pytest.raises(ValueError):
        _rfds(Exploding(), fn, **kw)
