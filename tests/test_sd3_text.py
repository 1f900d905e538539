"""SD3 prompt embeddings == StableDiffusion3Pipeline.encode_prompt on the tiny SD3."""
import gc

import pytest
import torch

from threestudio_rfds.text import encode_prompt_pair, encode_prompts
from threestudio_rfds.text.sd3 import encode_sd3_prompts

from tiny_sd3 import CLIP_DIMS, T5_DIM

PROMPTS = ["a photo of a cat", "the red dog on a blue cat"]


@pytest.fixture(scope="module")
def pipe(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)


def _reference(pipe, prompts, **kw):
    pe, npe, pp, npp = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"), **kw)
    return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}, {"prompt_embeds": npe, "pooled_prompt_embeds": npp}


def _assert_same(ours, ref):
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_sequence_length", [16, 256])
def test_matches_pipeline_encode_prompt(pipe, tiny_sd3_path, max_sequence_length):
    ref, neg = _reference(pipe, PROMPTS, max_sequence_length=max_sequence_length)
    ours = encode_sd3_prompts(tiny_sd3_path, PROMPTS, device="cpu", max_sequence_length=max_sequence_length)
    assert ours["prompt_embeds"].shape == (2, 77 + max_sequence_length, T5_DIM)
    assert ours["pooled_prompt_embeds"].shape == (2, sum(CLIP_DIMS))
    _assert_same(ours, ref)
    # the CLIP block is zero-padded to the T5 width, the T5 block follows it along the sequence
    assert ours["prompt_embeds"][:, :77, sum(CLIP_DIMS):].abs().max() == 0
    assert ours["prompt_embeds"][:, 77:].abs().max() > 0
    # the pipeline's default negative prompt is ""
    _assert_same(encode_sd3_prompts(tiny_sd3_path, ["", ""], device="cpu", max_sequence_length=max_sequence_length), neg)


def test_t5_free_matches_pipeline_without_text_encoder_3(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    ref, _ = _reference(pipe, PROMPTS, max_sequence_length=32)
    ours = encode_sd3_prompts(tiny_sd3_path, PROMPTS, device="cpu", use_t5=False, max_sequence_length=32)
    _assert_same(ours, ref)
    assert ours["prompt_embeds"][:, 77:].abs().max() == 0


def test_clip_skip_matches_pipeline(pipe, tiny_sd3_path):
    ref, _ = _reference(pipe, PROMPTS, max_sequence_length=8, clip_skip=1)
    ours = encode_sd3_prompts(tiny_sd3_path, PROMPTS, device="cpu", max_sequence_length=8, clip_skip=1)
    _assert_same(ours, ref)
    plain = encode_sd3_prompts(tiny_sd3_path, PROMPTS, device="cpu", max_sequence_length=8)
    assert not torch.allclose(ours["prompt_embeds"], plain["prompt_embeds"])


def test_dtype_and_dispatch(tiny_sd3_path):
    bf = encode_prompts("sd3", tiny_sd3_path, PROMPTS, device="cpu", dtype="bf16", max_sequence_length=8)
    assert all(v.dtype == torch.bfloat16 for v in bf.values())
    cond, uncond = encode_prompt_pair("sd3", tiny_sd3_path, "a cat", device="cpu", max_sequence_length=8)
    both = encode_sd3_prompts(tiny_sd3_path, ["a cat", ""], device="cpu", max_sequence_length=8)
    _assert_same(cond, {k: v[:1] for k, v in both.items()})
    _assert_same(uncond, {k: v[1:] for k, v in both.items()})


def test_encoders_are_released(tiny_sd3_path):
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    def count():  # tracked objects, including unreachable cycles that were not collected
        return sum(isinstance(o, (CLIPTextModelWithProjection, T5EncoderModel)) for o in gc.get_objects())

    gc.collect()
    before = count()
    gc.disable()  # the encoder must free them itself, by refcount or its own collect
    try:
        encode_sd3_prompts(tiny_sd3_path, PROMPTS, device="cpu", max_sequence_length=8)
        assert count() == before
    finally:
        gc.enable()


def test_bad_input(tiny_sd3_path):
    with pytest.raises(ValueError, match="prompts must be"):
        encode_sd3_prompts(tiny_sd3_path, [], device="cpu")
    with pytest.raises(ValueError, match="prompts must be"):
        encode_sd3_prompts(tiny_sd3_path, ["ok", 3], device="cpu")
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_sd3_prompts(tiny_sd3_path, "a cat", device="cpu", max_sequence_length=0)
    with pytest.raises(ValueError, match="model_family"):
        encode_prompts("sdxl", tiny_sd3_path, "a cat")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['t5'\]"):
        encode_prompts("sd3", tiny_sd3_path, "a cat", t5=False)
