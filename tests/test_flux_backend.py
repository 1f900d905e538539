"""FluxBackend on the tiny random FLUX.1 [dev] and [schnell] (tests/tiny_flux.py): the sampler against
FluxPipeline (bitwise in fp32), packing and position ids, the resolution-dependent shift, the codec,
RFDS / RFDS-Rev steps, guidance modes and bad input (one-line errors before any weights load)."""
import math

import pytest
import torch

from threestudio_rfds.backends.base import ModelLoadError
from threestudio_rfds.backends.flux import FluxBackend
from threestudio_rfds.backends.flux_convention import (TimeShift, calculate_shift, flux_sigmas, guidance_settings,
                                                       latent_image_ids, pack_latents, unpack_latents)
from threestudio_rfds.protocol import for_latents
from threestudio_rfds.rfds import rfds, rfds_rev
from threestudio_rfds.text.flux import encode_flux_prompts

from tiny_flux import VAE_SCALE_FACTOR

MODES = {"dev": "distilled+cfg", "schnell": "cfg"}


@pytest.fixture(scope="module")
def backends(tiny_flux_paths):
    return {v: FluxBackend(p, device="cpu", dtype="fp32", guidance_mode=MODES[v]) for v, p in tiny_flux_paths.items()}


@pytest.fixture(scope="module")
def embeds(tiny_flux_paths):
    e = encode_flux_prompts(tiny_flux_paths["dev"], ["a photo of a cat", "a red dog", ""], device="cpu", dtype="fp32",
                            max_sequence_length=8)
    return {k: v[:2] for k, v in e.items()}, {k: v[2:].expand(2, *v.shape[1:]) for k, v in e.items()}


def _pipe(path):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(path)
    p.set_progress_bar_config(disable=True)
    return p


# ---------------------------------------------------------------- sampler == FluxPipeline
@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("n,h,w", [(1, 16, 16), (4, 32, 24), (28, 8, 40)])
def test_sigmas_equal_the_schedulers(backends, tiny_flux_paths, variant, n, h, w):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_paths[variant], subfolder="scheduler")
    mu = calculate_shift((h // 2) * (w // 2)) if variant == "dev" else None
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # what FluxPipeline asks for
    assert torch.equal(flux_sigmas(n, backends[variant].time_shift, h, w), s.sigmas)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_sampler_reproduces_flux_pipeline_bitwise(backends, tiny_flux_paths, embeds, variant, true_cfg):
    """Same seed, prompt embeddings and steps: the pipeline's latents bit for bit in fp32 (pipeline's
    guidance_scale = our embedded g for [dev], its true_cfg_scale = our CFG scale)."""
    cond, uncond = embeds
    be = backends[variant]
    ref = _pipe(tiny_flux_paths[variant])(
        prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        negative_prompt_embeds=uncond["prompt_embeds"], negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"],
        true_cfg_scale=true_cfg, guidance_scale=2.5, num_inference_steps=4, height=64, width=48,
        generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = be.sample(cond, uncond, true_cfg, 4, distilled_guidance=2.5 if variant == "dev" else None,
                     generator=torch.Generator().manual_seed(3), height=64, width=48)
    assert ours.shape == (2, 16, 64 // VAE_SCALE_FACTOR, 48 // VAE_SCALE_FACTOR)
    assert ref.abs().max() > 0.5  # the model did something
    assert torch.equal(pack_latents(ours), ref)


def test_sampler_given_latents_and_default_steps(backends, tiny_flux_paths, embeds):
    cond, uncond = embeds
    latents = torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(1))
    be = backends["schnell"]
    assert be.default_steps == 4 and backends["dev"].default_steps == 28
    ref = _pipe(tiny_flux_paths["schnell"])(
        prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
        num_inference_steps=4, latents=pack_latents(latents), height=32, width=48, output_type="latent").images
    assert torch.equal(pack_latents(be.sample(cond, None, latents=latents)), ref)


# ---------------------------------------------------------------- packing, ids, velocity
def test_packing_is_the_pipelines_and_invertible():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 10)
    assert torch.equal(pack_latents(z), FluxPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(z), 6, 10), z)
    ids = latent_image_ids(6, 10)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 2.0]  # token 7 = patch row 1, column 2


