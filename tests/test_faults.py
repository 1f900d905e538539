"""Bad inputs and faults (issue 11): nothing silent, no lost work.

The core API (non-finite inputs, conditioning and model output; option types), the embedding
cache (permissions, shape/dtype, a full disk, a second user), and ``rfds-2d`` / ``rfds-edit``
(usage errors before any work, atomic output folders, Ctrl-C as a real SIGINT, a full disk,
non-finite steps).  A full disk is a real 64 KiB tmpfs where ``mount`` works (root), and a
patched write raising ENOSPC everywhere."""
import errno
import functools
import glob
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import threestudio_rfds.text.sd3 as text_sd3
from analytic_cases import labels, mixture
from full_disk import fill
from threestudio_rfds import flow, rfds as R
from threestudio_rfds.checks import NonFiniteError
from threestudio_rfds.text import encode_prompts
from threestudio_rfds.text.cache import EmbeddingCache
from threestudio_rfds.tools import edit, playground

B = 3


# ---------------------------------------------------------------- core API
class EmbeddingModel:
    """v = x·mean(e): a velocity model conditioned on float embeddings (as the real ones)."""

    convention = flow.sd3_convention(3.0)

    def velocity(self, x_t, t, cond):
        return x_t * cond["e"].mean(-1, keepdim=True)


def _emb(b=B, bad=None):
    e = torch.ones(b, 4)
    if bad is not None:
        e[0, 1] = bad
    return {"e": e}


@pytest.mark.parametrize("fn", [R.rfds, R.rfds_rev])
@pytest.mark.parametrize("which", ["cond", "uncond"])
def test_nonfinite_prompt_embeddings_are_named(fn, which):
    cond, uncond = (_emb(bad=float("nan")), _emb()) if which == "cond" else (_emb(), _emb(bad=float("inf")))
    with pytest.raises(NonFiniteError, match=rf"^{which}\['e'\] contains 1 non-finite values .*prompt embeddings"):
        fn(EmbeddingModel(), torch.randn(B, 4), cond, uncond, 3.0)


