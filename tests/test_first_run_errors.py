"""First-run errors are true and fast: an unreachable hub, offline mode with an empty cache, a
mistyped folder and an unusable device are each reported in seconds (no retry loop), with the
way out; a model in the local cache still loads when the hub does not answer."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from threestudio_rfds.backends import hub
from threestudio_rfds.backends.base import ModelLoadError, resolve_device

FAST_S = 3.0  # seconds an error may take once the libraries are imported
REFUSED = "http://127.0.0.1:9"  # the discard port: connections are refused at once

# In a fresh interpreter (the hub client reads HF_* at import): import first, then time the call.
CHILD = """
import sys, time
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from threestudio_rfds.backends.sd3 import SD3Backend
t0 = time.perf_counter()
try:
    SD3Backend(sys.argv[1], device="cpu")
    print("LOADED")
except Exception as e:
    print(type(e).__name__, e)
print("ELAPSED", time.perf_counter() - t0)
"""


def run_child(model: str, tmp_path, **env_vars) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **env_vars)
    r = subprocess.run([sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("ELAPSED"), r.stdout + r.stderr
    return "\n".join(lines[:-1]), float(lines[-1].split()[1])


def test_unreachable_hub_is_reported_at_once_with_both_ways_out(tmp_path):
    msg, elapsed = run_child("fake-org/fake-sd3", tmp_path, HF_ENDPOINT=REFUSED)
    assert msg.startswith("ModelLoadError"), msg
    for part in ("'fake-org/fake-sd3'", "no network", "not in the local cache", "pass a local folder",
                 "hf download fake-org/fake-sd3", "local_files_only=True", "HF_HUB_OFFLINE=1"):
        assert part in msg, (part, msg)
    assert elapsed < FAST_S, elapsed


def test_offline_mode_with_an_empty_cache_is_reported_at_once(tmp_path):
    msg, elapsed = run_child("fake-org/fake-sd3", tmp_path, HF_HUB_OFFLINE="1")
    assert msg.startswith("ModelLoadError") and "offline mode is on" in msg, msg
    assert "not in the local Hugging Face cache" in msg and "hf download fake-org/fake-sd3" in msg
    assert elapsed < FAST_S, elapsed


def _cache_copy(model_dir: str, home, repo_id: str) -> None:
    """Put ``model_dir`` into the hub cache layout under ``home`` as the ``main`` snapshot of ``repo_id``."""
    commit = "0123456789abcdef0123456789abcdef01234567"  # the hub client wants a 40-hex commit
    repo = os.path.join(home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(model_dir, os.path.join(repo, "snapshots", commit))


def test_a_cached_model_loads_without_retries_when_the_hub_is_unreachable(tmp_path, tiny_sd3_path):
    _cache_copy(tiny_sd3_path, tmp_path / "hf-home", "cached-org/tiny-sd3")
    msg, elapsed = run_child("cached-org/tiny-sd3", tmp_path, HF_ENDPOINT=REFUSED)
    assert msg == "LOADED", msg
    assert elapsed < 30, elapsed  # loading the tiny model itself; no network retries


@pytest.mark.parametrize("name", ["./tiny-sd", "../nowhere/model", "~/no-such-model-xyz", "/abs/no/model",
                                  "models/tiny-sd", "a/b/c"])
def test_a_mistyped_folder_is_reported_as_a_missing_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # "models/tiny-sd" is then meant as a folder, not a hub id
    monkeypatch.setenv("HF_ENDPOINT", REFUSED)
    from threestudio_rfds.backends.sd3 import SD3Backend

    with pytest.raises(ModelLoadError, match=r"model folder .* does not exist") as e:
        SD3Backend(name, device="cpu")
    assert "hf download" not in str(e.value) and repr(name) in str(e.value)


def test_hub_ids_are_not_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not hub.looks_like_path("stabilityai/stable-diffusion-3-medium-diffusers")
    assert not hub.looks_like_path("gpt2")
    assert hub.looks_like_path("./gpt2") and hub.looks_like_path("x/y/z") and hub.looks_like_path("~/m")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not usable")
def test_cuda_without_cuda_is_refused_before_any_model_loads(tiny_sd3_path, monkeypatch):
    import threestudio_rfds.backends.sd3 as sd3
    from threestudio_rfds.text import encode_prompts

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sd3, "load_component", no_load)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"device '{device}' is not usable: this torch .*device='cpu' or 'auto'"):
            sd3.SD3Backend(tiny_sd3_path, device=device)
    with pytest.raises(ValueError, match="is not usable"):
        encode_prompts("sd3", tiny_sd3_path, ["a cat"], device="cuda")


def test_bad_device_strings_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_no_hub_cli_name_but_hf_in_the_package_and_docs():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = []
    for folder in ("custom", "docs"):
        for dirpath, _dirs, files in os.walk(os.path.join(here, folder)):
            for name in files:
                if name.endswith((".py", ".md", ".yaml")):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        if "huggingface-cli" in f.read():
                            hits.append(os.path.join(dirpath, name))
    with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
        if "huggingface-cli" in f.read():
            hits.append("README.md")
    assert hits == [], hits


def test_the_prompt_worker_records_its_error_for_the_parent(tmp_path, monkeypatch):
    from threestudio_rfds.adapter.cache_worker import child_error, new_error_file, spawn_target

    monkeypatch.chdir(tmp_path)
    path = new_error_file()
    worker = spawn_target("sd3", {"device": "cpu", "dtype": "fp32", "use_t5": False}, path)
    with pytest.raises(ModelLoadError):
        worker("./mistyped-model", ["a cat"], str(tmp_path / "cache"))
    text = child_error(path)
    assert text.startswith("ModelLoadError: ") and "model folder './mistyped-model' does not exist" in text
    assert not os.path.exists(path)
    assert "recorded no error" in child_error(new_error_file())  # e.g. killed: says so
