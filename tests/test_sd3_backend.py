"""SD3Backend on the tiny random SD3 (tests/tiny_sd3.py): sampler vs the diffusers pipeline, codec,
RFDS / RFDS-Rev steps (gradients, frozen weights, steady memory) and bad input."""
import gc
import os
import subprocess
import sys

import pytest
import torch

from threestudio_rfds.backends.base import ModelLoadError
from threestudio_rfds.backends.sd3 import SD3Backend, sd3_sigmas
from threestudio_rfds.rfds import rfds, rfds_rev
from threestudio_rfds.text.sd3 import encode_sd3_prompts

from tiny_sd3 import VAE_SCALE_FACTOR


@pytest.fixture(scope="module")
def backend(tiny_sd3_path):
    return SD3Backend(tiny_sd3_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def pipe(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def embeds(tiny_sd3_path):
    e = encode_sd3_prompts(tiny_sd3_path, ["a photo of a cat", "a red dog", ""], device="cpu", dtype="fp32",
                           max_sequence_length=8)
    cond = {k: v[:2] for k, v in e.items()}
    uncond = {k: v[2:].expand(2, *v.shape[1:]) for k, v in e.items()}
    return cond, uncond


def _pipe_latents(pipe, cond, uncond, guidance_scale, steps, **kw):
    return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                negative_prompt_embeds=uncond["prompt_embeds"],
                negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"], guidance_scale=guidance_scale,
                num_inference_steps=steps, output_type="latent", **kw).images


# ---------------------------------------------------------------- sampler == diffusers
@pytest.mark.parametrize("n", [1, 2, 7, 28])
def test_sigmas_match_scheduler(pipe, n):
    pipe.scheduler.set_timesteps(n)
    torch.testing.assert_close(sd3_sigmas(n, 3.0), pipe.scheduler.sigmas, rtol=0, atol=1e-7)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_sampler_matches_pipeline_given_latents(backend, pipe, embeds, guidance_scale):
    cond, uncond = embeds
    latents = torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(1))  # non-square
    ref = _pipe_latents(pipe, cond, uncond, guidance_scale, 4, latents=latents, height=32, width=48)
    ours = backend.sample(cond, uncond, guidance_scale, 4, latents=latents)
    assert ref.abs().max() > 0.5  # the model did something
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sampler_matches_pipeline_generator(backend, pipe, embeds):
    cond, uncond = embeds
    ref = _pipe_latents(pipe, cond, uncond, 3.0, 3, generator=torch.Generator().manual_seed(3), height=48, width=32)
    ours = backend.sample(cond, uncond, 3.0, 3, generator=torch.Generator().manual_seed(3), height=48, width=32)
    assert ours.shape == (2, 16, 48 // VAE_SCALE_FACTOR, 32 // VAE_SCALE_FACTOR)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_velocity_is_transformer_output_at_1000t(backend, embeds):
    cond, _ = embeds
    x = torch.randn(2, 16, 8, 8)
    t = torch.tensor([0.25, 0.9])
    out = backend.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond["prompt_embeds"],
                              pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(backend.velocity(x, t, cond), out)  # SD3 predicts ε − x0 = v
    assert backend.convention.shift == 3.0  # read from the scheduler config


# ---------------------------------------------------------------- codec
def test_encode_decode_shapes_and_gradient(backend):
    f = backend.vae_scale_factor
    assert f == VAE_SCALE_FACTOR == 2  # tiny VAE: 64² → 32² (real SD3: factor 8, 256² → 32²)
    for h, w in [(64, 64), (48, 80)]:
        rgb = torch.rand(2, 3, h, w, requires_grad=True)
        z = backend.encode(rgb)
        assert z.shape == (2, 16, h // f, w // f) and backend.latent_shape(h, w) == (h // f, w // f)
        z.square().mean().backward()
        assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
        img = backend.decode(z.detach())
        assert img.shape == (2, 3, h, w) and img.min() >= 0 and img.max() <= 1


def test_encode_applies_shift_and_scale(backend, tiny_sd3_path):
    rgb = torch.rand(1, 3, 32, 32)
    mean_backend = SD3Backend(tiny_sd3_path, device="cpu", encode_mode="mean")
    raw = backend.vae.encode(rgb * 2 - 1).latent_dist.mean
    torch.testing.assert_close(mean_backend.encode(rgb), (raw - 0.0609) * 1.5305)
    assert not torch.equal(backend.encode(rgb), backend.encode(rgb))  # "sample" draws from the posterior
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(backend.encode(rgb, g()), backend.encode(rgb, g()))


def test_resize_rule(tiny_sd3_path):
    b = SD3Backend(tiny_sd3_path, device="cpu", latent_rule="resize", latent_size=(32, 48))
    assert b.encode(torch.rand(1, 3, 50, 70)).shape == (1, 16, 16, 24)


# ---------------------------------------------------------------- RFDS through SD3
def _tensor_count() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("algo", ["rfds", "rfds-rev"])
@pytest.mark.parametrize("batch", [1, 4])
def test_rfds_steps_through_sd3(backend, embeds, algo, batch):
    cond, uncond = embeds
    cond, uncond = {k: v[:1] for k, v in cond.items()}, {k: v[:1] for k, v in uncond.items()}
    state = {k: v.clone() for k, v in backend.transformer.state_dict().items()}
    vae_state = {k: v.clone() for k, v in backend.vae.state_dict().items()}
    rgb = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([rgb], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    counts = []
    for step in range(20):
        opt.zero_grad(set_to_none=True)
        latents = backend.encode(rgb)
        if algo == "rfds":
            out = rfds(backend, latents, cond, uncond, 7.5, generator=gen)
        else:
            out = rfds_rev(backend, latents, cond, uncond, 7.5, generator=gen)
        assert torch.isfinite(out.loss) and int(out.num_nonfinite) == 0
        out.loss.backward()
        assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
        assert not (out.grad.requires_grad or out.v_pred.requires_grad or out.x_t.requires_grad)
        opt.step()
        with torch.no_grad():
            rgb.clamp_(0, 1)
        del out, latents
        if step in (4, 19):
            counts.append(_tensor_count())
    assert counts[0] == counts[1], f"live tensors grew from {counts[0]} to {counts[1]}"
    for module, ref in ((backend.transformer, state), (backend.vae, vae_state)):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
        assert all(torch.equal(v, ref[k]) for k, v in module.state_dict().items())
        assert not module.training


def test_reduced_precision_weights_return_input_dtype(tiny_sd3_path, embeds):
    b = SD3Backend(tiny_sd3_path, device="cpu", dtype="bf16")
    assert b.transformer.dtype == torch.bfloat16
    cond, _ = embeds
    v = b.velocity(torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.6]), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


# ---------------------------------------------------------------- bad input
def test_bad_latents_and_cond(backend, embeds):
    cond, _ = embeds
    t = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="16 channels"):
        backend.velocity(torch.randn(2, 4, 8, 8), t, cond)
    with pytest.raises(ValueError, match="16 channels"):
        backend.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        backend.velocity(torch.randn(2, 16, 7, 8), t, cond)
    with pytest.raises(ValueError, match="at most 64"):
        backend.velocity(torch.randn(2, 16, 66, 8), t, cond)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        backend.velocity(torch.randn(2, 16, 8, 8), t, {"prompt_embeds": cond["prompt_embeds"]})
    with pytest.raises(ValueError, match=r"cond\['prompt_embeds'\] must be \[B, L, 48\]"):
        backend.velocity(torch.randn(2, 16, 8, 8), t, {**cond, "prompt_embeds": torch.randn(2, 5, 4096)})
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        backend.velocity(torch.randn(2, 16, 8, 8), torch.tensor(0.5), cond)


def test_bad_render_size_native_rule(backend):
    with pytest.raises(ValueError, match="render size 33x32 is not a multiple of 2"):
        backend.encode(torch.rand(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"rgb must have shape \[B, 3, H, W\]"):
        backend.encode(torch.rand(1, 4, 32, 32))


def test_bad_options(tiny_sd3_path):
    with pytest.raises(ValueError, match="latent_rule"):
        SD3Backend(tiny_sd3_path, latent_rule="crop")
    with pytest.raises(ValueError, match="latent_size"):
        SD3Backend(tiny_sd3_path, latent_rule="resize")
    with pytest.raises(ValueError, match="time_convention"):
        SD3Backend(tiny_sd3_path, time_convention="paper")
    with pytest.raises(ValueError, match="dtype"):
        SD3Backend(tiny_sd3_path, dtype="int8")


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="subfolder 'scheduler'"):
        SD3Backend(str(tmp_path / "nothing-here"), device="cpu", local_files_only=True)


def test_not_an_sd3_folder(tiny_sd3_path, tmp_path):
    import shutil

    bad = tmp_path / "no-transformer"
    shutil.copytree(tiny_sd3_path, bad)
    shutil.rmtree(bad / "transformer")
    with pytest.raises(ModelLoadError, match=r"no-transformer.*subfolder 'transformer'.*lacks a loadable"):
        SD3Backend(str(bad), device="cpu")


def test_offline_mode_error_names_model_subfolder_and_fix(tmp_path):
    code = ("from threestudio_rfds.backends.sd3 import SD3Backend\n"
            "try:\n    SD3Backend('fake-org/fake-sd3-model', device='cpu')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ModelLoadError"), out
    for part in ("'fake-org/fake-sd3-model'", "subfolder 'scheduler'", "offline mode",
                 "hf download fake-org/fake-sd3-model"):
        assert part in out, out
