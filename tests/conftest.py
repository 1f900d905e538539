"""Shared fixtures: tiny randomly-initialised models of the real architectures, saved once per
session with ``save_pretrained`` and loaded back through the users' ``from_pretrained`` path."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def private_merge_cache(tmp_path_factory):
    """Merged InstaFlow UNets (backends/instaflow.py merge_cache) go to a session folder, never ~/.cache."""
    old = os.environ.get("RFDS_CACHE_DIR")
    os.environ["RFDS_CACHE_DIR"] = str(tmp_path_factory.mktemp("rfds-cache"))
    yield os.environ["RFDS_CACHE_DIR"]
    if old is None:
        os.environ.pop("RFDS_CACHE_DIR", None)
    else:
        os.environ["RFDS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> str:
    from tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_sd35_paths(tmp_path_factory) -> dict:
    """{variant: folder} of the tiny SD3.5 Large / Large Turbo / Medium architectures (tests/tiny_sd3.py)."""
    from tiny_sd3 import SD3_VARIANTS, build_tiny_sd3

    return {v: build_tiny_sd3(str(tmp_path_factory.mktemp(v)), v) for v in SD3_VARIANTS if v != "sd3"}


@pytest.fixture(scope="session")
def tiny_flux_paths(tmp_path_factory) -> dict:
    """{"dev": folder, "schnell": folder} of the tiny FLUX.1 pipelines (tests/tiny_flux.py)."""
    from tiny_flux import VARIANTS, build_tiny_flux

    return {v: build_tiny_flux(str(tmp_path_factory.mktemp(f"tiny-flux-{v}")), v) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_instaflow_path(tmp_path_factory) -> str:
    from tiny_instaflow import build_tiny_instaflow

    return build_tiny_instaflow(str(tmp_path_factory.mktemp("tiny-instaflow")))


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> str:
    from tiny_clip import build_tiny_clip

    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture
def counted(monkeypatch):
    """The prompt lists the real SD3 text encoder is asked to encode (calls are counted, not faked)."""
    import functools

    from threestudio_rfds.text import sd3 as text_sd3

    calls = []
    real = text_sd3.encode_sd3_prompts

    @functools.wraps(real)
    def wrapper(path, prompts, **kw):
        calls.append(list(prompts))
        return real(path, prompts, **kw)

    monkeypatch.setattr(text_sd3, "encode_sd3_prompts", wrapper)
    return calls


@pytest.fixture(scope="module")
def ts():
    """The real threestudio package (THREESTUDIO_ROOT), or a skip with the reason."""
    from ts_support import threestudio_or_skip

    return threestudio_or_skip()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """threestudio writes its prompt cache under the current folder: a private one per module."""
    old = os.getcwd()
    d = tmp_path_factory.mktemp("ts-work")
    os.chdir(d)
    yield d
    os.chdir(old)
