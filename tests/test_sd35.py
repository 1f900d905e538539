"""SD3.5 (medium: MMDiT-X with dual attention layers and RMS qk-norm) loads through SD3Backend:
the tiny SD3 folder with its transformer replaced by an SD3.5-style one of the same widths."""
import shutil

import torch

from threestudio_rfds.backends.sd3 import SD3Backend
from threestudio_rfds.rfds import rfds_rev
from threestudio_rfds.text import encode_prompt_pair


def test_sd35_architecture_runs_rfds(tiny_sd3_path, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder = tmp_path / "tiny-sd35"
    shutil.copytree(tiny_sd3_path, folder)
    cfg = dict(SD3Transformer2DModel.load_config(tiny_sd3_path, subfolder="transformer"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(0)
    sd35 = SD3Transformer2DModel(**{**cfg, "qk_norm": "rms_norm", "dual_attention_layers": (0,)})
    shutil.rmtree(folder / "transformer")
    sd35.save_pretrained(folder / "transformer")

    backend = SD3Backend(str(folder), device="cpu")
    assert tuple(backend.transformer.config.dual_attention_layers) == (0,)
    cond, uncond = encode_prompt_pair("sd3", str(folder), "a hamburger", device="cpu")
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = rfds_rev(backend, backend.encode(rgb), cond, uncond, guidance_scale=4.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and rgb.grad.abs().sum() > 0
