"""The guidance types and the SD3 prompt processor against real threestudio (THREESTUDIO_ROOT),
on the tiny models: view-dependent and Perp-Neg prompts, pooled embeddings on both paths,
guidance_eval with threestudio's guidance_evaluation_save, latents and normal-map inputs,
schedules, RFDS-Rev, device fallback and bad input."""

import dataclasses

import pytest
import torch

from ts_support import camera_batch, render_stand_in

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("workdir")]

DATA = {"batch_size": 4, "width": 32, "height": 32, "elevation_range": [-10, 80], "camera_perturb": 0.0,
        "center_perturb": 0.0, "up_perturb": 0.0}


def sd3_prompts(ts, path, **kw):
    cfg = {"pretrained_model_name_or_path": path, "prompt": "a cat", "negative_prompt": "blurry", "spawn": False,
           "encode_dtype": "fp32", **kw}
    return ts.find("rfds-sd3-prompt-processor")(cfg)()


def guidance(ts, kind, path, **kw):
    extra = {"latent_size": [64, 64]} if "instaflow" in kind else {}
    return ts.find(kind)({"pretrained_model_name_or_path": path, "seed": 0, "dtype": "fp32", **extra, **kw})


@pytest.fixture(scope="module")
def sd3_utils(ts, workdir, tiny_sd3_path):
    return sd3_prompts(ts, tiny_sd3_path)


@pytest.fixture(scope="module")
def sd3_rfds(ts, tiny_sd3_path):
    return guidance(ts, "rfds-sd3-guidance", tiny_sd3_path)


@pytest.fixture(scope="module")
def batch(ts):
    torch.manual_seed(0)
    return camera_batch(ts, DATA)


def views(b=4):
    """Cameras in each of threestudio's directions: front, side, back, overhead."""
    return torch.tensor([0.0, 10.0, 5.0, 75.0])[:b], torch.tensor([0.0, 90.0, 180.0, 30.0])[:b], torch.full((b,), 1.2)


# ---------------------------------------------------------------- SD3 prompt processor output
def test_pooled_embeddings_view_dependent_and_independent(sd3_utils, tiny_sd3_path):
    from threestudio_rfds.text import encode_prompts

    ele, azi, dist = views()
    pu = sd3_utils
    seq = pu.get_text_embeddings(ele, azi, dist, view_dependent_prompting=True)
    pooled = pu.get_pooled_embeddings(ele, azi, dist, view_dependent_prompting=True)
    pooled_vi = pu.get_pooled_embeddings(ele, azi, dist, view_dependent_prompting=False)
    assert seq.shape == (8, 77 + 256, 48)
    assert pooled.shape == (8, 40) and pooled_vi.shape == (8, 40)  # not [2B, 1, P] as the reference's
    ref = encode_prompts("sd3", tiny_sd3_path, ["a cat, front view", "a cat, side view", "a cat, back view",
                                                "a cat, overhead view", "a cat", "blurry"], device="cpu", dtype="fp32")
    ref = {k: v.to(pooled.device) for k, v in ref.items()}
    for i in range(4):  # front, side, back, overhead
        assert torch.allclose(pooled[i], ref["pooled_prompt_embeds"][i], atol=1e-4)
        assert torch.allclose(seq[i], ref["prompt_embeds"][i], atol=1e-4)
        assert torch.allclose(pooled[4 + i], ref["pooled_prompt_embeds"][5], atol=1e-4)
        assert torch.allclose(pooled_vi[i], ref["pooled_prompt_embeds"][4], atol=1e-4)
    assert pu.direction_index(ele, azi, dist).tolist() == [pu.direction2idx[d] for d in ("front", "side", "back", "overhead")]