def test_nonfinite_x0_is_named_and_zero_mode_still_counts_model_output():
    x0 = torch.randn(B, 4)
    x0[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^x0 contains 1 non-finite"):
        R.rfds(EmbeddingModel(), x0, _emb(), _emb(), 3.0)

    class Overflow(EmbeddingModel):
        def velocity(self, x_t, t, cond):
            return torch.full_like(x_t, float("inf"))

    with pytest.raises(NonFiniteError, match=r"v̂ \(the model's CFG velocity\) contains 12 non-finite .*bf16/fp32"):
        R.rfds(Overflow(), torch.randn(B, 4), _emb(), _emb(), 3.0)
    out = R.rfds(Overflow(), torch.randn(B, 4), _emb(), _emb(), 3.0, nonfinite="zero")  # asked for: counted
    assert int(out.num_nonfinite) == 12 and torch.isfinite(out.loss)


@pytest.mark.parametrize("kw, msg", [
    (dict(grad_clip=float("nan")), r"grad_clip must be > 0 or None \(a finite number\), got nan"),
    (dict(grad_clip=float("inf")), r"grad_clip must be > 0 or None"),
    (dict(nonfinite="ignore"), r"nonfinite must be one of \['error', 'zero'\], got 'ignore'"),
    (dict(shift=float("nan")), r"shift must be a finite number > 0, got nan"),
    (dict(min_step_percent=float("nan")), r"min_step_percent must be a number in \[0.0, 1.0\], got nan"),
    (dict(n_inner=True), r"n_inner must be an integer >= 0, got True"),
    (dict(inner_step=float("nan")), r"inner_step must be 'auto' or a number > 0, got nan"),
])
def test_bad_options_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        model = mixture(flow.sd3_convention(kw.pop("shift", 3.0)))
        R.rfds_rev(model, torch.randn(B, 2), labels(B, 1), labels(B, -1), 3.0, **kw)


def test_numpy_scalars_are_numbers():
    out = R.rfds_rev(mixture(flow.sd3_convention(1.0)), torch.randn(B, 2), labels(B, 1), labels(B, -1),
                     np.float32(3.0), min_step_percent=np.float32(0.1), max_step_percent=np.float64(0.9),
                     n_inner=np.int64(2), grad_clip=np.float32(5.0))
    assert torch.isfinite(out.loss) and 0.1 - 1e-6 <= float(out.t.min()) <= float(out.t.max()) <= 0.9 + 1e-6


@pytest.mark.parametrize("kw, msg", [
    (dict(x0=torch.ones(B, 2, dtype=torch.long)), r"x0 must be a floating-point tensor, got torch.int64"),
    (dict(eps=torch.ones(B, 2, dtype=torch.long)), r"eps must be a floating-point tensor, got torch.int64"),
    (dict(cond=torch.ones(B)), r"cond must be a dict of tensors \{name: \[B, ...\]\}, got Tensor"),
    (dict(uncond={"label": [1, 1, 1]}), r"uncond must be a dict of tensors .*got \{'label': 'list'\}"),
    (dict(generator=5), r"generator must be a torch.Generator or None, got int"),
])
def test_wrong_types_are_named(kw, msg):
    args = dict(x0=torch.randn(B, 2), cond=labels(B, 1), uncond=labels(B, -1))
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    with pytest.raises(ValueError, match=msg):
        R.rfds(mixture(flow.sd3_convention(3.0)), args["x0"], args["cond"], args["uncond"], 3.0, **kw)


def test_irfds_update_checks_its_condition():
    with pytest.raises(NonFiniteError, match=r"^cond\['e'\]"):
        R.irfds_update(EmbeddingModel(), torch.randn(B, 4), torch.randn(B, 4), torch.full((B,), 0.5),
                       _emb(bad=float("nan")))


@pytest.mark.parametrize("prompts", [123, [], ["a", None], b"bytes"])
def test_non_string_prompts_are_named(prompts):
    with pytest.raises(ValueError, match=r"prompts must be a string or a non-empty list of strings, got"):
        encode_prompts("sd3", "/nonexistent", prompts)


# ---------------------------------------------------------------- the embedding cache
def _encode(path, d, prompts=("a cat",)):
    return encode_prompts("sd3", path, list(prompts), cache_dir=str(d), device="cpu", max_sequence_length=8)


def _entries(d):
    return sorted(glob.glob(os.path.join(str(d), "*.safetensors")))


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_cache_entries_follow_the_umask(tiny_sd3_path, tmp_path, mask):
    old = os.umask(mask)
    try:
        _encode(tiny_sd3_path, tmp_path / "c")
    finally:
        os.umask(old)
    (entry,) = _entries(tmp_path / "c")
    assert os.stat(entry).st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("damage", ["shape", "dtype"])
def test_entry_with_consistent_metadata_but_wrong_shape_or_dtype_is_recomputed(tiny_sd3_path, tmp_path, counted,
                                                                               damage, caplog):
    good = _encode(tiny_sd3_path, tmp_path / "c")
    (entry,) = _entries(tmp_path / "c")
    from safetensors import safe_open

    with safe_open(entry, "pt") as f:
        meta = json.loads(f.metadata()["entry"])
    bad = {k: v[0] for k, v in good.items()}
    bad["prompt_embeds"] = bad["prompt_embeds"][:5] if damage == "shape" else bad["prompt_embeds"].double()
    EmbeddingCache(str(tmp_path / "c")).save(meta["spec"], meta["prompt"], bad)  # checksum and spec agree
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):
        again = _encode(tiny_sd3_path, tmp_path / "c")
    assert len(counted) == 2 and "recomputing" in caplog.text
    for k in good:
        assert again[k].shape == good[k].shape and again[k].dtype == good[k].dtype


