"""The on-disk embedding cache: hits, keys, corruption recovery, concurrent processes."""
import functools
import glob
import multiprocessing as mp
import os
import time

import pytest
import torch

from threestudio_rfds.text import encode_prompts
from threestudio_rfds.text.cache import EmbeddingCache, cache_key

PROMPTS = ["a photo of a cat", "a red dog", "a photo of a cat"]


def _files(d):
    return sorted(glob.glob(os.path.join(d, "*.safetensors")))


def test_hit_equals_uncached_and_skips_encoding(tiny_sd3_path, tmp_path, counted):
    d = str(tmp_path / "cache")
    fresh = encode_prompts("sd3", tiny_sd3_path, PROMPTS, device="cpu", max_sequence_length=8)
    first = encode_prompts("sd3", tiny_sd3_path, PROMPTS, cache_dir=d, device="cpu", max_sequence_length=8)
    assert counted[-1] == ["a photo of a cat", "a red dog"]  # duplicates encoded once
    assert len(_files(d)) == 2
    n = len(counted)
    again = encode_prompts("sd3", tiny_sd3_path, PROMPTS[::-1], cache_dir=d, device="cpu", max_sequence_length=8)
    assert len(counted) == n  # all hits
    for k in fresh:
        torch.testing.assert_close(first[k], fresh[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again[k], first[k].flip(0), rtol=0, atol=0)


def test_key_covers_options_dtype_and_model(tiny_sd3_path, tmp_path, counted):
    d = str(tmp_path / "cache")
    encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu")
    encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", max_sequence_length=256)  # the default
    assert len(_files(d)) == 1 and len(counted) == 1
    encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", max_sequence_length=8)
    encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", use_t5=False)
    bf = encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", dtype="bf16")
    assert bf["prompt_embeds"].dtype == torch.bfloat16
    assert len(_files(d)) == 4 and len(counted) == 4
    spec = {"family": "sd3", "model": "a"}
    assert cache_key(spec, "x") != cache_key({**spec, "model": "b"}, "x") != cache_key(spec, "y")


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "empty"])
def test_corrupt_file_is_recomputed(tiny_sd3_path, tmp_path, counted, damage):
    d = str(tmp_path / "cache")
    good = encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", max_sequence_length=8)
    (path,) = _files(d)
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_byte":  # inside the tensor data: only the checksum notices
        data = data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]
    elif damage == "garbage":
        data = b"not a safetensors file" * 10
    else:
        data = b""
    with open(path, "wb") as f:
        f.write(data)
    again = encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", max_sequence_length=8)
    assert len(counted) == 2  # recomputed
    for k in good:
        torch.testing.assert_close(again[k], good[k])
    assert open(path, "rb").read() != data and len(_files(d)) == 1
    encode_prompts("sd3", tiny_sd3_path, "a cat", cache_dir=d, device="cpu", max_sequence_length=8)
    assert len(counted) == 2  # the rewritten file is valid


# ---------------------------------------------------------------- concurrency (spawned processes)
SPEC = {"family": "test", "model": "synthetic"}


def _synthetic(prompts, log_path):
    """A slow deterministic 'encoder' that logs each call (one line per call)."""
    with open(log_path, "a") as f:
        f.write(",".join(prompts) + "\n")
    time.sleep(0.5)
    return {"e": torch.stack([torch.full((4, 3), float(len(p))) + torch.arange(3.0) for p in prompts])}


def _cache_worker(cache_dir, log_path, prompts, out_path):
    out = EmbeddingCache(cache_dir).get_or_compute(SPEC, prompts, functools.partial(_synthetic, log_path=log_path))
    torch.save(out, out_path)


def _writer_worker(cache_dir, value, n):
    cache = EmbeddingCache(cache_dir)
    for _ in range(n):
        cache.save(SPEC, "shared", {"e": torch.full((128, 128), float(value))})


def test_concurrent_runs_encode_once(tmp_path):
    d, log = str(tmp_path / "cache"), str(tmp_path / "calls.log")
    prompts = ["a cat", "a dog on a mat", "a cat"]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_cache_worker, args=(d, log, prompts, str(tmp_path / f"out{i}.pt"))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert open(log).read().splitlines() == ["a cat,a dog on a mat"]  # one process encoded, the others read
    outs = [torch.load(str(tmp_path / f"out{i}.pt")) for i in range(3)]
    expected = _synthetic(prompts, str(tmp_path / "expected.log"))["e"]
    for o in outs:
        assert torch.equal(o["e"], expected)
    assert len(_files(d)) == 2 and not glob.glob(os.path.join(d, ".tmp-*"))


def test_concurrent_saves_never_expose_a_partial_file(tmp_path):
    d = str(tmp_path / "cache")
    cache = EmbeddingCache(d)
    ctx = mp.get_context("spawn")
    # enough replacements that a reader pairing one file's header with another's tensors (as
    # safetensors.safe_open can, since it may reopen the path) is caught in practice
    procs = [ctx.Process(target=_writer_worker, args=(d, v, 100)) for v in (1.0, 2.0, 3.0)]
    for p in procs:
        p.start()
    reads, seen_file = 0, False
    while any(p.is_alive() for p in procs):
        got = cache.load(SPEC, "shared")
        if got is None:
            assert not seen_file, "a reader saw a missing or partial file after the first write"
            continue
        seen_file = True
        assert got["e"].unique().numel() == 1 and got["e"][0, 0].item() in (1.0, 2.0, 3.0)
        reads += 1
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert cache.load(SPEC, "shared") is not None and not glob.glob(os.path.join(d, ".tmp-*"))
    assert reads > 0