def test_pooled_embeddings_perp_neg(ts, workdir, tiny_sd3_path):
    pu = sd3_prompts(ts, tiny_sd3_path, use_perp_neg=True)
    ele, azi, dist = views()
    emb, w = pu.get_text_embeddings_perp_neg(ele, azi, dist)
    pooled, w2 = pu.get_pooled_embeddings_perp_neg(ele, azi, dist)
    assert emb.shape[:1] == (16,) and pooled.shape == (16, 40) and torch.equal(w, w2) and w.shape == (4, 2)
    side, front = pu.pooled_embeddings_vd[pu.direction2idx["side"]], pu.pooled_embeddings_vd[pu.direction2idx["front"]]
    r = 1 - 90.0 / 90  # camera 1 at azimuth 90: pure side view
    assert torch.allclose(pooled[1], r * front + (1 - r) * side, atol=1e-6)
    assert torch.allclose(pooled[0], front, atol=1e-6)  # azimuth 0: pure front
    assert torch.allclose(pooled[8:10], torch.stack([front, side]), atol=1e-6)  # negatives of camera 0


# ---------------------------------------------------------------- the guidance call
@pytest.mark.parametrize("kind", ["rfds-sd3-guidance", "rfds-rev-sd3-guidance"])
@pytest.mark.parametrize("perp_neg", [False, True])
def test_sd3_guidance_views_and_perp_neg(ts, workdir, tiny_sd3_path, batch, kind, perp_neg):
    pu = sd3_prompts(ts, tiny_sd3_path, use_perp_neg=perp_neg)
    g = guidance(ts, kind, tiny_sd3_path, cfg_mode="sequential" if perp_neg else "batched")
    logits = render_stand_in(batch)
    out = g(torch.sigmoid(logits), pu, **batch, rgb_as_latents=False)
    out["loss_rfds"].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad.abs().flatten(1).sum(1) > 0).all()
    assert 0.0 <= out["t_min"] <= out["t_mean"] <= out["t_max"] <= 1.0


def test_view_dependent_prompting_changes_the_gradient(ts, workdir, tiny_sd3_path, sd3_utils, batch):
    grads = []
    for vd in (True, False):
        g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, view_dependent_prompting=vd, encode_mode="mean")
        rgb = torch.full((4, 32, 32, 3), 0.5, requires_grad=True)
        g(rgb, sd3_utils, **batch)["loss_rfds"].backward()
        grads.append(rgb.grad)
    assert not torch.allclose(grads[0], grads[1])


def test_same_seed_same_loss_and_rev_with_no_inner_step_is_rfds(ts, tiny_sd3_path, sd3_utils, batch):
    rgb = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    kw = dict(encode_mode="mean", weighting="sigmoid")
    a = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, **kw)(rgb, sd3_utils, **batch)
    b = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, **kw)(rgb, sd3_utils, **batch)
    r0 = guidance(ts, "rfds-rev-sd3-guidance", tiny_sd3_path, n_inner_steps=0, **kw)(rgb, sd3_utils, **batch)
    r1 = guidance(ts, "rfds-rev-sd3-guidance", tiny_sd3_path, n_inner_steps=1, **kw)(rgb, sd3_utils, **batch)
    assert torch.allclose(a["loss_rfds"], b["loss_rfds"], rtol=1e-6)
    assert torch.allclose(a["loss_rfds"], r0["loss_rfds"], rtol=1e-5)
    assert not torch.allclose(a["loss_rfds"], r1["loss_rfds"], rtol=1e-3)


def test_batch_scaling_reference_is_the_papers_one_over_b(ts, tiny_sd3_path, sd3_utils, batch):
    """batch_scaling: reference → the paper code's gradient, 1/B of ours at w = 1 (B = 4)."""
    rgb0 = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    grads = {}
    for scaling in ("per-sample", "reference"):
        rgb = rgb0.clone().requires_grad_(True)
        g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, encode_mode="mean", weighting="none",
                     batch_scaling=scaling)
        g(rgb, sd3_utils, **batch)["loss_rfds"].backward()
        grads[scaling] = rgb.grad
    torch.testing.assert_close(grads["reference"], grads["per-sample"] / 4)
    with pytest.raises(ValueError, match="batch_scaling must be one of.*got 'paper'"):
        guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, batch_scaling="paper")