def test_cache_without_expectation_recomputes_disagreeing_entries(tmp_path):
    cache, spec = EmbeddingCache(str(tmp_path)), {"family": "test"}
    cache.save(spec, "a", {"e": torch.zeros(4, 3)})
    cache.save(spec, "b", {"e": torch.zeros(5, 3)})  # from an older encoder: disagrees with "a"
    calls = []

    def compute(ps):
        calls.append(ps)
        return {"e": torch.ones(len(ps), 4, 3)}

    out = cache.get_or_compute(spec, ["a", "b"], compute)
    assert calls == [["a", "b"]] and out["e"].shape == (2, 4, 3)


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    """A folder on a full disk: the tmpfs above, or any folder whose safetensors writes fail."""
    if request.param == "tmpfs":
        d = request.getfixturevalue("tmpfs")
        (d / "cache").mkdir()
        fill(d)
        return d / "cache"
    import safetensors.torch

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    return tmp_path / "cache"


def test_full_disk_returns_the_embeddings_with_one_warning(tiny_sd3_path, tmp_path, full_disk, caplog):
    fresh = encode_prompts("sd3", tiny_sd3_path, ["a cat", "a dog"], device="cpu", max_sequence_length=8)
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):
        out = _encode(tiny_sd3_path, full_disk, ["a cat", "a dog"])
    for k in fresh:
        torch.testing.assert_close(out[k], fresh[k])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not store 2 of 2" in warnings[0] and "\n" not in warnings[0]
    assert not _entries(full_disk) and not glob.glob(os.path.join(str(full_disk), ".tmp-*"))


def test_cache_folder_that_cannot_be_created_costs_one_warning(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="threestudio_rfds"):
        cache = EmbeddingCache(str(tmp_path / "file" / "cache"))
        out = cache.get_or_compute({"family": "test"}, ["a", "b", "a"],
                                   lambda ps: {"e": torch.stack([torch.full((2,), float(len(p) + i)) for i, p in
                                                                 enumerate(ps)])})
    assert out["e"][:, 0].tolist() == [1.0, 2.0, 1.0]
    assert len(caplog.records) == 1 and "computed uncached" in caplog.records[0].getMessage()


def test_nonfinite_text_embeddings_are_an_error_and_never_cached(tiny_sd3_path, tmp_path, monkeypatch):
    real = text_sd3.encode_sd3_prompts

    @functools.wraps(real)
    def broken(path, prompts, **kw):
        out = real(path, prompts, **kw)
        out["prompt_embeds"][-1, 3, 0] = float("nan")
        return out

    monkeypatch.setattr(text_sd3, "encode_sd3_prompts", broken)
    with pytest.raises(NonFiniteError, match=r"text embedding 'prompt_embeds' of prompt 'a dog' contains 1 non-finite"):
        _encode(tiny_sd3_path, tmp_path / "c", ["a cat", "a dog"])
    assert not _entries(tmp_path / "c")


def _second_user(d, spec, conn):
    """Runs as uid/gid 65534 (forked after the imports): a hit, then a miss."""
    try:
        os.setgid(65534)
        os.setuid(65534)
        cache = EmbeddingCache(d)
        hit = cache.get_or_compute(spec, ["shared"], lambda ps: 1 / 0)
        miss = cache.get_or_compute(spec, ["new"], lambda ps: {"e": torch.full((len(ps), 2), 7.0)})
        conn.send((float(hit["e"].sum()), float(miss["e"].sum())))
    except BaseException as e:  # report it to the test
        conn.send(repr(e))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root to act as a second user")
def test_a_cache_folder_shared_with_a_second_user(tmp_path):
    import filelock  # noqa: F401  (imported before the fork)
    import safetensors.torch  # noqa: F401

    d = tempfile.mkdtemp(prefix="rfds-shared-cache-")  # /tmp: reachable by the second user
    os.chmod(d, 0o777)
    spec = {"family": "test"}
    old = os.umask(0o022)
    try:
        EmbeddingCache(d).get_or_compute(spec, ["shared"], lambda ps: {"e": torch.ones(len(ps), 2)})  # + .lock
    finally:
        os.umask(old)
    parent, child = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_second_user, args=(d, spec, child))
    p.start()
    got = parent.recv() if parent.poll(60) else "timeout"
    p.join(10)
    assert got == (2.0, 14.0)  # the hit is read (not a 0600 entry), the miss is computed and stored


# ---------------------------------------------------------------- rfds-2d / rfds-edit: usage errors
SMALL = ["--steps", "2", "--height", "16", "--width", "16", "--no-progress", "--particles", "2", "--save-every", "1"]


