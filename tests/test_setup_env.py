"""rfds-setup: the plan it prints and runs (pip commands around the installed torch, threestudio's
requirements split into installed / replaced / skipped, the CUDA branch), --dry-run changing
nothing, and its usage errors.  The full install is not run here (CI runs `rfds-setup DIR --yes`)."""
import os
import signal
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.version import Version

from threestudio_rfds.adapter import envcheck, envset, setup_env
from threestudio_rfds.adapter.ts_requirements import decide, plan_requirements, requirement_name

from test_threestudio_optional import _checkout

# threestudio 28d9d80's requirements.txt, as it is
TS_REQUIREMENTS = """lightning==2.0.0
omegaconf==2.3.0
jaxtyping
typeguard
git+https://github.com/KAIR-BAIR/nerfacc.git@v0.5.2
git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch
diffusers<0.20
transformers==4.28.1
accelerate
opencv-python
tensorboard
matplotlib
imageio>=2.28.0
imageio[ffmpeg]
git+https://github.com/NVlabs/nvdiffrast.git
libigl
xatlas
trimesh[easy]
networkx
pysdf
PyMCubes
wandb
gradio==4.11.0
git+https://github.com/ashawkey/envlight.git
torchmetrics
IPython
ipywidgets

# deepfloyd
xformers
bitsandbytes==0.38.1
sentencepiece
safetensors
huggingface_hub

# for zero123
einops
kornia
taming-transformers-rom1504
git+https://github.com/openai/CLIP.git

#controlnet
controlnet_aux
"""


@pytest.fixture
def checkout(tmp_path):
    root = _checkout(tmp_path)
    (root / "requirements.txt").write_text(TS_REQUIREMENTS)
    return root


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"ran {a[0]!r}")

    monkeypatch.setattr(setup_env.subprocess, "run", refuse)


def test_requirement_names():
    assert requirement_name("git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch") == "tinycudann"
    assert requirement_name("git+https://github.com/KAIR-BAIR/nerfacc.git@v0.5.2") == "nerfacc"
    assert requirement_name("trimesh[easy]") == "trimesh"
    assert requirement_name("huggingface_hub") == "huggingface-hub"


def test_conflicting_pins_are_replaced_or_skipped_with_a_reason(checkout):
    decisions, install = plan_requirements(str(checkout))
    by_line = {d.line: d for d in decisions}
    for bad in ("diffusers<0.20", "transformers==4.28.1", "lightning==2.0.0", "bitsandbytes==0.38.1", "libigl",
                "gradio==4.11.0", "xformers"):
        assert bad not in install and by_line[bad].reason, bad
    for url in [ln for ln in TS_REQUIREMENTS.splitlines() if ln.startswith("git+")]:
        assert url not in install and by_line[url].reason
    assert by_line["libigl"].install == "libigl==2.5.1"
    assert by_line["diffusers<0.20"].install == "diffusers==0.42.1"
    assert by_line["bitsandbytes==0.38.1"].install is None and "triton.ops" in by_line["bitsandbytes==0.38.1"].reason
    assert by_line["git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"].install is None
    assert {"jaxtyping", "trimesh[easy]", "imageio[ffmpeg]", "controlnet_aux"} <= set(install)
    assert decide("git+https://example.org/some/thing.git").install is None  # any other URL: skipped, with the command
    assert "pip install git+https://example.org/some/thing.git" in decide("git+https://example.org/some/thing.git").reason


def test_dry_run_prints_every_command_and_changes_nothing(checkout, capsys, no_subprocess):
    assert setup_env.main([str(checkout), "--dry-run"]) == 0
    out = capsys.readouterr().out
    torch_v = Version(metadata.version("torch"))
    install = [ln for ln in out.splitlines() if "-m pip install" in ln and "diffusers==" in ln]
    assert len(install) == 1, out
    cmd = install[0]
    assert f"{sys.executable} -m pip install torch=={torch_v.public} " in cmd  # pinned to itself: never replaced
    assert "--index-url" not in cmd  # no CPU (or any other) torch index for torch
    for pin in envset.install_pins():
        assert pin in cmd, pin
    for bad in ("diffusers<0.20", "transformers==4.28.1", "lightning==2.0.0", "bitsandbytes", "libigl ", "gradio",
                "xformers", "git+"):
        assert bad not in cmd, bad
    assert "bitsandbytes==0.38.1: skipped" in out and "xformers: skipped" in out
    assert "threestudio_rfds.adapter.envcheck" in out and "link this package" in out
    assert out.strip().endswith("dry run: nothing was changed")
    assert not (checkout / "custom" / "threestudio-rfds").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU branch")
