"""The environment check (rfds-link --check, the end of rfds-setup): its table, its verdicts on
the bad pins threestudio's requirements bring (bitsandbytes 0.38.1, libigl 2.6.x, installed for
real into a scratch folder), and the CPU / CUDA rule for the CUDA extensions."""
import os
import subprocess
import sys
import time

import pytest

from threestudio_rfds.adapter import envcheck, envset
from threestudio_rfds.adapter import link_cli as rfds_link

from test_threestudio_optional import _checkout


def _rows(rows):
    return {r.component: r for r in rows}


def test_table_has_a_row_per_component_and_the_exit_status_follows_the_rows(tmp_path, capsys):
    root = _checkout(tmp_path)
    status = envcheck.report(str(root))
    out = capsys.readouterr().out
    for name in ("threestudio", "extension link", "torch", "torchvision", "diffusers", "transformers",
                 "huggingface_hub", "pytorch-lightning", "omegaconf", "libigl", "bitsandbytes", "nerfacc",
                 "envlight", "tinycudann", "nvdiffrast", "nerfacc CUDA extension", "hub cache"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), (name, out)
    failed = [line for line in out.splitlines() if "  FAIL  " in line]
    assert status == (1 if failed else 0), out
    assert out.strip().splitlines()[-1].startswith("environment check: " + ("FAILED" if failed else "ok"))


def test_link_check_prints_the_table_and_changes_nothing(tmp_path, capsys):
    root = _checkout(tmp_path)
    status = rfds_link.main([str(root), "--check"])
    out = capsys.readouterr().out
    assert "threestudio             ok    0.2.3" in out and "extension link" in out
    assert status == (1 if "environment check: FAILED" in out else 0)
    assert not (root / "custom" / "threestudio-rfds").exists()


def test_threestudio_rows(tmp_path):
    root = _checkout(tmp_path, '"0.1.0"')
    (row,) = envcheck.check_threestudio(str(root))
    assert row.status == envcheck.FAIL and "needs threestudio >= 0.2.0" in row.detail
    root = _checkout(tmp_path / "b")
    rows = _rows(envcheck.check_threestudio(str(root)))
    assert rows["threestudio"].status == envcheck.OK and "no git metadata" in rows["threestudio"].detail
    assert rows["extension link"].status == envcheck.WARN and f"rfds-link {root}" in rows["extension link"].detail
    assert rfds_link.main([str(root)]) == 0
    assert _rows(envcheck.check_threestudio(str(root)))["extension link"].status == envcheck.OK


def test_version_rules(monkeypatch):
    versions = {"libigl": "2.6.1", "bitsandbytes": "0.38.1", "diffusers": "0.19.3", "nerfacc": "0.5.3"}
    monkeypatch.setattr(envcheck, "dist_version", lambda d: versions.get(d))
    rows = _rows(envcheck.check_component(envset.component(d)) for d in ("libigl", "bitsandbytes", "diffusers",
                                                                         "nerfacc", "envlight"))
    assert rows["libigl"].status == envcheck.FAIL and "pip install 'libigl==2.5.1'" in rows["libigl"].detail
    assert rows["bitsandbytes"].status == envcheck.FAIL and "pip uninstall -y bitsandbytes" in rows["bitsandbytes"].detail
    assert rows["diffusers"].status == envcheck.FAIL and "outside >=0.29" in rows["diffusers"].detail
    assert rows["nerfacc"].status == envcheck.OK
    assert rows["envlight"].status == envcheck.FAIL and "not installed" in rows["envlight"].detail
    versions.pop("bitsandbytes")
    assert envcheck.check_component(envset.component("bitsandbytes")).status == envcheck.OK  # absent is fine


def test_cuda_extensions_warn_without_cuda_and_fail_with_it(monkeypatch):
    monkeypatch.setattr(envcheck, "dist_version", lambda d: None)
    monkeypatch.setattr(envcheck, "jit_extension_built", lambda prebuilt, name: False)
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: "no CUDA: torch is a CPU build")
    rows = envcheck.check_cuda_builds()
    assert [r.name for r in envset.CUDA_BUILDS] == [r.component for r in rows]
    for r, b in zip(rows, envset.CUDA_BUILDS):
        assert r.status == envcheck.WARN and "not built (no CUDA" in r.detail and "training will not run" in r.detail
        assert b.command in r.detail
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: None)  # a GPU machine without the builds
    assert all(r.status == envcheck.FAIL and "fix" in r.detail for r in envcheck.check_cuda_builds())


