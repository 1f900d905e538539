"""The InstaFlow merge cache is verified on every load (issue 20): an entry whose tensors were
changed, that lacks a weight or was written for another merge is recomputed with one warning,
and the merge is always computed into new tensors, never on top of a partly loaded entry.  A hit
needs no write access; a cache path that is a file is a one-line error."""
import logging
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from threestudio_rfds.backends.instaflow import InstaFlowBackend

from tiny_instaflow import tiny_unet, tiny_vae


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-sources")
    for name, seed in (("base", 1), ("fine", 2)):
        tiny_unet(seed=seed).save_pretrained(str(root / name / "unet"))
        tiny_vae(seed=seed).save_pretrained(str(root / name / "vae"))
    return {"base": str(root / "base"), "finetuned": str(root / "fine")}


@pytest.fixture(scope="module")
def expected(tiny_instaflow_path):
    """inst + (fine − base), computed here from the three UNets' own weights."""
    inst = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32").unet.state_dict()
    sb, sf = tiny_unet(seed=1).state_dict(), tiny_unet(seed=2).state_dict()
    return {k: w + (sf[k] - sb[k]) for k, w in inst.items()}


def _load(path, sources, cache):
    return InstaFlowBackend(path, device="cpu", dtype="fp32", unet_delta=sources, merge_cache=str(cache))


def _assert_merge(backend, expected):
    for k, w in backend.unet.state_dict().items():
        torch.testing.assert_close(w, expected[k], rtol=0, atol=1e-6, msg=k)


def _entry(cache):
    (f,) = [p for p in os.listdir(cache) if p.endswith(".safetensors")]
    return os.path.join(cache, f)


def _rewrite(file, change):
    """Rewrite a cache file as a valid safetensors file with the same metadata and changed tensors."""
    with safe_open(file, framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(state, file, metadata=meta)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "threestudio_rfds"]


@pytest.mark.parametrize("damage", ["changed", "missing", "extra", "reshaped"])
def test_a_damaged_entry_is_recomputed_with_one_warning(tiny_instaflow_path, sources, expected, tmp_path, caplog,
                                                        damage):
    cache = tmp_path / "cache"
    _assert_merge(_load(tiny_instaflow_path, sources, cache), expected)
    key = "conv_in.weight"

    def change(state):
        if damage == "changed":
            state[key] = state[key] + 1.0
        elif damage == "missing":  # load_state_dict(strict) would copy the rest, then raise
            del state[key]
        elif damage == "extra":
            state["extra.weight"] = torch.zeros(3)
        else:
            state[key] = state[key].reshape(-1)

    _rewrite(_entry(cache), change)
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):
        again = _load(tiny_instaflow_path, sources, cache)
    _assert_merge(again, expected)  # never inst + 2·(fine − base), never the changed tensor
    (msg,) = _warnings(caplog)
    assert "recomputing" in msg and "\n" not in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):  # the rewritten entry is right and used
        _assert_merge(_load(tiny_instaflow_path, sources, cache), expected)
    assert not _warnings(caplog)
    with safe_open(_entry(cache), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor(key), expected[key], rtol=0, atol=1e-6)


def test_an_entry_of_another_merge_under_this_name_is_not_used(tiny_instaflow_path, sources, expected, tmp_path,
                                                               caplog):
    cache = tmp_path / "cache"
    _load(tiny_instaflow_path, sources, cache)
    other = tmp_path / "other"
    _load(tiny_instaflow_path, {**sources, "alpha": 0.5}, other)
    shutil.copyfile(_entry(other), _entry(cache))  # a valid entry with its own digest, for α = 0.5
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):
        _assert_merge(_load(tiny_instaflow_path, sources, cache), expected)
    (msg,) = _warnings(caplog)
    assert "another merge" in msg


def test_a_read_only_cache_serves_hits_and_computes_misses(tiny_instaflow_path, sources, expected, tmp_path, caplog,
                                                           monkeypatch, read_only_copy):
    cache = tmp_path / "cache"
    _load(tiny_instaflow_path, sources, cache)
    ro = read_only_copy(cache)

    def no_reads(*a, **k):
        raise AssertionError("the base and fine-tuned UNets were read despite a cached merge")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="threestudio_rfds"):
        m.setattr(InstaFlowBackend, "_load_delta", staticmethod(no_reads))
        _assert_merge(_load(tiny_instaflow_path, sources, ro), expected)  # a hit: no lock, no write
    assert not _warnings(caplog)
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):  # a miss: merged, one warning
        half = _load(tiny_instaflow_path, {**sources, "alpha": 0.5}, ro)
    (msg,) = _warnings(caplog)
    assert "cannot write" in msg and str(ro) in msg and "uncached" in msg
    inst = InstaFlowBackend(tiny_instaflow_path, device="cpu", dtype="fp32").unet.conv_in.weight
    torch.testing.assert_close(half.unet.conv_in.weight, inst + 0.5 * (expected["conv_in.weight"] - inst))


def test_a_cache_path_that_is_a_file_is_one_line(tiny_instaflow_path, sources, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^merge_cache '.*file' exists and is not a folder; pass a folder") as e:
        _load(tiny_instaflow_path, sources, tmp_path / "file")
    assert "\n" not in str(e.value)
