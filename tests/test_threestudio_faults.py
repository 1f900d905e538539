"""Faults in the threestudio extension (THREESTUDIO_ROOT), issue 11: the prompt cache follows
the text-encoder weights as the core cache does, and the guidance's non-finite policy."""
import shutil

import pytest
import torch

from ts_support import camera_batch

pytestmark = [pytest.mark.threestudio, pytest.mark.usefixtures("workdir")]


def _prompts(ts, path, **kw):
    cfg = {"pretrained_model_name_or_path": path, "prompt": "a cat", "spawn": False, "use_t5": False,
           "max_sequence_length": 8, "encode_dtype": "fp32", **kw}
    return ts.find("rfds-sd3-prompt-processor")(cfg)


def test_prompt_cache_follows_the_text_encoder_weights(ts, tiny_sd3_path, tmp_path):
    from safetensors.torch import load_file, save_file

    model = str(tmp_path / "model")
    shutil.copytree(tiny_sd3_path, model)
    first = _prompts(ts, model)
    before = first().text_embeddings.clone()
    weights = f"{model}/text_encoder/model.safetensors"
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights)
    second = _prompts(ts, model)
    assert second._cache_dir != first._cache_dir  # keyed on the weights' fingerprint
    assert not torch.allclose(second().text_embeddings, before)  # re-encoded, not served from the old files


@pytest.fixture(scope="module")
def setup(ts, workdir, tiny_sd3_path):
    torch.manual_seed(0)
    batch = camera_batch(ts, {"batch_size": 2, "width": 32, "height": 32, "elevation_range": [-10, 80],
                              "camera_perturb": 0.0, "center_perturb": 0.0, "up_perturb": 0.0})
    return _prompts(ts, tiny_sd3_path)(), batch


def _guidance(ts, path, **kw):
    return ts.find("rfds-sd3-guidance")({"pretrained_model_name_or_path": path, "seed": 0, "dtype": "fp32", **kw})


def test_guidance_nonfinite_policy(ts, tiny_sd3_path, setup):
    from threestudio_rfds.checks import NonFiniteError

    utils, batch = setup
    with pytest.raises(ValueError, match=r"nonfinite must be one of \['error', 'zero'\], got 'skip'"):
        _guidance(ts, tiny_sd3_path, nonfinite="skip")
    with pytest.raises(ValueError, match=r"grad_clip must be a finite number > 0, got nan"):
        _guidance(ts, tiny_sd3_path, grad_clip=float("nan"))
    g = _guidance(ts, tiny_sd3_path)
    rgb = torch.rand(2, 32, 32, 3)
    real = g.backend.velocity
    g.backend.velocity = lambda *a, **k: real(*a, **k) * float("nan")
    with pytest.raises(NonFiniteError, match=r"v̂ \(the model's CFG velocity\) contains \d+ non-finite"):
        g(rgb, utils, **batch)
    g.cfg.nonfinite = "zero"  # the opt-in recovery: replaced by 0, counted in the logged num_nonfinite
    out = g(rgb, utils, **batch)
    assert float(out["num_nonfinite"]) > 0 and torch.isfinite(out["loss_rfds"])