def test_velocity_is_the_unpacked_transformer_output(backends, embeds):
    cond, _ = embeds
    be = backends["dev"]
    x, t = torch.randn(2, 16, 8, 6), torch.tensor([0.25, 0.9])
    out = be.transformer(hidden_states=pack_latents(x), timestep=t, guidance=torch.full((2,), 3.5),
                         pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                         txt_ids=torch.zeros(8, 3), img_ids=latent_image_ids(8, 6), return_dict=False)[0]
    assert be.embedded_guidance == 3.5  # distilled+cfg without distilled_guidance: FluxPipeline's 3.5
    torch.testing.assert_close(be.velocity(x, t, cond), unpack_latents(out, 8, 6), rtol=0, atol=0)  # FLUX: ε − x0


def test_dev_shift_depends_on_the_latent_size(backends):
    dev, schnell = backends["dev"], backends["schnell"]
    assert dev.time_shift == TimeShift(3.0, True) and schnell.time_shift == TimeShift(1.0, False)
    with pytest.raises(AttributeError, match="for_latents"):
        dev.convention  # noqa: B018 — no single convention: the shift depends on the resolution
    for (h, w), tokens in (((32, 32), 256), ((64, 64), 1024), ((128, 128), 4096)):  # 256², 512², 1024² renders
        view = for_latents(dev, torch.zeros(1, 16, h, w))
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        assert view.convention.shift == pytest.approx(math.exp(mu), rel=1e-12)
        assert view.convention.timestep_scale == 1.0 and view.convention.velocity_sign == 1.0
    assert for_latents(schnell, torch.zeros(1, 16, 8, 8)) is schnell and schnell.convention.shift == 1.0
    with pytest.raises(ValueError, match="call backend.for_latents"):
        for_latents(dev, torch.zeros(1, 16, 8, 8)).velocity(torch.zeros(1, 16, 4, 4), torch.ones(1), {})


# ---------------------------------------------------------------- codec
def test_encode_decode(backends, tiny_flux_paths):
    be = backends["schnell"]
    rgb = torch.rand(2, 3, 32, 48, requires_grad=True)
    z = be.encode(rgb)
    assert z.shape == (2, 16, 16, 24) and be.latent_shape(32, 48) == (16, 24)
    z.square().mean().backward()
    assert rgb.grad.abs().sum() > 0
    img = be.decode(z.detach())
    assert img.shape == (2, 3, 32, 48) and 0 <= img.min() and img.max() <= 1
    mean = FluxBackend(tiny_flux_paths["schnell"], device="cpu", encode_mode="mean")
    raw = mean.vae.encode(rgb.detach() * 2 - 1).latent_dist.mean
    torch.testing.assert_close(mean.encode(rgb.detach()), (raw - 0.1159) * 0.3611)  # FLUX.1's shift / scale
    with pytest.raises(ValueError, match=r"render size 34x32 is not a multiple of 4 \(VAE factor 2 × FLUX.s 2×2"):
        be.encode(torch.rand(1, 3, 34, 32))


# ---------------------------------------------------------------- RFDS through FLUX
@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("algo", ["rfds", "rfds-rev"])
def test_rfds_steps_through_flux(backends, embeds, variant, algo):
    cond, uncond = ({k: v[:1] for k, v in c.items()} for c in embeds)
    be = backends[variant]
    state = {k: v.clone() for k, v in be.transformer.state_dict().items()}
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([rgb], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        z = be.encode(rgb)
        model = for_latents(be, z)
        out = (rfds if algo == "rfds" else rfds_rev)(model, z, cond, uncond, be.cfg_scale(7.5), generator=gen)
        out.loss.backward()
        assert torch.isfinite(out.loss) and rgb.grad.abs().sum() > 0 and torch.isfinite(rgb.grad).all()
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in be.transformer.parameters())
    assert all(torch.equal(v, state[k]) for k, v in be.transformer.state_dict().items())


def test_reduced_precision_weights_return_input_dtype(tiny_flux_paths, embeds):
    be = FluxBackend(tiny_flux_paths["dev"], device="cpu", dtype="bf16")
    assert be.transformer.dtype == torch.bfloat16
    v = be.velocity(torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.6]), embeds[0])
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


# ---------------------------------------------------------------- guidance modes
def test_guidance_settings():
    assert guidance_settings("distilled", True) == 3.5 and guidance_settings("distilled", True, 2.0) == 2.0
    assert guidance_settings("distilled+cfg", True, 5.0) == 5.0
    assert guidance_settings("cfg", True) == 1.0  # [dev] under true CFG: the conditional prediction, g = 1
    assert guidance_settings("cfg", False) is None  # [schnell]: no embedding
    with pytest.raises(ValueError, match=r"guidance_mode must be one of \['distilled', 'cfg', 'distilled\+cfg'\], got 'cfg\+\+'"):
        guidance_settings("cfg++", True)
    with pytest.raises(ValueError, match=r"distilled_guidance=3.5: .*no guidance embedding.*\[schnell\]"):
        guidance_settings("cfg", False, 3.5)
    with pytest.raises(ValueError, match=r"guidance_mode 'distilled' needs a guidance embedding"):
        guidance_settings("distilled", False)
    with pytest.raises(ValueError, match=r"distilled_guidance=2.0 is used by guidance_mode 'distilled'"):
        guidance_settings("cfg", True, 2.0)


