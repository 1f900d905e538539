"""InstaFlowBackend and the CLIP prompt encoder on a tiny random SD1.5-layout pipeline (fp32, CPU)."""
import gc

import pytest
import torch
import torch.nn.functional as F

from threestudio_rfds.backends import load_backend
from threestudio_rfds.backends.base import ModelLoadError
from threestudio_rfds.backends.instaflow import InstaFlowBackend
from threestudio_rfds.protocol import LatentBackend
from threestudio_rfds.rfds import rfds, rfds_rev
from threestudio_rfds.text.clip import encode_clip_prompts

SIZE = (64, 64)  # resize target for the tiny model (512² for the real one) → 8×8 latents


@pytest.fixture(scope="module")
def backend(tiny_instaflow_path):
    return InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", latent_size=SIZE)


@pytest.fixture(scope="module")
def conds(tiny_instaflow_path):
    e = encode_clip_prompts(tiny_instaflow_path, ["a photo of the cat", ""], device="cpu", dtype="fp32")
    h = e["encoder_hidden_states"]
    return {"encoder_hidden_states": h[:1]}, {"encoder_hidden_states": h[1:]}


@pytest.fixture(scope="module")
def pipe(tiny_instaflow_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_instaflow_path)


def test_loads_frozen_and_matches_protocol(backend):
    assert isinstance(backend, LatentBackend)
    assert backend.latent_channels == 4 and backend.scaling_factor == pytest.approx(0.18215)
    assert backend.vae_scale_factor == 8
    for m in (backend.unet, backend.vae):
        assert not m.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in m.parameters())


def test_load_backend_dispatch(tiny_instaflow_path):
    b = load_backend("instaflow", pretrained_model_name_or_path=tiny_instaflow_path, device="cpu", dtype="fp32")
    assert isinstance(b, InstaFlowBackend) and b.latent_size == (512, 512) and b.latent_rule == "resize"
    assert b.unet._compiled_call_impl is None
    compiled = load_backend("instaflow", pretrained_model_name_or_path=tiny_instaflow_path, device="cpu", compile=True)
    assert compiled.unet._compiled_call_impl is not None  # compiled lazily, on the first call
    with pytest.raises(ValueError, match="unknown backend 'sd4'.*instaflow.*sd3"):
        load_backend("sd4")


def test_clip_embeddings_equal_pipeline(pipe, conds):
    c, u = conds
    ref_c, ref_u = pipe.encode_prompt("a photo of the cat", "cpu", 1, True, negative_prompt="")
    assert c["encoder_hidden_states"].shape == (1, 77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(c["encoder_hidden_states"], ref_c, rtol=0, atol=0)
    torch.testing.assert_close(u["encoder_hidden_states"], ref_u, rtol=0, atol=0)
    assert not torch.equal(ref_c, ref_u)


def test_velocity_is_negated_unet_output(backend, conds, pipe):
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.3, 0.8])
    ehs = conds[0]["encoder_hidden_states"].expand(2, -1, -1)
    with torch.no_grad():
        out = pipe.unet(x, 1000 * t, encoder_hidden_states=ehs).sample
        v = backend.velocity(x, t, conds[0])  # batch-1 cond is broadcast
    torch.testing.assert_close(v, -out)


def test_reference_time_convention_feeds_one_minus_t(tiny_instaflow_path, backend, conds):
    ref = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", time_convention="reference")
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        v_ref, v_model = ref.velocity(x, t, conds[0]), backend.velocity(x, t, conds[0])
        torch.testing.assert_close(v_ref, backend.velocity(x, 1 - t, conds[0]))
    assert (v_ref - v_model).abs().max() > 1e-3
    # step percents u in [0.1, 0.3]: model → t = u, reference → t = 1 − u
    g = torch.Generator().manual_seed(0)
    tm = backend.convention.sample_time(256, 0.1, 0.3, generator=g)
    tr = ref.convention.sample_time(256, 0.1, 0.3, generator=torch.Generator().manual_seed(0))
    assert tm.min() >= 0.1 and tm.max() <= 0.3
    torch.testing.assert_close(tr, 1 - tm)
    with pytest.raises(ValueError, match="time_convention"):
        InstaFlowBackend(tiny_instaflow_path, device="cpu", time_convention="paper")