def _tool(module, argv, capsys):
    code = module.main(argv)
    return code, capsys.readouterr().err


def _siblings(out):
    return glob.glob(os.path.join(os.path.dirname(str(out)), f".{os.path.basename(str(out))}.*"))


@pytest.mark.parametrize("extra, msg", [
    (["--save-every", "-1"], "--save-every must be >= 1, got -1"),
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number > 0, got nan"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number > 0, got -1.0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["--min-step-percent", "1.5"], "--min-step-percent must be a number in [0, 1], got 1.5"),
    (["--min-step-percent", "0.9", "--max-step-percent", "0.5"], "(0.9) must be <= --max-step-percent (0.5)"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--n-inner", "-1"], "--n-inner must be >= 0, got -1"),
    (["--height", "0"], "--height must be >= 1, got 0"),
    (["--dtype", "fp8"], "--dtype must be one of ['auto', 'fp32'"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--nonfinite", "ignore"], "--nonfinite must be one of ['error', 'zero'], got 'ignore'"),
])
def test_rfds_2d_usage_errors_before_any_work(tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    argv = ["--prompt", "x", "--pretrained", str(tmp_path / "no-model"), "--out", str(out), *SMALL, *extra]
    code, err = _tool(playground, argv, capsys)
    assert code == 2 and err.startswith("rfds-2d: error: ") and msg in err and err.count("\n") == 1
    assert not out.exists() and not _siblings(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys):
    code, err = _tool(playground, ["--prompt", "x", "--device", "cuda", "--out", str(tmp_path / "o"), *SMALL], capsys)
    assert code == 2 and "--device cuda asked for CUDA but none is available" in err


def test_text_cache_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = _tool(playground, ["--prompt", "x", "--text-cache", str(tmp_path / "f"), "--out", str(tmp_path / "o"),
                                   *SMALL], capsys)
    assert code == 2 and "--text-cache" in err and "is not a folder" in err


@pytest.mark.parametrize("case", ["file", "full-folder", "foreign-overwrite", "parent-is-file"])
@pytest.mark.parametrize("tool", ["rfds-2d", "rfds-edit"])
def test_out_is_checked_before_any_work(tmp_path, capsys, case, tool):
    out, extra = tmp_path / "o", []
    if case == "file":
        out.write_text("not a folder")
    elif case in ("full-folder", "foreign-overwrite"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        extra = ["--overwrite"] if case == "foreign-overwrite" else []
    else:
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "o"
    before = sorted(os.listdir(tmp_path))
    model = ["--pretrained", str(tmp_path / "no-model")]  # a model load would fail with another message
    if tool == "rfds-2d":
        code, err = _tool(playground, ["--prompt", "x", "--out", str(out), *model, *SMALL, *extra], capsys)
    else:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in.png")
        before = sorted(os.listdir(tmp_path))
        code, err = _tool(edit, ["--image", str(tmp_path / "in.png"), "--source-prompt", "a", "--target-prompt", "b",
                                 "--out", str(out), *model, "--height", "32", "--width", "32", *extra], capsys)
    want = {"file": "exists and is not a folder", "full-folder": "already holds files; choose another folder or "
            "pass --overwrite", "foreign-overwrite": "is not an output folder of this tool; it is never replaced",
            "parent-is-file": "cannot create the output folder"}[case]
    assert code == 2 and err.startswith(f"{tool}: error: --out ") and want in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, nothing removed
    if case in ("full-folder", "foreign-overwrite"):
        assert os.listdir(out) == ["notes.txt"]


@pytest.mark.parametrize("extra, msg", [
    (["--reg-weight", "nan"], "--reg-weight must be a finite number, got nan"),
    (["--reg-weight", "-1"], "--reg-weight must be >= 0, got -1.0"),
    (["--edit-rfds-lr", "0"], "--edit-rfds-lr must be a finite number > 0, got 0.0"),
    (["--sample-guidance", "inf"], "--sample-guidance must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
])
def test_rfds_edit_usage_errors(tmp_path, capsys, extra, msg):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in.png")
    code, err = _tool(edit, ["--image", str(tmp_path / "in.png"), "--source-prompt", "a", "--target-prompt", "b",
                             "--pretrained", str(tmp_path / "m"), "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and err.startswith("rfds-edit: error: ") and msg in err
    assert not (tmp_path / "o").exists()


def test_help_states_the_real_default_output_folders(capsys):
    with pytest.raises(SystemExit):
        playground.main(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert "outputs/rfds-2d/<prompt>-<algorithm>-<space>" in text
    args = playground.parser().parse_args(["--prompt", "a DSLR photo of a hamburger"])
    playground.check_args(args)
    assert args.out == os.path.join("outputs", "rfds-2d", "a_dslr_photo_of_a_hamburger-rfds-latent")
    assert args.out in text  # the example in --help is the real default


# ---------------------------------------------------------------- rfds-2d: runs, interruptions, faults
def _run2d(path, out, capsys, *extra):
    return _tool(playground, ["--prompt", "a cat", "--model", "sd3", "--pretrained", path, "--out", str(out),
                              *SMALL, *extra], capsys)


def _record(out):
    with open(os.path.join(str(out), "run.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def three_particle_run(tiny_sd3_path, tmp_path_factory):
    """A finished rfds-2d run with 3 particles (copied by each test that needs a previous run)."""
    out = tmp_path_factory.mktemp("previous") / "o"
    assert playground.main(["--prompt", "a cat", "--model", "sd3", "--pretrained", tiny_sd3_path, "--out", str(out),
                            *SMALL, "--particles", "3"]) == 0
    return out


@pytest.fixture
def previous_run(three_particle_run, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(three_particle_run, out)
    return out


def test_overwrite_replaces_the_whole_previous_run(tiny_sd3_path, previous_run, capsys):
    out = previous_run
    assert (out / "final_2.png").exists()
    code, err = _run2d(tiny_sd3_path, out, capsys)  # exists: refused, before any work
    assert code == 2 and "pass --overwrite" in err and (out / "final_2.png").exists()
    assert _run2d(tiny_sd3_path, out, capsys, "--overwrite", "--seed", "1")[0] == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("final_")) == ["final_0.png", "final_1.png",
                                                                           "final_grid.png"]
    assert _record(out)["settings"]["seed"] == 1 and _record(out)["status"] == "complete"
    assert not _siblings(out)


def test_ctrl_c_while_writing_keeps_the_previous_run(tiny_sd3_path, previous_run, capsys, monkeypatch):
    out = previous_run
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(playground.images, "save_gif", interrupted)
    code, err = _run2d(tiny_sd3_path, out, capsys, "--overwrite", "--seed", "5")
    assert code == 130 and "interrupted while writing the outputs; nothing saved" in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before and not _siblings(out)


def test_outputs_on_a_full_disk_leave_nothing_behind(tiny_sd3_path, tmpfs, capsys):
    (tmpfs / "x").mkdir()
    fill(tmpfs)
    out = tmpfs / "x" / "o"
    code, err = _run2d(tiny_sd3_path, out, capsys)
    assert code == 1 and "cannot write the outputs" in err and "No space left on device" in err
    assert os.listdir(tmpfs / "x") == []


class _NaNAfter:
    """Wraps a backend: its velocity turns NaN from the ``n``-th call on."""

    def __init__(self, backend, n):
        self.backend, self.n, self.calls = backend, n, 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def velocity(self, x_t, t, cond):
        self.calls += 1
        v = self.backend.velocity(x_t, t, cond)
        return v * float("nan") if self.calls >= self.n else v


def nan_from_step(monkeypatch, n):
    real = playground.common.load_model
    monkeypatch.setattr(playground.common, "load_model", lambda *a, **k: _NaNAfter(real(*a, **k), n))


def test_nonfinite_step_saves_the_steps_done_as_failed(tiny_sd3_path, tmp_path, capsys, monkeypatch):
    nan_from_step(monkeypatch, 3)
    out = tmp_path / "o"
    code, err = _run2d(tiny_sd3_path, out, capsys, "--steps", "4")
    assert code == 1 and "error: step 3: v̂ (the model's CFG velocity) contains" in err
    rec = _record(out)
    assert rec["status"] == "failed" and rec["completed_steps"] == 2 and "step 3" in rec["error"]
    assert rec["frame_steps"] == [0, 1, 2] and json.load(open(out / "history.json"))["step"] == [1, 2]


def test_nonfinite_zero_is_counted_recovery(tiny_sd3_path, tmp_path, capsys, monkeypatch):
    nan_from_step(monkeypatch, 2)
    code, _ = _run2d(tiny_sd3_path, tmp_path / "o", capsys, "--nonfinite", "zero")
    assert code == 0 and _record(tmp_path / "o")["status"] == "complete"


def test_sigint_mid_run_saves_a_coherent_partial_run(tiny_sd3_path, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "threestudio_rfds.tools.playground", "--prompt", "a cat", "--model", "sd3",
           "--pretrained", tiny_sd3_path, "--out", str(out), "--steps", "100000", "--save-every", "3",
           "--particles", "2", "--height", "16", "--width", "16", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for line in proc.stderr:  # wait until the optimisation runs
            if "optimising" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, err
    rec = _record(out)
    k = rec["completed_steps"]
    assert rec["status"] == "interrupted" and 1 <= k < 100000
    assert f"interrupted after step {k} of 100000" in err
    assert json.load(open(out / "history.json"))["step"] == list(range(1, k + 1))
    assert rec["frame_steps"][-1] == k and rec["final"]["loss"] > 0
    assert sorted(f for f in os.listdir(out) if f.startswith("final_")) == ["final_0.png", "final_1.png",
                                                                           "final_grid.png"]
    assert not _siblings(out)


def test_sigterm_acts_like_ctrl_c(tiny_sd3_path, tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM during step 3: the step is finished, then the three steps are saved."""
    real, calls = R.rfds, []

    def terminated(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(R, "rfds", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, err = _run2d(tiny_sd3_path, tmp_path / "o", capsys, "--steps", "5")
    assert code == 130 and "interrupted after step 3 of 5" in err
    assert _record(tmp_path / "o")["status"] == "interrupted" and _record(tmp_path / "o")["completed_steps"] == 3
    assert json.load(open(tmp_path / "o" / "history.json"))["step"] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored


# ---------------------------------------------------------------- rfds-edit: runs, interruptions, faults
def _edit(path, tmp_path, out, capsys, *extra):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    return _tool(edit, ["--image", str(tmp_path / "in.png"), "--source-prompt", "a cat", "--target-prompt", "a dog",
                        "--model", "sd3", "--pretrained", path, "--out", str(out), "--steps", "3",
                        "--sample-steps", "2", "--height", "16", "--width", "16", "--no-progress", *extra], capsys)


@pytest.mark.parametrize("fault", ["ctrl-c", "nan"])
def test_edit_fault_during_inversion_saves_nothing(tiny_sd3_path, tmp_path, capsys, monkeypatch, fault):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"tool": "rfds-edit"}))  # a previous run, replaceable
    real, calls = R.irfds_loss, []

    def faulty(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            if fault == "ctrl-c":
                raise KeyboardInterrupt
            raise NonFiniteError("v̂ (the model's velocity in the iRFDS loss) contains 3 non-finite values (NaN/inf)")
        return real(*a, **k)

    monkeypatch.setattr(R, "irfds_loss", faulty)
    code, err = _edit(tiny_sd3_path, tmp_path, out, capsys, "--overwrite")
    assert code == (130 if fault == "ctrl-c" else 1) and "nothing saved" in err
    assert os.listdir(out) == ["run.json"] and not _siblings(out)


def test_edit_completes_with_a_status(tiny_sd3_path, tmp_path, capsys):
    code, _ = _edit(tiny_sd3_path, tmp_path, tmp_path / "o", capsys)
    assert code == 0 and _record(tmp_path / "o")["status"] == "complete"
    comp = np.asarray(Image.open(tmp_path / "o" / "comparison.png").convert("L"))
    band = comp[: comp.shape[0] - 192]
    assert band.size and (band < 100).any() and (band == 255).mean() > 0.7  # dark title text on a white band
