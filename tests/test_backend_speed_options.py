"""Speed / memory options of every backend change how, never what, they compute."""
import pytest
import torch

from random_conds import random_conds
from threestudio_rfds.backends import load_backend


@pytest.fixture(params=["sd3", "flux", "instaflow"])
def family_path(request, tiny_sd3_path, tiny_flux_paths, tiny_instaflow_path):
    return request.param, {"sd3": tiny_sd3_path, "flux": tiny_flux_paths["schnell"],
                           "instaflow": tiny_instaflow_path}[request.param]


def _encode_with_grad(backend, rgb):
    x = rgb.clone().requires_grad_(True)
    z = backend.encode(x, torch.Generator().manual_seed(3))
    (z * torch.linspace(-1, 1, z.numel()).reshape(z.shape)).sum().backward()
    return z.detach(), x.grad


def test_channels_last_and_checkpointing_match_the_plain_encoder(family_path):
    family, path = family_path
    extra = {"latent_rule": "native"} if family == "instaflow" else {}
    plain = load_backend(family, pretrained_model_name_or_path=path, device="cpu", **extra)
    lean = load_backend(family, pretrained_model_name_or_path=path, device="cpu", vae_channels_last=True,
                        vae_checkpointing=True, **extra)
    assert plain.vae_channels_last is False and lean.vae_channels_last is True
    conv = next(m for m in lean.vae.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert lean.vae.encoder.gradient_checkpointing
    rgb = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    z0, g0 = _encode_with_grad(plain, rgb)
    z1, g1 = _encode_with_grad(lean, rgb)
    torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-5)
    assert g0.abs().sum() > 0
    assert ((g1 - g0).norm() / g0.norm()) < 1e-4  # same function, float32 rounding only


def test_bad_compile_mode_is_named(family_path):
    family, path = family_path
    with pytest.raises(ValueError, match="compile must be one of .*'reduce-overhead'"):
        load_backend(family, pretrained_model_name_or_path=path, device="cpu", compile="reduce-overhead")


@pytest.mark.parametrize("family", ["sd3", "instaflow"])
def test_compiled_denoiser_gives_the_eager_velocity(family, tiny_sd3_path, tiny_instaflow_path):
    """compile=True runs through torch.compile (inductor; ~25 s per model on 2 CPUs) and returns
    the eager velocity: the backend's call of the denoiser compiles without breaking it."""
    path = {"sd3": tiny_sd3_path, "instaflow": tiny_instaflow_path}[family]
    extra = {"latent_size": (64, 64)} if family == "instaflow" else {}
    eager = load_backend(family, pretrained_model_name_or_path=path, device="cpu", **extra)
    compiled = load_backend(family, pretrained_model_name_or_path=path, device="cpu", compile=True, **extra)
    cond, _ = random_conds(eager, 2)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, eager.latent_channels, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(compiled.velocity(x, t, cond), eager.velocity(x, t, cond), rtol=1e-4, atol=1e-5)