def _reference_sampler(unet, noise, cond, uncond, w, n):
    """The InstaFlow pipeline's loop, written independently: T_i = 1000(1 − i/N), z += v/N."""
    z = noise.clone()
    emb = torch.cat([uncond, cond])
    for i in range(n):
        vec_t = torch.ones(2 * z.shape[0]) * ((1.0 - i / n) * 1000.0)
        v_neg, v_text = unet(torch.cat([z, z]), vec_t, encoder_hidden_states=emb).sample.chunk(2)
        z = z + (1.0 / n) * (v_neg + w * (v_text - v_neg))
    return z


@pytest.mark.parametrize("n", [1, 3])
def test_sampler_matches_instaflow_loop(backend, conds, pipe, n):
    c, u = conds
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _reference_sampler(pipe.unet, noise, c["encoder_hidden_states"].expand(2, -1, -1),
                                      u["encoder_hidden_states"].expand(2, -1, -1), 4.0, n)
    got = backend.sample(c, u, guidance_scale=4.0, num_inference_steps=n, latents=noise)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # without guidance: conditional velocity only
    got1 = backend.sample(c, num_inference_steps=1, latents=noise)
    with torch.no_grad():
        exp1 = noise + pipe.unet(noise, torch.full((2,), 1000.0), encoder_hidden_states=c["encoder_hidden_states"].expand(2, -1, -1)).sample
    torch.testing.assert_close(got1, exp1, rtol=1e-4, atol=1e-5)


def test_encode_resize_rule_and_non_square(backend, tiny_instaflow_path):
    rgb = torch.rand(2, 3, 40, 56)
    z = backend.encode(rgb, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8)
    x = F.interpolate(rgb, size=SIZE, mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        ref = backend.vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)) * 0.18215
    torch.testing.assert_close(z.detach(), ref)
    wide = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", latent_size=(48, 80))
    assert wide.encode(rgb).shape == (2, 4, 6, 10) and wide.latent_shape(40, 56) == (6, 10)
    native = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", latent_rule="native")
    zn = native.encode(torch.rand(1, 3, 48, 64))
    assert zn.shape == (1, 4, 6, 8) == (1, 4, *native.latent_shape(48, 64))
    with torch.no_grad():
        assert native.velocity(zn, torch.tensor([0.5]), {"encoder_hidden_states": torch.randn(1, 77, 32)}).shape == zn.shape
        assert native.decode(zn).shape == (1, 3, 48, 64)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        native.encode(torch.rand(1, 3, 50, 64))
    with pytest.raises(ValueError, match="latent_rule"):
        InstaFlowBackend(tiny_instaflow_path, device="cpu", latent_rule="crop")


def test_decode_range_and_default_sample_size(backend, conds):
    z = backend.sample(conds[0], generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 8, 8)  # unet sample_size 8 (64 for the real model → 512 px)
    rgb = backend.decode(z)
    assert rgb.shape == (1, 3, 64, 64) and rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(ValueError, match="multiples of the VAE factor 8"):
        backend.sample(conds[0], height=60, width=64)


@pytest.mark.parametrize("algo", ["rfds", "rfds-rev"])
@pytest.mark.parametrize("batch", [1, 4])
def test_distillation_step_through_backend(backend, conds, algo, batch):
    c, u = conds
    rgb = torch.rand(batch, 3, 48, 40, requires_grad=True)
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    step = rfds if algo == "rfds" else rfds_rev
    out = step(backend, backend.encode(rgb), c, u, 7.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.t.shape == (batch,)
    out.loss.backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0 and torch.isfinite(rgb.grad).all()
    assert all(p.grad is None for p in list(backend.unet.parameters()) + list(backend.vae.parameters()))
    assert all(torch.equal(before[k], v) for k, v in backend.unet.state_dict().items())


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("algo", ["rfds", "rfds-rev"])
@pytest.mark.parametrize("batch", [1, 4])
def test_twenty_steps_keep_no_graph(backend, conds, algo, batch):
    """Memory steady over 20 optimiser steps: no graph or tensor survives a step."""
    c, u = conds
    rgb = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([rgb], lr=1e-2)
    gen, step_fn, counts = torch.Generator().manual_seed(0), (rfds if algo == "rfds" else rfds_rev), []
    for i in range(20):
        out = step_fn(backend, backend.encode(rgb), c, u, 7.5, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
        assert out.v_pred.grad_fn is None and out.grad.grad_fn is None
        del out
        if i in (4, 19):
            counts.append(_live_tensors())
    assert counts[0] == counts[1], f"live tensors grew from {counts[0]} to {counts[1]}"


def test_bad_inputs_name_the_problem(backend, conds, tiny_instaflow_path):
    c, _ = conds
    with pytest.raises(ValueError, match="x_t must have 4 channels"):
        backend.velocity(torch.randn(1, 3, 8, 8), torch.tensor([0.5]), c)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        backend.velocity(torch.randn(2, 4, 8, 8), torch.tensor(0.5), c)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        backend.velocity(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), {"prompt_embeds": torch.randn(1, 77, 32)})
    with pytest.raises(ValueError, match=r"\[B, L, 32\]"):
        backend.velocity(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), {"encoder_hidden_states": torch.randn(1, 77, 16)})
    with pytest.raises(ValueError, match=r"rgb must have shape \[B, 3, H, W\]"):
        backend.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="prompts"):
        encode_clip_prompts(tiny_instaflow_path, [1, 2])


