"""rfds-flux-guidance / rfds-rev-flux-guidance and rfds-flux-prompt-processor against real threestudio
(THREESTUDIO_ROOT), on the tiny FLUX.1 [dev] / [schnell]: T5 length per variant, the guidance modes and
their schedules reaching the backend, a step at two resolutions (two shifts), Perp-Neg, and the one-line
refusals before any weights load."""
import pytest
import torch

from ts_support import camera_batch, render_stand_in

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("workdir")]

DATA = {"batch_size": 2, "width": 32, "height": 32, "camera_perturb": 0.0, "center_perturb": 0.0, "up_perturb": 0.0}


def flux_prompts(ts, path, **kw):
    cfg = {"pretrained_model_name_or_path": path, "prompt": "a cat", "negative_prompt": "blurry", "spawn": False,
           "encode_dtype": "fp32", **kw}
    return ts.find("rfds-flux-prompt-processor")(cfg)()


def guidance(ts, path, kind="rfds-flux-guidance", **kw):
    return ts.find(kind)({"pretrained_model_name_or_path": path, "seed": 0, "dtype": "fp32", **kw})


@pytest.mark.parametrize("variant,length", [("dev", 512), ("schnell", 256)])
def test_prompt_processor_t5_length_and_pooled(ts, tiny_flux_paths, variant, length):
    pu = flux_prompts(ts, tiny_flux_paths[variant])
    ele, azi, dist = torch.zeros(2), torch.tensor([0.0, 180.0]), torch.ones(2)
    assert pu.get_text_embeddings(ele, azi, dist).shape == (4, length, 48)  # [cond; uncond], T5 width
    assert pu.get_pooled_embeddings(ele, azi, dist).shape == (4, 24)  # CLIP-L pooled
    assert flux_prompts(ts, tiny_flux_paths[variant], max_sequence_length=16).get_text_embeddings(
        ele, azi, dist).shape[1] == 16


@pytest.mark.parametrize("kind", ["rfds-flux-guidance", "rfds-rev-flux-guidance"])
def test_modes_and_schedules_reach_the_backend(ts, tiny_flux_paths, kind):
    g = guidance(ts, tiny_flux_paths["dev"], kind, guidance_mode="distilled+cfg",
                 distilled_guidance=[0, 2.0, 4.0, 1000], guidance_scale=[0, 10.0, 30.0, 1000])
    assert g.backend.embedded_guidance == 2.0 and g.cfg_scale() == 10.0
    g.do_update_step(0, 500)  # what BaseSystem.on_train_batch_start does
    assert g.backend.embedded_guidance == pytest.approx(3.0) and g.cfg_scale() == pytest.approx(20.0)
    distilled = guidance(ts, tiny_flux_paths["dev"], kind, guidance_mode="distilled", distilled_guidance=5.0)
    assert (distilled.backend.embedded_guidance, distilled.cfg_scale(), distilled.guidance_scale) == (5.0, 1.0, 100.0)


@pytest.mark.parametrize("variant,mode", [("dev", "distilled+cfg"), ("schnell", "cfg")])
def test_step_at_two_resolutions_and_with_perp_neg(ts, tiny_flux_paths, variant, mode):
    path = tiny_flux_paths[variant]
    g = guidance(ts, path, guidance_mode=mode, guidance_scale=7.5)
    for perp_neg in (False, True):
        pu = flux_prompts(ts, path, use_perp_neg=perp_neg)
        for size in (32, 64):  # latents 16² and 32²: [dev] draws t with two different shifts
            batch = camera_batch(ts, {**DATA, "width": size, "height": size})
            logits = render_stand_in(batch)
            out = g(torch.sigmoid(logits), pu, **batch)
            out["loss_rfds"].backward()
            assert torch.isfinite(out["loss_rfds"]) and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("variant,kw,match", [
    ("dev", {"guidance_mode": "cfg-distilled"}, r"guidance_mode must be one of"),
    ("schnell", {"guidance_mode": "cfg", "distilled_guidance": 3.5}, r"distilled_guidance=3.5: .*\[schnell\]"),
    ("schnell", {"guidance_mode": "distilled"}, r"needs a guidance embedding"),
    ("dev", {"quantization": "nf4"}, r"quantization 'nf4'"),
    ("dev", {"dtype": "fp16"}, r"overflows in fp16.*'bf16'"),
    ("dev", {"time_convention": "reference"}, r"time_convention must be one of \['model'\]"),
])
def test_bad_options_fail_before_weights(ts, tiny_flux_paths, monkeypatch, variant, kw, match):
    from diffusers import FluxTransformer2DModel

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the bad option was refused")

    monkeypatch.setattr(FluxTransformer2DModel, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=match) as e:
        guidance(ts, tiny_flux_paths[variant], **{"dtype": "fp32", **kw})
    assert "\n" not in str(e.value)


def test_sd3_prompts_are_refused_by_the_flux_guidance(ts, tiny_flux_paths, tiny_sd3_path):
    sd3 = ts.find("rfds-sd3-prompt-processor")({"pretrained_model_name_or_path": tiny_sd3_path, "prompt": "a cat",
                                                "spawn": False, "encode_dtype": "fp32"})()
    g = guidance(ts, tiny_flux_paths["schnell"])
    batch = camera_batch(ts, DATA)
    with pytest.raises(ValueError, match=r"cond\['(pooled_)?prompt_embeds'\] must be"):
        g(torch.rand(2, 32, 32, 3), sd3, **batch)