def test_cpu_machine_prints_the_cuda_builds_instead_of_running_them():
    (step,) = setup_env.cuda_steps()
    assert step.argv is None and "not built (no CUDA" in step.what and "will not run here" in step.what
    assert [n.split(":", 1)[1].strip() for n in step.notes] == [b.command for b in envset.CUDA_BUILDS]


def test_cuda_machine_builds_the_extensions(monkeypatch):
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc")
    steps = setup_env.cuda_steps()
    assert len(steps) == len(envset.CUDA_BUILDS) and all(s.may_fail for s in steps)
    assert steps[0].argv[:4] == [sys.executable, "-m", "pip", "install"] and "tiny-cuda-nn" in steps[0].argv[-1]
    assert steps[2].argv[0] == sys.executable and "nerfacc.cuda._backend" in steps[2].argv[-1]
    assert "gsplat.cuda._backend" in steps[3].argv[-1]
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: None)  # GPU, but no nvcc
    (step,) = setup_env.cuda_steps()
    assert step.argv is None and "nvcc not found" in step.what


def test_threestudio_3dgs_builds_only_where_it_is_in_custom(tmp_path, monkeypatch):
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(setup_env.shutil, "which", lambda name: "/usr/local/cuda/bin/nvcc")
    (tmp_path / "custom").mkdir()
    assert len(setup_env.cuda_steps(str(tmp_path))) == len(envset.CUDA_BUILDS)
    (tmp_path / "custom" / "threestudio-3dgs").mkdir()
    steps = setup_env.cuda_steps(str(tmp_path))
    assert [s.argv[-1] for s in steps[-2:]] == ["git+https://github.com/ashawkey/diff-gaussian-rasterization",
                                                "git+https://github.com/DSaurus/simple-knn.git"]
    assert "plyfile" in envset.install_pins()  # threestudio-3dgs' Python requirement


def test_torchvision_only_as_the_release_for_the_installed_torch(monkeypatch):
    missing = [envcheck.Row("torchvision", envcheck.FAIL, "not installed")]
    monkeypatch.setattr(envcheck, "check_torch", lambda: missing)
    reqs, steps = setup_env.torchvision_plan(Version("2.14.1"))
    assert reqs == ["torchvision==0.29.1"] and steps == []
    reqs, steps = setup_env.torchvision_plan(Version("2.14.1+cpu"))  # a PyTorch-index build: its index too
    assert steps[0].argv[-2:] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert "torch==2.14.1" in steps[0].argv
    reqs, steps = setup_env.torchvision_plan(Version("2.99.0"))  # no known pair: say so, install nothing
    assert reqs == [] and steps[0].argv is None
    assert "python -m pip install torch==2.99.0 torchvision" in steps[0].notes[0].replace(sys.executable, "python")


def test_usage_errors_exit_2(tmp_path, checkout, capsys, monkeypatch, no_subprocess):
    assert setup_env.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a threestudio checkout" in capsys.readouterr().err
    assert setup_env.main([str(checkout), "--clone", "--dry-run"]) == 2
    assert "--clone needs an empty or new folder" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", open(__file__))  # not a terminal, no --yes: refuse to install
    assert setup_env.main([str(checkout)]) == 2
    assert "pass --yes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        setup_env.main([str(checkout), "--bogus"])
    assert e.value.code == 2


