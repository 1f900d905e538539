"""Shared fixtures: tiny randomly-initialised models of the real architectures, saved once per
session with ``save_pretrained`` and loaded back through the users' ``from_pretrained`` path."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Tests that take the ``ts`` fixture (real threestudio) carry the ``threestudio`` marker: CI's
    threestudio pass runs ``-m threestudio`` only."""
    for item in items:
        if "ts" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.threestudio)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skips for lack of threestudio must carry the marker, or CI's threestudio pass
    (``-m threestudio``) would never run it: such a skip is turned into a failure naming the fix."""
    from ts_support import SKIP_PREFIX

    outcome = yield
    report = outcome.get_result()
    if report.skipped and "threestudio" not in item.keywords and isinstance(report.longrepr, tuple) \
            and report.longrepr[2].startswith("Skipped: " + SKIP_PREFIX):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skips for lack of threestudio but is not marked "
                           "@pytest.mark.threestudio (nor takes the ts fixture): CI's threestudio pass would never run it")


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


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (the kernel stand-ins are checked without threading noise)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tmpfs(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount; skipped with the reason otherwise)."""
    from full_disk import mount_tmpfs, umount

    d = tmp_path / "tmpfs"
    d.mkdir()
    mount_tmpfs(d)
    try:
        yield d
    finally:
        umount(d)


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


@pytest.fixture
def read_only_copy(tmp_path):
    """``copy(src)`` → a copy of folder ``src`` that nobody can write to: a read-only tmpfs for
    root (whom permissions do not stop), else the copy with its write bits removed."""
    import shutil
    import subprocess

    mounts = []

    def copy(src):
        ro = tmp_path / f"ro{len(mounts)}"
        ro.mkdir()
        if os.geteuid() == 0:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(ro)],
                              capture_output=True).returncode:
                pytest.skip("root cannot mount a tmpfs here, and permissions do not stop root")
            mounts.append(ro)
            shutil.copytree(src, ro, dirs_exist_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        else:
            shutil.copytree(src, ro, dirs_exist_ok=True)
            for d, _, files in os.walk(ro):
                for f in files:
                    os.chmod(os.path.join(d, f), 0o444)
                os.chmod(d, 0o555)
        return ro

    yield copy
    for ro in mounts:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
