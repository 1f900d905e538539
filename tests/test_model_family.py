"""A folder (or cached hub repository) of another model family is refused where it is opened,
naming both families, before any weights load (issue 20); the family table takes a new family as
one entry.  Also: a dtype the models cannot run in is named as the problem."""
import json
import os
import shutil

import pytest
import torch

from threestudio_rfds.backends import family, load_backend
from threestudio_rfds.backends.instaflow import InstaFlowBackend
from threestudio_rfds.text import encode_prompts
from threestudio_rfds.text.clip import encode_clip_prompts
from threestudio_rfds.text.sd3 import encode_sd3_prompts


def _no_load(monkeypatch):
    """Any component load fails the test: the refusal must come first."""
    import threestudio_rfds.backends.base as base

    def no_load(cls, *a, **k):
        raise AssertionError(f"{cls.__name__} was loaded before the family was checked")

    for mod in ("threestudio_rfds.backends.sd3", "threestudio_rfds.backends.instaflow", "threestudio_rfds.text.clip",
                "threestudio_rfds.text.sd3"):
        monkeypatch.setattr(f"{mod}.load_component", no_load)
    monkeypatch.setattr(base, "load_component", no_load)


def test_an_sd3_folder_is_refused_for_instaflow_naming_both(tiny_sd3_path, monkeypatch):
    _no_load(monkeypatch)
    calls = [lambda: encode_prompts("instaflow", tiny_sd3_path, "a cat", device="cpu"),
             lambda: encode_clip_prompts(tiny_sd3_path, "a cat", device="cpu"),
             lambda: InstaFlowBackend(tiny_sd3_path, device="cpu"),
             lambda: load_backend("instaflow", pretrained_model_name_or_path=tiny_sd3_path, device="cpu")]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "family 'sd3'" in msg and "family 'instaflow'" in msg and "StableDiffusion3Pipeline" in msg, msg
        assert "load it as 'sd3'" in msg and "\n" not in msg


def test_an_instaflow_folder_is_refused_for_sd3(tiny_instaflow_path, tmp_path, monkeypatch):
    _no_load(monkeypatch)
    for call in (lambda: encode_prompts("sd3", tiny_instaflow_path, "a cat", device="cpu", cache_dir=str(tmp_path)),
                 lambda: encode_sd3_prompts(tiny_instaflow_path, "a cat", device="cpu"),
                 lambda: load_backend("sd3", pretrained_model_name_or_path=tiny_instaflow_path, device="cpu")):
        with pytest.raises(ValueError, match=r"family 'instaflow' .*StableDiffusionPipeline.*not of family 'sd3'"):
            call()
    assert not os.listdir(tmp_path)  # refused before the embedding cache was even opened


def test_the_merge_sources_and_the_vae_are_checked_too(tiny_instaflow_path, tiny_sd3_path):
    for kw in ({"vae_path": tiny_sd3_path}, {"unet_delta": {"base": tiny_sd3_path, "finetuned": tiny_instaflow_path}}):
        with pytest.raises(ValueError, match=r"holds a model of family 'sd3'"):
            InstaFlowBackend(tiny_instaflow_path, device="cpu", merge_cache=False, **kw)


def test_a_folder_without_model_index_is_known_by_its_components(tiny_sd3_path, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_sd3_path, bare)
    os.remove(bare / "model_index.json")
    assert family.detect_family(str(bare)) == ("sd3", "its transformer/config.json names SD3Transformer2DModel")
    with pytest.raises(ValueError, match="transformer/config.json names SD3Transformer2DModel"):
        encode_prompts("instaflow", str(bare), "a", device="cpu")
    (tmp_path / "empty").mkdir()
    assert family.detect_family(str(tmp_path / "empty")) is None  # unknown: let through, load errors say more


def test_a_cached_hub_repository_is_checked_before_loading(tiny_sd3_path, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(os.path.join(tiny_sd3_path, "model_index.json"), repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _no_load(monkeypatch)
    with pytest.raises(ValueError, match=r"'someone/tiny-sd3' holds a model of family 'sd3'"):
        encode_prompts("instaflow", "someone/tiny-sd3", "a cat", device="cpu", local_files_only=True)


def test_a_new_family_is_one_table_entry(tiny_sd3_path, tmp_path, monkeypatch):
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "Kandinsky3Pipeline"}))
    assert family.detect_family(str(other)) is None
    monkeypatch.setitem(family.FAMILIES, "kandinsky", family.Family("Kandinsky 3", ("Kandinsky3Pipeline",)))
    with pytest.raises(ValueError, match=r"family 'kandinsky' \(Kandinsky 3: its model_index.json names "
                                         r"Kandinsky3Pipeline\), not of family 'sd3'.*family 'kandinsky' has no backend here"):
        load_backend("sd3", pretrained_model_name_or_path=str(other), device="cpu")
    family.check_family("kandinsky", str(other))  # its own family passes
    flux = tmp_path / "flux"  # FLUX.1 came in this way: one row, and its folders are named
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"family 'flux' \(FLUX.1: .*\), not of family 'sd3'.*or load it as 'flux'"):
        load_backend("sd3", pretrained_model_name_or_path=str(flux), device="cpu")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_a_dtype_that_is_not_floating_point_is_named(tiny_sd3_path, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be torch.float32, float16, bfloat16 or float64 .*got {dtype}"):
        load_backend("sd3", pretrained_model_name_or_path=tiny_sd3_path, device="cpu", dtype=dtype)