def test_modes_set_the_embedding_and_the_cfg_scale(tiny_flux_paths, embeds):
    dev = tiny_flux_paths["dev"]
    distilled = FluxBackend(dev, device="cpu", guidance_mode="distilled", distilled_guidance=4.0)
    assert (distilled.embedded_guidance, distilled.cfg_scale(30.0)) == (4.0, 1.0)  # no negative pass
    both = FluxBackend(dev, device="cpu", guidance_mode="distilled+cfg", distilled_guidance=4.0)
    assert (both.embedded_guidance, both.cfg_scale(30.0)) == (4.0, 30.0)
    x, t = torch.randn(1, 16, 4, 4), torch.tensor([0.5])
    c = {k: v[:1] for k, v in embeds[0].items()}
    v4 = distilled.velocity(x, t, c)
    distilled.set_distilled_guidance(1.0)  # a schedule's next value
    assert not torch.allclose(v4, distilled.velocity(x, t, c))  # g reaches the embedding
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxBackend(tiny_flux_paths["schnell"], device="cpu").set_distilled_guidance(3.5)


# ---------------------------------------------------------------- bad input, before any weights load
@pytest.fixture
def weight_loads(monkeypatch):
    """Names of the classes whose weights ``from_pretrained`` loaded (FLUX transformer, VAE)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    loads = []
    for cls in (FluxTransformer2DModel, AutoencoderKL):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained",
                            classmethod(lambda c, *a, _r=real, **k: loads.append(c.__name__) or _r(c, *a, **k)))
    return loads


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "fp16"}, r"FLUX.1 overflows in fp16.*'bf16'"),
    ({"guidance_mode": "true-cfg"}, r"guidance_mode must be one of"),
    ({"distilled_guidance": 3.5}, r"distilled_guidance=3.5: .*\[schnell\]"),
    ({"guidance_mode": "distilled"}, r"guidance_mode 'distilled' needs a guidance embedding"),
    ({"quantization": "int4"}, r"quantization must be one of"),
    ({"quantization": "nf4"}, r"quantization 'nf4' needs (bitsandbytes|a CUDA device)"),
    ({"time_convention": "reference"}, r"time_convention must be one of \['model'\]"),
])
def test_bad_options_fail_in_one_line_before_weights(tiny_flux_paths, weight_loads, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        FluxBackend(tiny_flux_paths["schnell"], device="cpu", **kwargs)
    assert "\n" not in str(e.value) and weight_loads == []


def test_folder_of_another_family(tiny_sd3_path, tiny_instaflow_path, weight_loads):
    with pytest.raises(ValueError, match=r"holds a model of family 'sd3' \(SD3 / SD3.5: .*\), not of family 'flux' "
                                         r"\(FLUX.1\): .* or load it as 'sd3'"):
        FluxBackend(tiny_sd3_path, device="cpu")
    with pytest.raises(ValueError, match=r"holds a model of family 'instaflow'"):
        FluxBackend(tiny_instaflow_path, device="cpu")
    assert weight_loads == []


def test_weight_loads_are_counted(tiny_flux_paths, weight_loads):
    FluxBackend(tiny_flux_paths["schnell"], device="cpu")  # the fixture sees the loads it must not see above
    assert weight_loads == ["FluxTransformer2DModel", "AutoencoderKL"]


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="subfolder 'transformer'"):
        FluxBackend(str(tmp_path / "nothing-here"), device="cpu", local_files_only=True)


def test_bad_latents_and_cond(backends, embeds):
    be, (cond, _) = backends["dev"], embeds
    t = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="16 channels"):
        be.velocity(torch.randn(2, 4, 8, 8), t, cond)
    with pytest.raises(ValueError, match="must be even"):
        be.velocity(torch.randn(2, 16, 7, 8), t, cond)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        be.velocity(torch.randn(2, 16, 8, 8), t, {"prompt_embeds": cond["prompt_embeds"]})
    with pytest.raises(ValueError, match=r"cond\['pooled_prompt_embeds'\] must be \[B, 24\]"):
        be.velocity(torch.randn(2, 16, 8, 8), t, {**cond, "pooled_prompt_embeds": torch.randn(2, 2048)})
