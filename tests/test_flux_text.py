"""FLUX.1 prompt embeddings == FluxPipeline.encode_prompt on the tiny [dev] / [schnell], their default
T5 lengths (512 / 256 as diffusers uses), the fingerprinted embedding cache, and bad input."""
import gc

import pytest
import torch

from threestudio_rfds.text import encode_prompts
from threestudio_rfds.text.flux import encode_flux_prompts

from tiny_flux import CLIP_DIM
from tiny_sd3 import T5_DIM

PROMPTS = ["a photo of a cat", "the red dog on a blue cat", ""]


@pytest.mark.parametrize("variant,default_length", [("dev", 512), ("schnell", 256)])
def test_matches_pipeline_encode_prompt(tiny_flux_paths, variant, default_length):
    from diffusers import FluxPipeline

    path = tiny_flux_paths[variant]
    ours = encode_flux_prompts(path, PROMPTS, device="cpu", dtype="fp32")
    pipe = FluxPipeline.from_pretrained(path)
    pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=default_length)
    assert ours["prompt_embeds"].shape == (3, default_length, T5_DIM) and ours["pooled_prompt_embeds"].shape == (3, CLIP_DIM)
    torch.testing.assert_close(ours["prompt_embeds"], pe, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-5)
    assert text_ids.abs().max() == 0  # the pipeline's text ids are zeros; the backend makes them
    short = encode_flux_prompts(path, PROMPTS, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(short["prompt_embeds"], pipe.encode_prompt(PROMPTS, max_sequence_length=16)[0],
                               rtol=1e-5, atol=1e-5)


def test_cache_is_keyed_and_reused(tiny_flux_paths, tmp_path, monkeypatch):
    from threestudio_rfds.text import flux as text_flux

    calls = []
    real = text_flux.encode_flux_prompts
    monkeypatch.setattr(text_flux, "encode_flux_prompts", lambda p, prompts, **kw: calls.append(list(prompts)) or real(p, prompts, **kw))
    first = encode_prompts("flux", tiny_flux_paths["schnell"], PROMPTS, device="cpu", cache_dir=str(tmp_path))
    again = encode_prompts("flux", tiny_flux_paths["schnell"], PROMPTS, device="cpu", cache_dir=str(tmp_path))
    assert calls == [PROMPTS] and all(torch.equal(first[k], again[k]) for k in first)  # the second came from disk
    dev = encode_prompts("flux", tiny_flux_paths["dev"], PROMPTS[:1], device="cpu", cache_dir=str(tmp_path))
    assert dev["prompt_embeds"].shape[1] == 512 and len(calls) == 2  # another model: another key
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_encoders_are_released(tiny_flux_paths):
    from transformers import CLIPTextModel, T5EncoderModel

    def count():
        return sum(isinstance(o, (CLIPTextModel, T5EncoderModel)) for o in gc.get_objects())

    gc.collect()
    before = count()
    gc.disable()
    try:
        encode_flux_prompts(tiny_flux_paths["dev"], PROMPTS, device="cpu", max_sequence_length=8)
        assert count() == before
    finally:
        gc.enable()


def test_bad_input(tiny_flux_paths, tiny_sd3_path):
    path = tiny_flux_paths["dev"]
    with pytest.raises(ValueError, match="prompts must be"):
        encode_flux_prompts(path, [], device="cpu")
    with pytest.raises(ValueError, match=r"max_sequence_length must be an integer in \[1, 512\] or None"):
        encode_flux_prompts(path, "a cat", device="cpu", max_sequence_length=1024)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['use_t5'\]"):
        encode_prompts("flux", path, "a cat", use_t5=False)
    with pytest.raises(ValueError, match="holds a model of family 'sd3'"):  # an SD3 folder: its own family, named
        encode_flux_prompts(tiny_sd3_path, "a cat", device="cpu")
