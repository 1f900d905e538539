"""rfds-benchmark-step: the --tiny mode runs every case in-process on the CPU and prints JSON lines
(and a summary table on stderr); the full-size configs are the published model sizes (checked on the
meta device, no memory) and are refused on a CPU."""
import json

import pytest
import torch

from threestudio_rfds.backends.flux import FluxBackend
from threestudio_rfds.backends.instaflow import InstaFlowBackend
from threestudio_rfds.backends.sd3 import SD3Backend
from threestudio_rfds.steptime import guidance_step as gs

FIELDS = {"case", "algorithm", "model", "median_ms", "min_ms", "peak_mem_gib", "dtype", "device_name",
          "resolution", "steps"}


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_tiny_runs_all_cases(capsys):
    assert gs.main(["--tiny", "--steps", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr()
    recs = [json.loads(line) for line in out.out.splitlines()]  # stdout: JSON lines only
    assert [r["case"] for r in recs] == gs.CASES
    table = out.err.strip().splitlines()[-len(recs) - 1:]  # stderr: the human summary, one row per case
    assert table[0].split()[:3] == ["case", "model", "median"]
    for r, row in zip(recs, table[1:]):
        assert row.split()[:3] == [r["case"], r["model"], f"{r['median_ms']:.1f}"]
    for r in recs:
        assert FIELDS <= set(r)
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert all(r[f"{phase}_ms"] > 0 for phase in gs.PHASES)  # encode / flow / backward breakdown
        assert sum(r[f"{phase}_ms"] for phase in gs.PHASES) <= 2 * r["median_ms"]
        assert r["peak_mem_gib"] is None and r["device_name"] == "cpu" and r["dtype"] == "float32"
        assert r["resolution"] == 64 and r["steps"] == 2 and r["model"].startswith("tiny-")


def test_tiny_sequential_cfg_batch2(capsys):
    gs.main(["--tiny", "--cases", "sd3-rfds-rev", "--steps", "1", "--warmup", "0",
             "--cfg-mode", "sequential", "--batch", "2", "--resolution", "48"])
    (r,) = _lines(capsys)
    assert (r["case"], r["cfg_mode"], r["batch"], r["resolution"]) == ("sd3-rfds-rev", "sequential", 2, 48)


def test_speed_options_reach_both_backends(capsys):
    gs.main(["--tiny", "--cases", "sd3-rfds,instaflow-rfds", "--steps", "1", "--warmup", "0",
             "--vae-channels-last", "--vae-checkpointing", "--label", "lean"])
    recs = _lines(capsys)
    assert [r["case"] for r in recs] == ["sd3-rfds", "instaflow-rfds"]
    assert all(r["vae_channels_last"] and r["vae_checkpointing"] and r["label"] == "lean" for r in recs)


def test_compile_flags_compile_the_denoiser_and_the_vae_encoder(monkeypatch):
    built = []
    real_build = gs.build
    monkeypatch.setattr(gs, "build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    monkeypatch.setattr(gs, "run_case", lambda *a, **k: {})  # compiling on the CPU takes ~20 s: build only
    gs.run(gs.parse_args(["--tiny", "--cases", "sd3-rfds", "--compile", "--compile-vae", "max-autotune-no-cudagraphs"]))
    (backend, _, _), = built
    assert gs.denoiser(backend)._compiled_call_impl is not None
    assert backend.vae.encoder._compiled_call_impl is not None and backend.vae.decoder._compiled_call_impl is None


@pytest.mark.parametrize("model,cls", [("sd3", SD3Backend), ("flux", FluxBackend), ("instaflow", InstaFlowBackend)])
def test_build_wraps_real_backends(model, cls):
    backend, cond, uncond = gs.build(model, torch.device("cpu"), torch.float32, 64, tiny=True)
    assert isinstance(backend, cls) and set(cond) == set(uncond)
    rgb = torch.rand(1, 3, 64, 64, requires_grad=True)
    loss = gs.guidance_step(backend, "rfds", rgb, cond, uncond, 7.5, True)
    assert torch.isfinite(loss) and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in gs.denoiser(backend).parameters())


def test_full_configs_have_published_sizes():
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    def count(cls, cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in cls(**cfg).parameters())

    assert count(SD3Transformer2DModel, gs.SD3_MEDIUM) == 2_028_328_000  # SD3-medium MMDiT (2B)
    assert count(FluxTransformer2DModel, gs.FLUX_DEV) == 11_901_408_320  # FLUX.1 [dev] (12B)
    assert count(AutoencoderKL, gs.FLUX_VAE) == 83_819_683  # FLUX.1's 16-channel VAE
    assert count(UNet2DConditionModel, gs.SD15_UNET) == 859_520_964  # SD1.5 / InstaFlow UNet
    assert count(AutoencoderKL, gs.SD15_VAE) == 83_653_863  # SD1.5 VAE


def test_full_size_cases_are_refused_on_a_cpu_naming_tiny(capsys):
    """Without --tiny on a CPU the full-size models would take minutes and GBs before any output."""
    with pytest.raises(SystemExit):
        gs.parse_args(["--device", "cpu", "--cases", "sd3-rfds"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "--tiny" in err[-1] and "CPU" in err[-1]
    assert gs.parse_args(["--device", "cpu", "--tiny"]).tiny  # the tiny models are fine there


def test_bad_cases_rejected(capsys):
    with pytest.raises(SystemExit):
        gs.main(["--tiny", "--cases", "sd4-rfds"])
    assert "sd4-rfds" in capsys.readouterr().err


def test_warmup_resolutions_and_profile(capsys, tmp_path):
    prof = tmp_path / "profile.txt"
    gs.main(["--tiny", "--cases", "sd3-rfds-rev", "--steps", "1", "--warmup", "1", "--warmup-resolutions", "32",
             "--profile", str(prof), "--label", "w"])
    progress, r = _lines(capsys)  # a progress line after each early resolution, then the case
    assert progress == {"progress": "sd3-rfds-rev", "label": "w", "warmup_s": {"32": r["warmup_s"]["32"]}}
    assert set(r["warmup_s"]) == {"32", "64"} and all(v >= 0 for v in r["warmup_s"].values())
    text = prof.read_text()
    assert text.startswith("## sd3-rfds-rev w") and "Self CPU" in text


def test_fp8_is_reported_as_skipped_where_unavailable(capsys):
    gs.main(["--tiny", "--cases", "sd3-rfds", "--steps", "1", "--warmup", "0", "--fp8"])
    (r,) = _lines(capsys)  # the CPU: no float8 matmuls (torchao or not)
    assert r["model"] == "sd3-medium" and r["skipped"]


def test_flux_in_fp16_is_reported_as_skipped(capsys):
    gs.main(["--tiny", "--cases", "flux-rfds,sd3-rfds", "--steps", "1", "--warmup", "0", "--dtype", "fp16"])
    sd3, flux = sorted(_lines(capsys), key=lambda r: r["model"].endswith("flux-dev"))  # SD3 runs, FLUX does not
    assert sd3["case"] == "sd3-rfds" and flux == {"model": "flux-dev", "label": "", "skipped": flux["skipped"]}
    assert "bf16" in flux["skipped"]


def test_cuda_graphs_wraps_the_denoiser(monkeypatch):
    from threestudio_rfds.steptime.levers import GraphedDenoiser

    built = []
    real_build = gs.build
    monkeypatch.setattr(gs, "build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    monkeypatch.setattr(gs, "run_case", lambda *a, **k: {})
    gs.run(gs.parse_args(["--tiny", "--cases", "instaflow-rfds", "--cuda-graphs"]))
    (backend, _, _), = built
    assert isinstance(backend.unet, GraphedDenoiser) and backend.unet.config.in_channels == 4
    with pytest.raises(SystemExit):
        gs.parse_args(["--tiny", "--cuda-graphs", "--compile"])