def test_threestudio_3dgs_rows_only_warn(tmp_path, monkeypatch):
    """threestudio-3dgs is optional: absent, one ok row; present, its rasteriser and simple-knn rows
    warn when not built (with or without CUDA) and name their build commands."""
    (tmp_path / "custom").mkdir()
    (row,) = envcheck.check_threestudio_3dgs(str(tmp_path))
    assert row.status == envcheck.OK and "not in custom/" in row.detail
    (tmp_path / "custom" / "threestudio-3dgs").mkdir()
    monkeypatch.setattr(envcheck, "dist_version", lambda d: None)
    for no_gpu in ("no CUDA: no GPU visible", None):
        monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: no_gpu)
        rows = envcheck.check_threestudio_3dgs(str(tmp_path))
        assert [r.component for r in rows] == ["threestudio-3dgs", "diff-gaussian-rasterization", "simple-knn"]
        assert [r.status for r in rows] == [envcheck.OK, envcheck.WARN, envcheck.WARN]
        assert "ashawkey/diff-gaussian-rasterization" in rows[1].detail and "non-commercial" in rows[1].detail
    monkeypatch.setattr(envcheck, "dist_version", lambda d: "0.0.1")
    assert all(r.status == envcheck.OK for r in envcheck.check_threestudio_3dgs(str(tmp_path)))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-machine verdict")
def test_this_cpu_machine_reports_the_cuda_extensions_as_not_built():
    rows = _rows(envcheck.check_cuda_builds())
    assert rows["nerfacc CUDA extension"].status == envcheck.WARN
    assert rows["gsplat CUDA kernels"].status == envcheck.WARN  # gsplat's JIT build needs CUDA
    assert envcheck.no_gpu_reason().startswith("no CUDA")


def test_torchvision_built_for_another_torch_fails(monkeypatch):
    real = envcheck.metadata.requires
    monkeypatch.setattr(envcheck.metadata, "requires",
                        lambda d: ["torch==1.13.0"] if d == "torchvision" else real(d))
    if envcheck.dist_version("torchvision") is None:
        pytest.skip("torchvision is not installed here")
    row = _rows(envcheck.check_torch())["torchvision"]
    assert row.status == envcheck.FAIL and "built for torch ==1.13.0" in row.detail
    have = envcheck.dist_version("torch")  # a pin on the exact build, local label included, is fine
    monkeypatch.setattr(envcheck.metadata, "requires", lambda d: [f"torch=={have}"] if d == "torchvision" else real(d))
    assert _rows(envcheck.check_torch())["torchvision"].status == envcheck.OK


