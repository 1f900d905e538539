"""The core refuses what would silently give a wrong prior (issue 20): CFG overflow (the policy
covers v̂, g and the loss value, not only the model output), NaN or out-of-scale pixels given
to ``backend.encode``, a negative guidance scale; and names the problem in one line for
conditions of the wrong shape, meta tensors and an x0 without a gradient path."""
import pytest
import torch

from random_conds import random_conds
from threestudio_rfds import rfds as R
from threestudio_rfds.backends import load_backend
from threestudio_rfds.backends.base import RGB_TOLERANCE
from threestudio_rfds.checks import DeferredChecks, NonFiniteError
from threestudio_rfds.protocol import cfg_velocity

FNS = {"rfds": R.rfds, "rfds_rev": R.rfds_rev}


@pytest.fixture(scope="module")
def sd3(tiny_sd3_path):
    return load_backend("sd3", pretrained_model_name_or_path=tiny_sd3_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def instaflow(tiny_instaflow_path):
    return load_backend("instaflow", pretrained_model_name_or_path=tiny_instaflow_path, device="cpu", dtype="fp32",
                        latent_size=(64, 64))


def _x0(backend, b=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, backend.latent_channels, 8, 8, generator=g).requires_grad_()


# ---------------------------------------------------------------- overflow
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("scale", [1e30, 1e38])
def test_cfg_overflow_is_an_error_naming_the_guidance_scale(sd3, fn, scale):
    cond, uncond = random_conds(sd3, 2)
    with pytest.raises(NonFiniteError, match=rf"(v̂|g = w·\(v̂ − v\)|the RFDS loss value).* non-finite values.*"
                                             rf"guidance_scale") as e:
        FNS[fn](sd3, _x0(sd3), cond, uncond, scale)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("scale", [1e30, 1e38])
def test_cfg_overflow_with_nonfinite_zero_is_replaced_and_counted(sd3, fn, scale):
    cond, uncond = random_conds(sd3, 2)
    x0 = _x0(sd3)
    out = FNS[fn](sd3, x0, cond, uncond, scale, nonfinite="zero")
    logs = out.logs()
    assert logs["num_nonfinite"] >= 1, logs
    assert torch.isfinite(out.loss) and torch.isfinite(logs["grad_norm"]) and torch.isfinite(out.grad).all()
    assert torch.isfinite(out.v_pred).all()
    out.loss.backward()
    assert torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0


def test_grad_norm_of_huge_finite_gradients_is_finite():
    g = torch.full((2, 4, 8, 8), 1e30)
    torch.testing.assert_close(R.safe_norm(g), torch.tensor(1e30 * 512 ** 0.5))
    assert R.safe_norm(torch.zeros(3)) == 0


def test_irfds_loss_overflow_is_covered(sd3):
    cond, uncond = random_conds(sd3, 2)
    x0 = _x0(sd3).detach()
    eps = torch.randn_like(x0).requires_grad_()
    with pytest.raises(NonFiniteError, match="guidance_scale=1e\\+30"):
        R.irfds_loss(sd3, x0, eps, cond, uncond=uncond, guidance_scale=1e30)
    out = R.irfds_loss(sd3, x0, eps, cond, uncond=uncond, guidance_scale=1e30, nonfinite="zero")
    assert out.num_nonfinite >= 1 and torch.isfinite(out.loss)


@pytest.mark.parametrize("scale", [-1.0, -1e-3, float("nan")])
def test_a_negative_guidance_scale_is_refused_before_any_model_call(sd3, scale):
    cond, uncond = random_conds(sd3, 2)
    calls = []
    model = type("Counting", (), {"convention": sd3.convention,
                                  "velocity": lambda self, *a: calls.append(1) or sd3.velocity(*a)})()
    for fn in (R.rfds, R.rfds_rev):
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number >= 0 \(0 = unconditional"):
            fn(model, _x0(sd3), cond, uncond, scale)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        cfg_velocity(model, _x0(sd3), torch.full((2,), 0.5), cond, uncond, scale)
    assert calls == []
    R.rfds(sd3, _x0(sd3), cond, uncond, 0.0)  # 0: the unconditional velocity, allowed


# ---------------------------------------------------------------- encode
@pytest.mark.parametrize("name", ["sd3", "instaflow"])
def test_encode_refuses_nan_pixels_and_another_scale(request, name):
    backend = request.getfixturevalue(name)
    rgb = torch.rand(1, 3, 64, 64)
    nan = rgb.clone()
    nan[0, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^rgb contains 1 non-finite values.*divide 0–255 images by 255"):
        backend.encode(nan)
    with pytest.raises(ValueError, match=r"^rgb has values in \[0, 255\], outside \[-0.5, 1.5\]; encode takes "
                                         r"images in \[0, 1\]"):
        backend.encode((rgb * 255).round())
    with pytest.raises(ValueError, match=r"^rgb has values in \[-1, .*divide 0–255.*\(x \+ 1\) / 2"):
        rgb2 = rgb * 2 - 1
        rgb2[0, 0, 0, 0] = -1.0
        backend.encode(rgb2)
    # renders that overshoot a little are clamped as before, not refused
    over = (rgb * (1 + 2 * RGB_TOLERANCE) - RGB_TOLERANCE).clamp(-RGB_TOLERANCE, 1 + RGB_TOLERANCE)
    torch.testing.assert_close(backend.encode(over, generator=torch.Generator().manual_seed(0)),
                               backend.encode(over.clamp(0, 1), generator=torch.Generator().manual_seed(0)))


def test_encode_defers_its_check_to_the_step(sd3):
    cond, uncond = random_conds(sd3, 1)
    rgb = torch.full((1, 3, 64, 64), float("nan"), requires_grad=True)
    checks = DeferredChecks()
    x0 = sd3.encode(rgb, checks=checks)  # queued, not raised (no host sync here)
    with pytest.raises(NonFiniteError, match="^rgb contains"):  # the step settles it first, before x0's own
        R.rfds(sd3, x0, cond, uncond, 7.5, checks=checks)


# ---------------------------------------------------------------- unhelpful errors
def test_a_condition_of_the_wrong_width_names_key_given_and_needed(sd3, instaflow):
    cond, uncond = random_conds(sd3, 1)
    width = sd3.transformer.config.joint_attention_dim
    bad = {**cond, "prompt_embeds": torch.randn(1, 8, width + 3)}
    for c, u, which in ((bad, uncond, "cond"), (cond, bad, "uncond")):
        for batched in (True, False):
            with pytest.raises(ValueError, match=rf"^{which}\['prompt_embeds'\] must be \[B, L, {width}\] \(the "
                                                 rf"transformer's joint_attention_dim\), got \(1, 8, {width + 3}\)$"):
                R.rfds(sd3, _x0(sd3, 1), c, u, 7.5, cfg_batched=batched)
    ca, ua = random_conds(instaflow, 1)
    d = instaflow.unet.config.cross_attention_dim
    with pytest.raises(ValueError, match=rf"^uncond\['encoder_hidden_states'\] must be \[B, L, {d}\]"):
        R.rfds(instaflow, _x0(instaflow, 1), ca, {"encoder_hidden_states": torch.randn(1, 77, d + 1)}, 7.5)


def test_cond_and_uncond_of_different_lengths_name_both_shapes(sd3):
    cond, uncond = random_conds(sd3, 1)
    longer = {**uncond, "prompt_embeds": torch.zeros(1, 12, cond["prompt_embeds"].shape[-1])}
    with pytest.raises(ValueError, match=r"conditions differ in 'prompt_embeds': \(1, 8, \d+\) vs \(1, 12, \d+\); "
                                         r"batched CFG .*cfg_batched=False"):
        R.rfds(sd3, _x0(sd3, 1), cond, longer, 7.5)
    R.rfds(sd3, _x0(sd3, 1), cond, longer, 7.5, cfg_batched=False)  # two calls: lengths may differ


def test_meta_tensors_are_named(sd3):
    cond, uncond = random_conds(sd3, 2)
    with pytest.raises(ValueError, match=r"^x0 is on the meta device \(a shape without data"):
        R.rfds(sd3, torch.empty(2, 16, 8, 8, device="meta"), cond, uncond, 7.5)
    meta = {k: v.to("meta") for k, v in cond.items()}
    with pytest.raises(ValueError, match=r"^cond\['prompt_embeds'\] is on the meta device"):
        R.rfds(sd3, _x0(sd3), meta, uncond, 7.5)
    with pytest.raises(ValueError, match=r"^rgb is on the meta device"):
        sd3.encode(torch.empty(1, 3, 64, 64, device="meta"))


def test_backward_without_a_gradient_path_says_what_to_do(sd3):
    cond, uncond = random_conds(sd3, 2)
    out = R.rfds(sd3, _x0(sd3).detach(), cond, uncond, 7.5)
    with pytest.raises(RuntimeError, match=r"x0 does not require grad.*requires_grad=True.*RFDSOutput.grad") as e:
        out.loss.backward()
    assert "\n" not in str(e.value).strip()
    x0 = _x0(sd3).detach()
    eps = torch.randn_like(x0)
    with pytest.raises(RuntimeError, match=r"eps does not require grad"):
        R.irfds_loss(sd3, x0, eps, cond).loss.backward()
    with torch.no_grad():  # evaluation: no graph, nothing to explain
        assert not R.rfds(sd3, x0, cond, uncond, 7.5).loss.requires_grad
    x0.requires_grad_()  # with a path the loss is as before: value w·mse, gradient 2g/(n·B)
    out = R.rfds(sd3, x0, cond, uncond, 7.5)
    out.loss.backward()
    torch.testing.assert_close(x0.grad, 2 * out.grad / x0.numel(), rtol=0, atol=0)