def test_wrong_latent_channels(tiny_instaflow_path):
    from tiny_instaflow import tiny_unet, tiny_vae

    with pytest.raises(ValueError, match="in_channels is 8.*4 channels"):
        InstaFlowBackend.from_modules(tiny_unet(in_channels=8), tiny_vae())


def test_missing_folder_and_offline_errors(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=r"no-such-model.*subfolder 'unet'.*model folder .* does not exist"):
        InstaFlowBackend(missing, device="cpu")
    with pytest.raises(ModelLoadError, match=r"nobody-xyz/instaflow-missing.*'unet'.*offline.*hf download nobody-xyz/instaflow-missing"):
        InstaFlowBackend("nobody-xyz/instaflow-missing", device="cpu", local_files_only=True)
    with pytest.raises(ModelLoadError, match=r"CLIPTokenizer.*subfolder 'tokenizer'.*offline"):
        encode_clip_prompts("nobody-xyz/instaflow-missing", "a cat", local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"CLIPTokenizer.*subfolder 'tokenizer'.*lacks"):
        encode_clip_prompts(str(tmp_path / "empty"), "a cat")
    with pytest.raises(ModelLoadError, match="local folder exists but lacks"):
        InstaFlowBackend(str(tmp_path / "empty"), device="cpu")


def test_unet_delta_merge_and_vae_swap(tmp_path, tiny_instaflow_path, backend):
    from tiny_instaflow import tiny_unet, tiny_vae

    base, fine = tiny_unet(seed=1), tiny_unet(seed=2)
    base.save_pretrained(str(tmp_path / "base" / "unet"))
    fine.save_pretrained(str(tmp_path / "fine" / "unet"))
    tiny_vae(seed=3).save_pretrained(str(tmp_path / "fine" / "vae"))
    spec = {"base": str(tmp_path / "base"), "finetuned": str(tmp_path / "fine")}
    merged = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", unet_delta=spec,
                              vae_path=str(tmp_path / "fine"))
    inst, sb, sf = backend.unet.state_dict(), base.state_dict(), fine.state_dict()
    for k, w in merged.unet.state_dict().items():
        assert torch.equal(w, inst[k] + (sf[k] - sb[k])), k
    assert not torch.equal(merged.unet.conv_in.weight, backend.unet.conv_in.weight)
    sv = tiny_vae(seed=3).state_dict()
    assert all(torch.equal(w, sv[k]) for k, w in merged.vae.state_dict().items())
    assert not torch.equal(merged.vae.encoder.conv_in.weight, backend.vae.encoder.conv_in.weight)
    half = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", unet_delta={**spec, "alpha": 0.5})
    w = half.unet.conv_in.weight
    torch.testing.assert_close(w, inst["conv_in.weight"] + 0.5 * (sf["conv_in.weight"] - sb["conv_in.weight"]))
    with pytest.raises(ValueError, match="unet_delta must be a dict with keys 'base' and 'finetuned'"):
        InstaFlowBackend(tiny_instaflow_path, device="cpu", unet_delta={"base": spec["base"]})
    tiny_unet(seed=1, block_out_channels=(32, 32)).save_pretrained(str(tmp_path / "other" / "unet"))
    with pytest.raises(ValueError, match="different weights"):
        InstaFlowBackend(tiny_instaflow_path, device="cpu", unet_delta={**spec, "finetuned": str(tmp_path / "other")})
    tiny_unet(seed=1, cross_attention_dim=16).save_pretrained(str(tmp_path / "other" / "unet"))
    with pytest.raises(ValueError, match="shape"):
        InstaFlowBackend(tiny_instaflow_path, device="cpu", unet_delta={**spec, "finetuned": str(tmp_path / "other")})


