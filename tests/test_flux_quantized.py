"""The quantised-denoiser option on the CPU: the tiny FLUX.1 transformer loaded through diffusers'
TorchAoConfig (torchao int8 / float8 weight-only), its velocity error against the unquantised model,
an RFDS step through it with the VAE left unquantised, and the one-line refusals of a quantisation
library that is missing or cannot run on the device."""
import pytest
import torch

from threestudio_rfds.backends import quantize
from threestudio_rfds.backends.flux import FluxBackend
from threestudio_rfds.protocol import for_latents
from threestudio_rfds.rfds import rfds

pytest.importorskip("torchao", reason="torchao is in the [test] and [quant] extras (pip install -e '.[test]')")

# measured on the tiny [dev] model, fp32 activations: int8 0.0056, float8 0.036 (docs/backends.md)
MAX_REL_ERR = {"int8-weight-only": 0.02, "float8-weight-only": 0.08}


def _velocity(backend, cond):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    return backend.velocity(x, torch.tensor([0.3, 0.8]), cond)


@pytest.fixture(scope="module")
def cond(tiny_flux_paths):
    from threestudio_rfds.text.flux import encode_flux_prompts

    return encode_flux_prompts(tiny_flux_paths["dev"], ["a photo of a cat", "a red dog"], device="cpu",
                               max_sequence_length=8)


@pytest.mark.parametrize("method", ["int8-weight-only", "float8-weight-only"])
def test_quantised_transformer_loads_and_stays_close(tiny_flux_paths, cond, method):
    path = tiny_flux_paths["dev"]
    ref = FluxBackend(path, device="cpu", dtype="fp32", guidance_mode="distilled")
    q = FluxBackend(path, device="cpu", dtype="fp32", guidance_mode="distilled", quantization=method)
    weight = q.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight) is not torch.nn.Parameter and type(weight).__module__.startswith("torchao")  # a torchao tensor
    assert q.transformer.is_quantized and not getattr(q.vae, "is_quantized", False)
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in q.vae.parameters())  # VAE untouched
    v, v_ref = _velocity(q, cond), _velocity(ref, cond)
    err = float((v - v_ref).norm() / v_ref.norm())
    assert 0 < err < MAX_REL_ERR[method], err


def test_rfds_step_through_the_quantised_backend(tiny_flux_paths, cond):
    be = FluxBackend(tiny_flux_paths["dev"], device="cpu", guidance_mode="distilled+cfg", quantization="int8-weight-only")
    c = {k: v[:1] for k, v in cond.items()}
    rgb = torch.rand(1, 3, 32, 32, requires_grad=True)
    z = be.encode(rgb)
    out = rfds(for_latents(be, z), z, c, c, be.cfg_scale(4.0), generator=torch.Generator().manual_seed(0))
    out.loss.backward()  # autograd runs through the (unquantised) VAE encoder only
    assert torch.isfinite(out.loss) and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in be.transformer.parameters())


def test_missing_or_unusable_library_is_refused_in_one_line(monkeypatch):
    cpu = torch.device("cpu")
    quantize.check_quantization("int8-weight-only", cpu)  # installed here
    monkeypatch.setattr(quantize, "_installed", lambda package: None)
    with pytest.raises(ValueError, match=r"quantization 'int8-weight-only' needs torchao, which is not installed: "
                                         r"pip install 'threestudio-rfds\[quant\]'"):
        quantize.check_quantization("int8-weight-only", cpu)
    monkeypatch.setattr(quantize, "_installed", lambda package: "0.12.0")
    with pytest.raises(ValueError, match=r"needs torchao >= 0.15 \(diffusers' minimum\), found 0.12.0"):
        quantize.check_quantization("float8-weight-only", cpu)
    monkeypatch.setattr(quantize, "_installed", lambda package: "0.45.0")
    with pytest.raises(ValueError, match=r"'nf4' \(bitsandbytes\) needs a CUDA device, got 'cpu'"):
        quantize.check_quantization("nf4", cpu)
