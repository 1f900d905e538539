"""The adapter's threestudio-free parts: the package imports without threestudio, rfds-link,
Perp-Neg velocities, guidance-evaluation images and the prompt-cache worker.  Runs everywhere
(CI has no threestudio)."""
import os
import subprocess
import sys

import pytest
import torch

from threestudio_rfds import flow
from threestudio_rfds.adapter import link_cli as rfds_link
from threestudio_rfds.adapter.cache_worker import (
    encode_to_threestudio_cache,
    options_tag,
    spawn_target,
    threestudio_prompt_hash,
)
from threestudio_rfds.adapter.compat import ThreestudioVersionError, check_threestudio_version
from threestudio_rfds.adapter.evaluation import guidance_eval_images
from threestudio_rfds.adapter.perp_neg import PerpNegModel, perp_neg_cond, perpendicular_component
from threestudio_rfds.protocol import cfg_velocity

PACKAGE_DIR = os.path.dirname(rfds_link.PACKAGE_DIR + os.sep)


# ---------------------------------------------------------------- import without threestudio
def test_core_and_adapter_import_without_threestudio():
    code = (
        "import sys; sys.modules['threestudio'] = None\n"  # any `import threestudio` now fails
        "import threestudio_rfds, threestudio_rfds.rfds, threestudio_rfds.backends, threestudio_rfds.text\n"
        "import threestudio_rfds.adapter, threestudio_rfds.adapter.link\n"
        "assert not [m for m in sys.modules if m.startswith('threestudio.')]\n"
        "try:\n    threestudio_rfds.register_threestudio()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("THREESTUDIO_ROOT", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR threestudio_rfds.adapter needs threestudio" in r.stdout
    assert "docs/threestudio.md" in r.stdout


@pytest.mark.parametrize("found", [None, "0.1.9", "not-a-version"])
def test_version_check_rejects_old_threestudio(found):
    with pytest.raises(ThreestudioVersionError, match=r"needs threestudio >= 0\.2\.0"):
        check_threestudio_version(found)


@pytest.mark.parametrize("found", ["0.2.0", "0.2.3", "1.0"])
def test_version_check_accepts(found):
    check_threestudio_version(found)


# ---------------------------------------------------------------- rfds-link
def _checkout(tmp_path, version='"0.2.3"'):
    root = tmp_path / "threestudio"
    (root / "threestudio").mkdir(parents=True)
    (root / "custom").mkdir()
    (root / "launch.py").write_text("# launch\n")
    (root / "threestudio" / "__init__.py").write_text(f"__modules__ = {{}}\n__version__ = {version}\n")
    return root


def test_link_creates_and_reuses_the_symlink(tmp_path, capsys):
    root = _checkout(tmp_path)
    assert rfds_link.main([str(root)]) == 0
    target = root / "custom" / "threestudio-rfds"
    assert target.is_symlink() and os.path.realpath(target) == os.path.realpath(PACKAGE_DIR)
    assert (target / "configs" / "rfds-sd3.yaml").is_file()
    out = capsys.readouterr().out
    assert "ok: threestudio 0.2.3" in out and "ok: diffusers" in out and "linked" in out
    assert rfds_link.main([str(root)]) == 0  # idempotent


def test_link_creates_custom_in_a_fresh_clone(tmp_path):
    root = _checkout(tmp_path)
    (root / "custom").rmdir()  # git keeps no empty folder
    assert rfds_link.main([str(root)]) == 0
    assert os.path.realpath(root / "custom" / "threestudio-rfds") == os.path.realpath(PACKAGE_DIR)


def test_link_refuses_other_link_without_force(tmp_path, capsys):
    root = _checkout(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(other, root / "custom" / "threestudio-rfds")
    assert rfds_link.main([str(root)]) == 1
    assert "--force" in capsys.readouterr().err
    assert rfds_link.main([str(root), "--force"]) == 0
    assert os.path.realpath(root / "custom" / "threestudio-rfds") == os.path.realpath(PACKAGE_DIR)


def test_link_never_deletes_a_directory(tmp_path, capsys):
    root = _checkout(tmp_path)
    (root / "custom" / "threestudio-rfds").mkdir()
    (root / "custom" / "threestudio-rfds" / "keep.txt").write_text("x")
    assert rfds_link.main([str(root), "--force"]) == 1
    assert "not a link" in capsys.readouterr().err
    assert (root / "custom" / "threestudio-rfds" / "keep.txt").exists()


@pytest.mark.parametrize("version,msg", [('"0.1.0"', "needs threestudio >= 0.2.0"), (None, "no __version__")])
def test_link_rejects_old_threestudio(tmp_path, capsys, version, msg):
    root = _checkout(tmp_path, version or '"0.2.3"')
    if version is None:
        (root / "threestudio" / "__init__.py").write_text("__modules__ = {}\n")
    assert rfds_link.main([str(root)]) == 1
    assert msg in capsys.readouterr().err
    assert not (root / "custom" / "threestudio-rfds").exists()


def test_link_rejects_a_folder_that_is_not_threestudio(tmp_path, capsys):
    assert rfds_link.main([str(tmp_path)]) == 1
    assert "is not a threestudio checkout" in capsys.readouterr().err


# ---------------------------------------------------------------- Perp-Neg
@pytest.fixture(scope="module")
def sd3(tiny_sd3_path):
    from threestudio_rfds.backends.sd3 import SD3Backend

    return SD3Backend(tiny_sd3_path, device="cpu")


def _cond(b, seed):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(b, 5, 48, generator=g), "pooled_prompt_embeds": torch.randn(b, 40, generator=g)}


def test_perpendicular_component_is_orthogonal():
    x, y = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    p = perpendicular_component(x, y)
    assert torch.allclose((p * y).sum((1, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(perpendicular_component(y, y), torch.zeros_like(y), atol=1e-5)


@pytest.mark.parametrize("batched", [True, False])
def test_perp_neg_with_zero_weights_is_plain_cfg(sd3, batched):
    b = 2
    pos, unc = _cond(b, 0), _cond(b, 1)
    neg = {k: torch.stack([_cond(b, 2)[k], _cond(b, 3)[k]], 1) for k in pos}
    x, t = torch.randn(b, 16, 8, 8), torch.tensor([0.3, 0.8])
    model = PerpNegModel(sd3, 7.0, batched=batched)
    v = model.velocity(x, t, perp_neg_cond(pos, unc, neg, torch.zeros(b, 2)))
    assert torch.allclose(v, cfg_velocity(sd3, x, t, pos, unc, 7.0), atol=1e-4)


def test_perp_neg_removes_the_negative_direction(sd3):
    b, w = 2, 3.0
    pos, unc = _cond(b, 0), _cond(b, 1)
    neg = {k: torch.stack([_cond(b, 2)[k], _cond(b, 3)[k]], 1) for k in pos}
    weights = torch.tensor([[-1.0, 0.0], [0.0, -2.0]])
    x, t = torch.randn(b, 16, 8, 8), torch.tensor([0.5, 0.5])
    v = PerpNegModel(sd3, w).velocity(x, t, perp_neg_cond(pos, unc, neg, weights))
    v_pos, v_unc = sd3.velocity(x, t, pos), sd3.velocity(x, t, unc)
    v_n0 = sd3.velocity(x, t, {k: n[:, 0] for k, n in neg.items()})
    v_n1 = sd3.velocity(x, t, {k: n[:, 1] for k, n in neg.items()})
    e = v_pos - v_unc
    expect = v_unc + w * (e + weights[:, :1, None, None] * perpendicular_component(v_n0 - v_unc, e)
                          + weights[:, 1:, None, None] * perpendicular_component(v_n1 - v_unc, e))
    assert torch.allclose(v, expect, atol=1e-4)
    assert not torch.allclose(v, cfg_velocity(sd3, x, t, pos, unc, w), atol=1e-3)


def test_perp_neg_cond_checks_shapes():
    pos = {"a": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"\[B=2, K=2"):
        perp_neg_cond(pos, pos, {"a": torch.zeros(2, 3)}, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="share keys"):
        perp_neg_cond(pos, {"b": torch.zeros(2, 3)}, {"a": torch.zeros(2, 2, 3)}, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="perp_neg_cond"):
        PerpNegModel(type("M", (), {"convention": flow.sd3_convention()})(), 1.0).velocity(
            torch.zeros(1, 1), torch.zeros(1), {"a": torch.zeros(1)})


# ---------------------------------------------------------------- guidance_eval images
def test_eval_images_recover_x0_for_the_exact_velocity(sd3):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.55, 0.9])
    x_t = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)  # the straight path's velocity, constant in t
    calls = []

    def velocity(x, tt, sl):
        calls.append(sl)
        return v[sl]

    ev = guidance_eval_images(sd3.decode, velocity, x_t, t, v, bs=2, num_steps=10)
    assert ev["bs"] == 2 and ev["noise_levels"] == pytest.approx([0.2, 0.55])
    want = sd3.decode(x0[:2]).permute(0, 2, 3, 1)
    for key in ("imgs_noisy", "imgs_1step", "imgs_1orig", "imgs_final"):
        assert ev[key].shape == (2, 16, 16, 3) and 0 <= ev[key].min() and ev[key].max() <= 1
    assert torch.allclose(ev["imgs_1orig"], want, atol=1e-4)
    assert torch.allclose(ev["imgs_final"], want, atol=1e-4)
    assert not torch.allclose(ev["imgs_noisy"], want, atol=1e-2)
    assert {c.start for c in calls} == {0, 1}  # each sample integrated with its own condition
    with pytest.raises(ValueError, match="eval_num_steps"):
        guidance_eval_images(sd3.decode, velocity, x_t, t, v, bs=1, num_steps=0)


# ---------------------------------------------------------------- cache worker
def test_cache_worker_writes_threestudio_layout(tiny_sd3_path, tmp_path):
    from threestudio_rfds.text import encode_prompts

    prompts = ["a cat, front view", ""]
    opts = {"device": "cpu", "dtype": "fp32", "use_t5": False, "max_sequence_length": 8}
    spawn_target("sd3", opts)(tiny_sd3_path, prompts, str(tmp_path))
    ref = encode_prompts("sd3", tiny_sd3_path, prompts, device="cpu", dtype="fp32", use_t5=False, max_sequence_length=8)
    for i, p in enumerate(prompts):
        item = torch.load(tmp_path / f"{threestudio_prompt_hash(tiny_sd3_path, p)}.pt")
        assert set(item) == {"prompt_embeds", "pooled_prompt_embeds"}
        assert torch.equal(item["prompt_embeds"], ref["prompt_embeds"][i])
        assert torch.equal(item["pooled_prompt_embeds"], ref["pooled_prompt_embeds"][i])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cache_worker_clip_layout_is_threestudios(tiny_instaflow_path, tmp_path):
    encode_to_threestudio_cache("instaflow", {"device": "cpu", "dtype": "fp32"}, tiny_instaflow_path, ["a dog"], str(tmp_path))
    item = torch.load(tmp_path / f"{threestudio_prompt_hash(tiny_instaflow_path, 'a dog')}.pt")
    assert torch.is_tensor(item) and item.shape == (77, 32)


def test_options_tag_separates_settings():
    a = options_tag("sd3", {"use_t5": True, "max_sequence_length": 256})
    assert a == options_tag("sd3", {"max_sequence_length": 256, "use_t5": True})
    assert a != options_tag("sd3", {"use_t5": False, "max_sequence_length": 256})
    assert a != options_tag("instaflow", {"use_t5": True, "max_sequence_length": 256})


# ---------------------------------------------------------------- CPU placeholders
def _load(name, path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_placeholders_raise_when_used():
    here = os.path.join(os.path.dirname(__file__), "placeholders")
    tcnn = _load("placeholder_tinycudann", os.path.join(here, "tinycudann.py"))
    assert tcnn.free_temporary_memory() is None  # what threestudio's cleanup() calls
    with pytest.raises(RuntimeError, match="tinycudann.Encoding is not available"):
        tcnn.Encoding
    assert not hasattr(tcnn, "__path__")  # dunder look-ups stay AttributeErrors
    dr = _load("placeholder_nvdiffrast_torch", os.path.join(here, "nvdiffrast", "torch.py"))
    with pytest.raises(RuntimeError, match="RasterizeCudaContext is not available"):
        dr.RasterizeCudaContext(device="cpu")
    with pytest.raises(RuntimeError, match="nvdiffrast.rasterize is not available"):
        dr.rasterize