@pytest.mark.slow
def test_real_bad_pins_fail_the_check(tmp_path):
    """bitsandbytes 0.38.1 and libigl 2.6.1 installed for real (pip --target, no dependencies)
    ahead of this environment's packages; the check, run as a subprocess, must fail on both.
    Costs about 20 s and 320 MB of disk when pip's cache has the wheels (117 MB to download)."""
    target = tmp_path / "bad"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "bitsandbytes==0.38.1", "libigl==2.6.1"], capture_output=True, text=True, timeout=600)
    if r.returncode:
        pytest.skip(f"cannot install the bad pins here (no package index?): {r.stderr.strip()[-300:]}")
    install_s = time.time() - t0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    root = _checkout(tmp_path)
    out = subprocess.run([sys.executable, "-m", "threestudio_rfds.adapter.envcheck", str(root)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.strip()}
    assert "FAIL" in lines["bitsandbytes"] and "0.38.1" in lines["bitsandbytes"], out.stdout
    assert "FAIL" in lines["libigl"] and "2.6.1" in lines["libigl"] and "libigl==2.5.1" in lines["libigl"], out.stdout
    assert "FAILED (" in out.stdout and "bitsandbytes" in out.stdout.splitlines()[-1]
    # the reason the libigl row gives is real: 2.6 lacks what threestudio imports (where igl 2.6 imports
    # at all: beside CI's bare torch 2.13 environment it fails earlier, with std::bad_cast)
    probe = subprocess.run([sys.executable, "-c", "import igl; print(hasattr(igl, 'fast_winding_number_for_meshes'))"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 or probe.stdout.strip() == "False", probe.stdout
    print(f"bad-pin install {install_s:.1f} s")


# ---------------------------------------------------------------- the link row (issues 20, 21)
def _bin_env():
    """PATH with this interpreter's scripts first, so a suggested `rfds-link …` runs this package's."""
    return {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


@pytest.mark.parametrize("state, status, says", [
    ("absent", envcheck.WARN, "not linked yet"),
    ("broken", envcheck.FAIL, "is a broken link to"),
    ("other", envcheck.WARN, "links to"),
    ("copy", envcheck.WARN, "is a copy, not a link: launch.py loads that copy"),
    ("file", envcheck.FAIL, "is a file, not this package"),
])
def test_each_link_state_has_a_fix_that_works(tmp_path, state, status, says):
    root = _checkout(tmp_path)
    target = root / "custom" / "threestudio-rfds"
    if state == "broken":
        os.symlink(tmp_path / "moved-away", target)
    elif state == "other":
        (tmp_path / "older").mkdir()
        os.symlink(tmp_path / "older", target)
    elif state == "copy":
        target.mkdir()
        (target / "__init__.py").write_text("")
    elif state == "file":
        target.write_text("x")
    row = _rows(envcheck.check_threestudio(str(root)))["extension link"]
    assert row.status == status and says in row.detail and "is not this package;" not in row.detail, row
    fix = row.detail.split("; fix: ")[1]
    r = subprocess.run(["bash", "-c", fix], env=_bin_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (fix, r.stdout, r.stderr)
    assert _rows(envcheck.check_threestudio(str(root)))["extension link"].status == envcheck.OK
    if state in ("copy", "file"):  # moved aside, never deleted; launch.py skips *_disabled
        assert (root / "custom" / "threestudio-rfds_disabled").exists()


def _no_cuda(monkeypatch, reason="no CUDA: torch is a CPU build"):
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: reason)
    monkeypatch.setattr(envcheck, "jit_extension_built", lambda prebuilt, name: False)


def test_without_cuda_the_check_says_training_needs_a_gpu(tmp_path, capsys, monkeypatch):
    root = _checkout(tmp_path)
    rfds_link.main([str(root)])
    _no_cuda(monkeypatch)
    status = rfds_link.main([str(root), "--check"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("this machine has no CUDA; training needs a GPU (torch is a CPU build)"), lines
    assert status == (1 if "FAILED" in lines[-1] else 0)  # the libraries check: no-CUDA rows are warnings
    assert rfds_link.main([str(root), "--check", "--for", "training"]) == 1  # cannot train here
    rows = _rows(envcheck.check_environment(str(root), "training"))
    assert rows["GPU"].status == envcheck.FAIL and rows["GPU"].detail.startswith(envcheck.NO_CUDA)
    assert rows["tinycudann"].status == envcheck.FAIL
    out = capsys.readouterr().out
    assert "GPU                     FAIL  this machine has no CUDA; training needs a GPU" in out


def test_with_cuda_and_the_builds_the_training_check_passes_those_rows(tmp_path, monkeypatch):
    root = _checkout(tmp_path)
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(envcheck, "jit_extension_built", lambda prebuilt, name: True)
    real = envcheck.dist_version
    monkeypatch.setattr(envcheck, "dist_version", lambda d: "9.9" if d in ("tinycudann", "nvdiffrast") else real(d))
    rows = _rows(envcheck.check_environment(str(root), "training"))
    assert "GPU" not in rows and rows["tinycudann"].status == envcheck.OK
    assert rows["extension link"].status == envcheck.FAIL  # launch.py --train needs the plugin linked


def test_a_prebuilt_extension_is_found_on_disk_without_importing(tmp_path, monkeypatch):
    """nerfacc/gsplat ship prebuilt kernels as ``<package>/csrc.*.so``: found from the package folder,
    with nothing imported (a stand-in already in sys.modules does not confuse it)."""
    pkg = tmp_path / "fakeext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not envcheck.jit_extension_built("fakeext.csrc", "fakeext_cuda") or envcheck.no_gpu_reason() is None
    (pkg / "csrc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert envcheck.jit_extension_built("fakeext.csrc", "fakeext_cuda")
    assert not envcheck.jit_extension_built("no_such_package_here.csrc", "x") or envcheck.no_gpu_reason() is None