@pytest.mark.parametrize("kind", ["rfds-instaflow-guidance", "rfds-rev-instaflow-guidance"])
@pytest.mark.parametrize("perp_neg", [False, True])
def test_instaflow_guidance_with_threestudio_prompt_utils(ts, workdir, tiny_instaflow_path, batch, kind, perp_neg):
    cfg = {"pretrained_model_name_or_path": tiny_instaflow_path, "prompt": "a dog", "spawn": False, "use_perp_neg": perp_neg}
    pu = ts.find("rfds-instaflow-prompt-processor")(cfg)()
    from threestudio.models.prompt_processors.base import PromptProcessorOutput

    assert isinstance(pu, PromptProcessorOutput) and not pu.has_pooled and pu.text_embeddings.shape == (1, 77, 32)
    g = guidance(ts, kind, tiny_instaflow_path)
    logits = render_stand_in(batch)
    out = g(torch.sigmoid(logits), pu, **batch)
    out["loss_rfds"].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad.abs().flatten(1).sum(1) > 0).all()


def test_guidance_eval_feeds_threestudios_saver(ts, tiny_sd3_path, sd3_utils, batch, tmp_path):
    from threestudio.systems.base import BaseLift3DSystem
    from threestudio.utils.saving import SaverMixin

    g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, max_items_eval=3, eval_num_steps=4)
    rgb = torch.rand(4, 32, 32, 3, requires_grad=True)
    out = g(rgb, sd3_utils, **batch, guidance_eval=True)
    ev = out["eval"]
    assert ev["bs"] == 3 and len(ev["noise_levels"]) == 3 and len(ev["texts"]) == 3
    for k in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert ev[k].shape == (3, 32, 32, 3) and torch.isfinite(ev[k]).all()
    out["loss_rfds"].backward()  # eval does not break the graph
    assert rgb.grad.abs().sum() > 0

    class Host(SaverMixin):  # the two members guidance_evaluation_save uses
        true_global_step = 7

    host = Host()
    host.set_save_dir(str(tmp_path))
    BaseLift3DSystem.guidance_evaluation_save(host, rgb.detach()[: ev["bs"]], ev)
    assert (tmp_path / "it7-train.png").stat().st_size > 0


def test_rgb_as_latents_checks_channels(ts, tiny_sd3_path, tiny_instaflow_path, sd3_utils, batch):
    g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path)
    lat = torch.randn(4, 16, 16, 16, requires_grad=True)
    g(lat, sd3_utils, **batch, rgb_as_latents=True)["loss_rfds"].backward()
    assert lat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs 16 latent channels for sd3, got 4"):
        g(torch.randn(4, 16, 16, 4), sd3_utils, **batch, rgb_as_latents=True)
    gi = guidance(ts, "rfds-instaflow-guidance", tiny_instaflow_path)
    assert gi.get_latents(torch.randn(2, 16, 16, 4), rgb_as_latents=True).shape == (2, 4, 8, 8)  # resized to 64/8
    with pytest.raises(ValueError, match="needs 4 latent channels for instaflow, got 16"):
        gi.get_latents(torch.randn(2, 8, 8, 16), rgb_as_latents=True)
    with pytest.raises(ValueError, match="3 channels"):
        g(torch.rand(4, 32, 32, 4), sd3_utils, **batch)


def test_normal_map_input(ts, tiny_sd3_path, sd3_utils, batch):
    g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path)
    normal = torch.nn.functional.normalize(torch.randn(4, 32, 32, 3), dim=-1).requires_grad_(True)
    comp_normal = (normal + 1) / 2  # as threestudio renders normals in [0, 1]
    g(comp_normal, sd3_utils, **batch)["loss_rfds"].backward()
    assert torch.isfinite(normal.grad).all() and normal.grad.abs().sum() > 0