def test_encode_prompts_dispatch_and_cache(tiny_instaflow_path, conds, tmp_path):
    from threestudio_rfds.text import encode_prompt_pair

    for cache_dir in (None, str(tmp_path), str(tmp_path)):  # computed, stored, then read back
        c, u = encode_prompt_pair("instaflow", tiny_instaflow_path, "a photo of the cat", device="cpu",
                                  dtype="fp32", cache_dir=cache_dir)
        torch.testing.assert_close(c["encoder_hidden_states"], conds[0]["encoder_hidden_states"], rtol=0, atol=0)
        torch.testing.assert_close(u["encoder_hidden_states"], conds[1]["encoder_hidden_states"], rtol=0, atol=0)


def _delta_folders(root, fine_seed=2):
    """Tiny "SD1.5" (base) and "fine-tune" folders with unet/ and vae/, written with save_pretrained."""
    from tiny_instaflow import tiny_unet, tiny_vae

    tiny_unet(seed=1).save_pretrained(str(root / "base" / "unet"))
    tiny_vae(seed=1).save_pretrained(str(root / "base" / "vae"))
    tiny_unet(seed=fine_seed).save_pretrained(str(root / "fine" / "unet"))
    tiny_vae(seed=3).save_pretrained(str(root / "fine" / "vae"))
    return {"base": str(root / "base"), "finetuned": str(root / "fine")}


def test_merged_unet_is_cached_once_and_keyed_on_the_models(tmp_path, tiny_instaflow_path, backend, monkeypatch):
    from safetensors.torch import load_file

    from tiny_instaflow import tiny_unet

    spec, cache = _delta_folders(tmp_path), str(tmp_path / "cache")
    kw = dict(device="cpu", dtype="fp32", unet_delta=spec, merge_cache=cache)
    first = InstaFlowBackend(tiny_instaflow_path, **kw)
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".tmp-*"))
    inst, sb, sf = backend.unet.state_dict(), tiny_unet(seed=1).state_dict(), tiny_unet(seed=2).state_dict()
    stored = load_file(str(tmp_path / "cache" / files[0]))
    for k, w in first.unet.state_dict().items():
        assert torch.equal(w, inst[k] + (sf[k] - sb[k])) and torch.equal(stored[k], w), k

    def no_reads(*a, **k):
        raise AssertionError("the base and fine-tuned UNets were read despite a cached merge")

    monkeypatch.setattr(InstaFlowBackend, "_load_delta", staticmethod(no_reads))
    again = InstaFlowBackend(tiny_instaflow_path, **kw)  # from the cache: no base / fine-tune read
    assert all(torch.equal(w, first.unet.state_dict()[k]) for k, w in again.unet.state_dict().items())
    with pytest.raises(AssertionError, match="were read"):  # another α is another merge
        InstaFlowBackend(tiny_instaflow_path, **{**kw, "unet_delta": {**spec, "alpha": 0.5}})
    monkeypatch.undo()
    # a rebuilt fine-tune (new files) is a new key, never the stale merge
    tiny_unet(seed=5).save_pretrained(str(tmp_path / "fine" / "unet"))
    new = InstaFlowBackend(tiny_instaflow_path, **kw)
    s5 = tiny_unet(seed=5).state_dict()
    assert torch.equal(new.unet.conv_in.weight, inst["conv_in.weight"] + (s5["conv_in.weight"] - sb["conv_in.weight"]))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # True = $RFDS_CACHE_DIR/merged-unets; False writes nothing; a bad value names what is allowed
    monkeypatch.setenv("RFDS_CACHE_DIR", str(tmp_path / "default"))
    InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", unet_delta=spec, merge_cache=False)
    assert not (tmp_path / "default").exists()
    InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32", unet_delta=spec)
    assert len(list((tmp_path / "default" / "merged-unets").glob("*.safetensors"))) == 1
    with pytest.raises(ValueError, match="merge_cache must be true, false or a folder path, got 3"):
        InstaFlowBackend(tiny_instaflow_path, device="cpu", unet_delta=spec, merge_cache=3)