def test_clone_dry_run_shows_the_pinned_commit(tmp_path, capsys, no_subprocess):
    assert setup_env.main([str(tmp_path / "new"), "--clone", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"git clone {envset.THREESTUDIO_URL}" in out and f"checkout {envset.THREESTUDIO_COMMIT}" in out
    assert not (tmp_path / "new").exists()


def test_a_failing_step_stops_the_run(monkeypatch, capsys):
    steps = [setup_env.Step("fails", [sys.executable, "-c", "raise SystemExit(3)"]),
             setup_env.Step("never", [sys.executable, "-c", "raise SystemExit(0)"], is_check=True)]
    with pytest.raises(setup_env.SetupError, match=r"step 1 \(fails\) failed with exit status 3"):
        setup_env.run(steps)
    build = setup_env.Step("build", [sys.executable, "-c", "raise SystemExit(4)"], may_fail=True)
    check = setup_env.Step("check", [sys.executable, "-c", "raise SystemExit(1)"], is_check=True)
    assert setup_env.run([build, check]) == 1  # a failed build is reported; the check decides
    assert "failed (exit status 4)" in capsys.readouterr().out


def test_console_script_is_declared():
    r = subprocess.run([sys.executable, "-m", "threestudio_rfds.adapter.setup_env", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage: rfds-setup" in r.stdout and "--dry-run" in r.stdout, r.stderr
    setup_py = open(__file__.replace("tests/test_setup_env.py", "setup.py")).read()
    assert '"rfds-setup=threestudio_rfds.adapter.setup_env:main"' in setup_py


def test_docs_list_every_requirement_rfds_setup_replaces_or_skips():
    doc = open(__file__.replace("tests/test_setup_env.py", "docs/threestudio.md"), encoding="utf-8").read()
    table = doc[doc.index("| entry | what rfds-setup does | why |"):doc.index("### The check")]
    for name in envset.REQUIREMENT_POLICY:
        assert f"`{name}" in table, name


# ---------------------------------------------------------------- preflight, last line, Ctrl-C (issues 20, 21)
def test_a_read_only_checkout_is_refused_before_pip(checkout, capsys, monkeypatch, read_only_copy):
    ro = read_only_copy(checkout)
    monkeypatch.setattr(setup_env, "run", lambda steps: pytest.fail("a step ran"))
    for extra in (["--yes"], ["--dry-run"]):
        assert setup_env.main([str(ro), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rfds-setup: error: the link step would fail, so nothing was installed: ") and \
            f"{ro}/custom is not writable" in err and err.count("\n") == 1, err


def test_a_foreign_link_is_refused_before_pip_unless_force(checkout, tmp_path, capsys, no_subprocess):
    (tmp_path / "older").mkdir()
    os.symlink(tmp_path / "older", checkout / "custom" / "threestudio-rfds")
    assert setup_env.main([str(checkout), "--yes"]) == 2
    err = capsys.readouterr().err
    assert "links to" in err and "(or pass --force)" in err
    assert setup_env.main([str(checkout), "--dry-run", "--force"]) == 0


def _fake_plan(monkeypatch, pip_argv):
    steps = [setup_env.Step("install the known-good set (stand-in)", pip_argv),
             setup_env.Step("link", action=lambda: None),
             setup_env.Step("check the environment", [sys.executable, "-c", "pass"], is_check=True)]
    monkeypatch.setattr(setup_env, "plan", lambda root, cloned_later=False, force=False: steps)


@pytest.mark.parametrize("gpu", [False, True])
def test_the_last_line_says_whether_this_machine_can_train(checkout, capsys, monkeypatch, gpu):
    _fake_plan(monkeypatch, [sys.executable, "-c", "pass"])
    monkeypatch.setattr(envcheck, "no_gpu_reason", lambda: None if gpu else "no CUDA: torch is a CPU build")
    assert setup_env.main([str(checkout), "--yes"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    if gpu:
        assert last.startswith(f"rfds-setup: done; train with: cd {checkout} && python launch.py --config"), last
    else:
        assert last.startswith("rfds-setup: done; this machine has no CUDA; training needs a GPU (torch is a CPU "
                               "build)"), last


# rfds-setup with its pip step replaced by a stand-in that waits and, on Ctrl-C, exits as pip does
# ("ERROR: Operation cancelled by user", status 1); in its own session, as a terminal's process group
PIP_STANDIN = ("import sys, time\\ntry:\\n    print('PIP', flush=True)\\n    time.sleep(120)\\n"
               "except KeyboardInterrupt:\\n    sys.exit('ERROR: Operation cancelled by user')")
CTRL_C_CHILD = f"""
import sys
from threestudio_rfds.adapter import setup_env
steps = [setup_env.Step("install the known-good set (stand-in)", [sys.executable, "-c", "{PIP_STANDIN}"]),
         setup_env.Step("link", action=lambda: print("LINKED")),
         setup_env.Step("check the environment", [sys.executable, "-c", "pass"], is_check=True)]
setup_env.plan = lambda root, cloned_later=False, force=False: steps
sys.exit(setup_env.main([sys.argv[1], "--yes"]))
"""


def test_ctrl_c_during_pip_is_one_line_saying_rerunning_is_safe(checkout):
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, str(checkout)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in p.stdout:
            if line.strip() == "PIP":
                break
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (out, err)
    assert "Traceback" not in err and "LINKED" not in out, err
    lines = err.strip().splitlines()
    assert lines[:-1] == ["ERROR: Operation cancelled by user"], lines  # the stand-in's own line, then ours
    line = lines[-1]
    assert line.startswith("rfds-setup: interrupted during step 1 (install the known-good set (stand-in)); "
                           "no step finished, the later ones did not run; re-running is safe"), line
    assert line.endswith(f"rfds-setup {checkout} --yes")