def test_update_step_applies_schedules(ts, tiny_sd3_path, sd3_utils, batch):
    g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, guidance_scale=[0, 100.0, 10.0, 100],
                 min_step_percent=[0, 0.02, 0.5, 100], max_step_percent=0.9, grad_clip=[0, 1e-3, 1.0, 100])
    rgb = torch.rand(4, 32, 32, 3)
    for step, (w, lo, clip) in {0: (100.0, 0.02, 1e-3), 50: (55.0, 0.26, 0.5005), 200: (10.0, 0.5, 1.0)}.items():
        g.do_update_step(0, step)
        assert (g.guidance_scale, g.min_step_percent, g.grad_clip_val) == pytest.approx((w, lo, clip))
        assert (g.min_step, g.max_step) == (int(1000 * lo), 900)
    g.do_update_step(0, 0)
    out = g(rgb, sd3_utils, **batch)
    numel = 4 * 16 * 16 * 16
    assert out["grad_norm"] <= 1e-3 * numel ** 0.5 * (1 + 1e-5)  # clipped element-wise to 1e-3
    # loss_rfds logs the weighted flow-matching loss (unclipped, docs/math.md §3.1); the clip acts on
    # the gradient that reaches the latents: |∂L/∂z| <= 2·1e-3/(n·B)
    assert out["loss_rfds"] > 1e-3
    z = torch.randn(4, 32, 32, 16, requires_grad=True)
    g(z, sd3_utils, rgb_as_latents=True, **batch)["loss_rfds"].backward()
    assert 0 < z.grad.abs().max() <= 2 * 1e-3 / (z[0].numel() * 4) * (1 + 1e-3)  # x − sg(x − g): float rounding


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_fallback_where_threestudio_says_cuda(ts, sd3_rfds):
    from threestudio.utils.misc import get_device

    assert get_device().type == "cuda"  # threestudio's own answer
    assert sd3_rfds.device.type == "cpu" and sd3_rfds.backend.device.type == "cpu"


def test_guidance_weights_stay_out_of_the_state_dict(sd3_rfds):
    assert not [k for k in sd3_rfds.state_dict() if "transformer" in k or "vae" in k]


def test_bad_config_and_inputs(ts, tiny_sd3_path, tiny_instaflow_path, batch):
    with pytest.raises(ValueError, match="weighting must be one of"):
        guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, weighting="bogus")
    with pytest.raises(ValueError, match="cfg_mode must be one of"):
        guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, cfg_mode="parallel")
    with pytest.raises(ValueError, match="time_convention"):
        guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, time_convention="paper")
    with pytest.raises(ValueError, match="n_inner_steps must be an integer >= 0, got -1"):
        guidance(ts, "rfds-rev-sd3-guidance", tiny_sd3_path, n_inner_steps=-1)
    with pytest.raises(ValueError, match="inner_step_size must be 'auto' or a number > 0"):
        guidance(ts, "rfds-rev-sd3-guidance", tiny_sd3_path, inner_step_size=0.0)
    g = guidance(ts, "rfds-rev-sd3-guidance", tiny_sd3_path)
    cfg = {"pretrained_model_name_or_path": tiny_instaflow_path, "prompt": "a dog", "spawn": False}
    clip_utils = ts.find("rfds-instaflow-prompt-processor")(cfg)()
    with pytest.raises(ValueError, match="rfds-sd3-prompt-processor"):
        g(torch.rand(4, 32, 32, 3), clip_utils, **batch)
    with pytest.raises(ValueError, match="min_step_percent"):
        g.set_min_max_steps(0.8, 0.2)
    with pytest.raises(ValueError, match=r"elevation must have shape \[B\] = \[2\]"):
        g(torch.rand(2, 32, 32, 3), clip_utils, **batch)


def test_reference_aliases_use_reference_semantics(ts, tiny_sd3_path, tiny_instaflow_path, sd3_utils, batch):
    g = guidance(ts, "RFDS-sd3", tiny_sd3_path, min_step_percent=0.3, max_step_percent=0.98)
    assert g.backend.convention.reversed_percent  # percents index the descending sigma table
    t = g.backend.convention.sample_time(4000, 0.3, 0.98)
    from threestudio_rfds import flow

    lo, hi = flow.shift_time(torch.tensor([0.02, 0.70]), 3.0)
    assert lo - 1e-5 <= t.min() and t.max() <= hi + 1e-5
    rev = guidance(ts, "RFDS-Rev", tiny_instaflow_path, latent_size=[64, 64], unet_delta=None, vae_path=None)
    assert rev.backend.convention.reversed_timestep
    cfg = {"pretrained_model_name_or_path": tiny_instaflow_path, "prompt": "a dog", "spawn": False}
    out = rev(torch.rand(4, 32, 32, 3), ts.find("rfds-instaflow-prompt-processor")(cfg)(), **batch)
    assert "loss_rfds_rev" in out  # the reference's configs weight it by lambda_rfds_rev


@pytest.mark.parametrize("alias", ["RFDS", "RFDS-Rev"])
def test_instaflow_aliases_use_the_papers_prior(ts, tiny_instaflow_path, tmp_path, alias):
    """The paper's InstaFlow guidances merge (Lykon/absolute-reality-1.81 − SD1.5) into the UNet and use
    that model's VAE: the aliases default to it (here pointed at tiny saved "SD1.5" / "fine-tune"
    folders), cache the merge, and ``unet_delta: null, vae_path: null`` gives plain InstaFlow."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from test_instaflow_backend import _delta_folders
    from threestudio_rfds.backends.instaflow import REFERENCE_DELTA

    cls = ts.find(alias)
    defaults = cls.Config()
    assert defaults.unet_delta == REFERENCE_DELTA == {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                      "finetuned": "Lykon/absolute-reality-1.81"}
    assert defaults.vae_path == "Lykon/absolute-reality-1.81" and defaults.merge_cache is True
    spec = _delta_folders(tmp_path)
    g = guidance(ts, alias, tiny_instaflow_path, unet_delta=spec, vae_path=spec["finetuned"],
                 merge_cache=str(tmp_path / "cache"))
    load = lambda cls_, path, sub: cls_.from_pretrained(path, subfolder=sub).state_dict()  # noqa: E731
    inst, base, fine = (load(UNet2DConditionModel, p, "unet") for p in (tiny_instaflow_path, spec["base"], spec["finetuned"]))
    for k, w in g.backend.unet.state_dict().items():
        assert torch.equal(w, inst[k] + (fine[k] - base[k])), k
    assert not torch.equal(g.backend.unet.conv_in.weight, inst["conv_in.weight"])
    fine_vae = load(AutoencoderKL, spec["finetuned"], "vae")
    assert all(torch.equal(w, fine_vae[k]) for k, w in g.backend.vae.state_dict().items())
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    plain = guidance(ts, alias, tiny_instaflow_path, unet_delta=None, vae_path=None)
    assert all(torch.equal(w, inst[k]) for k, w in plain.backend.unet.state_dict().items())


@pytest.mark.parametrize("kind", ["rfds-sd3-guidance", "rfds-rev-instaflow-guidance"])
def test_sample_for_visualisation(ts, workdir, tiny_sd3_path, tiny_instaflow_path, sd3_utils, batch, kind):
    if "instaflow" in kind:
        cfg = {"pretrained_model_name_or_path": tiny_instaflow_path, "prompt": "a dog", "spawn": False}
        pu, g = ts.find("rfds-instaflow-prompt-processor")(cfg)(), guidance(ts, kind, tiny_instaflow_path)
        size = 64  # latent_size under the resize rule
    else:
        pu, g, size = sd3_utils, guidance(ts, kind, tiny_sd3_path, sample_num_steps=3, sample_guidance_scale=5.0), 32
    a = g.sample(pu, **batch, seed=3)
    b = g.sample(pu, **batch, seed=3)
    c = g.sample(pu, **batch, seed=4)
    assert a.shape == (4, size, size, 3) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a, b) and not torch.allclose(a, c)


def test_compile_flag_and_backend_options(ts, tiny_sd3_path, tiny_instaflow_path):
    for kind, path in (("rfds-sd3-guidance", tiny_sd3_path), ("rfds-instaflow-guidance", tiny_instaflow_path)):
        g = guidance(ts, kind, path, compile=True)  # compiles lazily, on the first call
        denoiser = getattr(g.backend, "transformer", None) or g.backend.unet
        assert denoiser._compiled_call_impl is not None  # nn.Module.compile() in place
    with pytest.raises(ValueError, match="compile must be one of"):
        guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, compile="reduce-overhead")
    with pytest.raises(TypeError, match="no_such_option"):
        guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, backend_options={"no_such_option": 1})
    g = guidance(ts, "rfds-sd3-guidance", tiny_sd3_path, backend_options={"encode_mode": "mean"})
    assert g.backend.encode_mode == "mean"


# ---------------------------------------------------------------- host syncs (issue: performance)
def test_sync_free_text_embeddings_equal_threestudios(ts, workdir, sd3_utils, tiny_instaflow_path):
    """Our view-direction lookup (torch.where) and batched Perp-Neg return what threestudio's
    boolean-mask and per-camera loops return, for cameras on and near every boundary."""
    from threestudio.models.prompt_processors.base import PromptProcessorOutput

    clip = ts.find("rfds-instaflow-prompt-processor")(
        {"pretrained_model_name_or_path": tiny_instaflow_path, "prompt": "a dog", "spawn": False})()
    ele = torch.tensor([0.0, 10.0, 59.9, 60.0, 61.0, 30.0, -5.0, 20.0, 0.0, 0.0])
    azi = torch.tensor([0.0, 44.9, 45.0, 45.1, 135.0, 134.9, 180.0, -135.1, -45.0, -90.0])
    dist = torch.full_like(ele, 1.5)
    for pu in (sd3_utils, clip):
        for vd in (True, False):
            ours = pu.get_text_embeddings(ele, azi, dist, vd)
            theirs = PromptProcessorOutput.get_text_embeddings(pu, ele, azi, dist, vd)
            assert torch.equal(ours, theirs)
        ours, ours_w = pu.get_text_embeddings_perp_neg(ele, azi, dist)
        theirs, theirs_w = PromptProcessorOutput.get_text_embeddings_perp_neg(pu, ele, azi, dist)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours_w, theirs_w, rtol=0, atol=1e-6)
    assert len(set(sd3_utils.direction_index(ele, azi, dist).tolist())) == 4  # every direction was hit
    # the pooled twin: threestudio's rule applied to the pooled embeddings as one-token sequences
    as_seq = dataclasses.replace(sd3_utils, text_embeddings_vd=sd3_utils.pooled_embeddings_vd[:, None],
                                 uncond_text_embeddings_vd=sd3_utils.uncond_pooled_embeddings_vd[:, None])
    theirs, theirs_w = PromptProcessorOutput.get_text_embeddings_perp_neg(as_seq, ele, azi, dist)
    ours, ours_w = sd3_utils.get_pooled_embeddings_perp_neg(ele, azi, dist)
    torch.testing.assert_close(ours, theirs[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_w, theirs_w, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="Perp-Neg needs view_dependent_prompting=True"):
        sd3_utils.get_text_embeddings_perp_neg(ele, azi, dist, view_dependent_prompting=False)


@pytest.mark.parametrize("kind", ["rfds-sd3-guidance", "rfds-rev-sd3-guidance", "rfds-instaflow-guidance",
                                  "rfds-rev-instaflow-guidance"])
@pytest.mark.parametrize("perp_neg", [False, True])
def test_guidance_call_has_one_deferred_host_sync(ts, workdir, tiny_sd3_path, tiny_instaflow_path, batch, kind,
                                                  perp_neg):
    """The whole guidance call with view-dependent prompts (and Perp-Neg), backward included,
    queues its work without a host sync but the deferred finiteness check of x0
    (tests/sync_recorder.py)."""
    from sync_recorder import SyncRecorder

    if "instaflow" in kind:
        pu = ts.find("rfds-instaflow-prompt-processor")({"pretrained_model_name_or_path": tiny_instaflow_path,
                                                         "prompt": "a dog", "spawn": False, "use_perp_neg": perp_neg})()
        g = guidance(ts, kind, tiny_instaflow_path)
    else:
        pu, g = sd3_prompts(ts, tiny_sd3_path, use_perp_neg=perp_neg), guidance(ts, kind, tiny_sd3_path)
    logits = render_stand_in(batch)
    with SyncRecorder() as rec:
        out = g(torch.sigmoid(logits), pu, **batch)
        out["loss_rfds"].backward()
    assert [(n, w.split(":")[0]) for n, w in rec.calls] == [("__bool__", "checks.py")], rec.calls
