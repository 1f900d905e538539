"""Registration with real threestudio (THREESTUDIO_ROOT): idempotent under both import names,
threestudio's own launch.py loader, name conflicts, rfds-link into a checkout, and the prompt
processor's spawn subprocess writing threestudio's on-disk cache."""
import os
import shutil
import warnings

import pytest
import torch

from ts_support import PACKAGE_DIR, load_custom_module, threestudio_root

pytestmark = pytest.mark.threestudio


def test_register_is_idempotent_and_complete(ts):
    import threestudio_rfds
    from threestudio_rfds.adapter import registered_names
    from threestudio_rfds.adapter.guidance import GUIDANCES, REFERENCE_ALIASES

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # re-registering our own classes is silent
        names = threestudio_rfds.register_threestudio()
        assert threestudio_rfds.register_threestudio() == names
    assert names == registered_names()
    for name, cls in {**GUIDANCES, **REFERENCE_ALIASES}.items():
        assert ts.find(name) is cls
    assert ts.find("sd3-prompt-processor") is ts.find("rfds-sd3-prompt-processor")


def test_launch_py_loads_the_folder_as_threestudio_rfds(ts):
    """threestudio's launch.py imports custom/<folder> under the module name 'threestudio-rfds'."""
    import sys

    from threestudio_rfds.adapter.guidance import RFDSSD3Guidance

    before = dict(ts.__modules__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_custom_module(threestudio_root(), PACKAGE_DIR) is True
        assert load_custom_module(threestudio_root(), PACKAGE_DIR) is True  # twice: still fine
    assert "threestudio-rfds" in sys.modules
    assert ts.__modules__ == before  # the same classes, nothing re-registered
    assert ts.find("rfds-sd3-guidance") is RFDSSD3Guidance


def test_name_taken_by_another_extension_is_skipped_with_a_warning(ts):
    import threestudio_rfds

    ours = ts.__modules__.pop("RFDS")

    class OtherExtensionsRFDS:  # what another extension registered under the same name
        pass

    ts.register("RFDS")(OtherExtensionsRFDS)
    try:
        with pytest.warns(RuntimeWarning, match="'RFDS' is already registered by .*OtherExtensionsRFDS"):
            names = threestudio_rfds.register_threestudio()
        assert "RFDS" not in names and "rfds-instaflow-guidance" in names
        assert ts.find("RFDS") is OtherExtensionsRFDS
    finally:
        ts.__modules__["RFDS"] = ours


def test_rfds_link_into_a_checkout_then_launch_loads_it(ts, tmp_path):
    from threestudio_rfds.adapter.link_cli import main

    root = tmp_path / "threestudio"
    (root / "custom").mkdir(parents=True)
    shutil.copy(os.path.join(threestudio_root(), "launch.py"), root / "launch.py")
    shutil.copytree(os.path.join(threestudio_root(), "threestudio"), root / "threestudio",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert main([str(root)]) == 0
    link = root / "custom" / "threestudio-rfds"
    assert os.path.realpath(link) == os.path.realpath(PACKAGE_DIR)
    assert load_custom_module(threestudio_root(), str(link)) is True
    assert ts.find("rfds-rev-sd3-guidance").__module__ == "threestudio_rfds.adapter.guidance"


def test_spawned_prompt_encoding_fills_threestudios_cache(ts, tiny_sd3_path, tmp_path, monkeypatch):
    from threestudio.models.prompt_processors.base import hash_prompt

    from threestudio_rfds.adapter.cache_worker import threestudio_prompt_hash
    from threestudio_rfds.text import encode_prompts

    monkeypatch.chdir(tmp_path)
    cfg = {"pretrained_model_name_or_path": tiny_sd3_path, "prompt": "a red cat", "spawn": True,
           "use_t5": False, "max_sequence_length": 16, "encode_dtype": "fp32"}
    proc = ts.find("rfds-sd3-prompt-processor")(cfg)  # encodes in threestudio's spawn subprocess
    cache = tmp_path / proc._cache_dir
    files = sorted(cache.glob("*.pt"))
    prompts = ["a red cat", "", *proc.prompts_vd]  # negative prompts are "" here
    assert {f.name for f in files} == {f"{hash_prompt(tiny_sd3_path, p)}.pt" for p in prompts}
    assert all(threestudio_prompt_hash(tiny_sd3_path, p) == hash_prompt(tiny_sd3_path, p) for p in prompts)
    pu = proc()
    ref = encode_prompts("sd3", tiny_sd3_path, ["a red cat", ""], device="cpu", dtype="fp32", use_t5=False,
                         max_sequence_length=16)
    ref = {k: v.to(pu.text_embeddings.device) for k, v in ref.items()}
    assert torch.allclose(pu.text_embeddings[0], ref["prompt_embeds"][0], atol=1e-4)
    assert torch.allclose(pu.pooled_embeddings[0], ref["pooled_prompt_embeds"][0], atol=1e-4)
    assert torch.allclose(pu.uncond_pooled_embeddings[0], ref["pooled_prompt_embeds"][1], atol=1e-4)
    assert pu.text_embeddings.shape == (1, 77 + 16, 48)

    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = ts.find("rfds-sd3-prompt-processor")(cfg)()  # cache hit: no new process, files untouched
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert torch.equal(again.pooled_embeddings_vd, pu.pooled_embeddings_vd)
    other = ts.find("rfds-sd3-prompt-processor")({**cfg, "spawn": False, "max_sequence_length": 8})
    assert other._cache_dir != proc._cache_dir and other().text_embeddings.shape == (1, 77 + 8, 48)


NOT_INSTALLED_SCRIPT = r'''
import importlib.util, os, sys
# hide an editable install of threestudio_rfds: the folder is then only a threestudio extension
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path_importer_cache.clear()

def main(root, placeholders, package_dir, model, workdir):
    if importlib.util.find_spec("threestudio_rfds") is not None:
        sys.exit(3)  # installed in a way this script cannot hide
    sys.path.insert(0, root)
    sys.path.append(placeholders)
    import threestudio
    spec = importlib.util.spec_from_file_location("threestudio_launch", os.path.join(root, "launch.py"))
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    assert launch.load_custom_module(package_dir)
    os.chdir(workdir)
    cfg = {"pretrained_model_name_or_path": model, "prompt": "a dog", "spawn": True, "encode_dtype": "fp32"}
    out = threestudio.find("rfds-instaflow-prompt-processor")(cfg)()
    print("SHAPE", tuple(out.text_embeddings.shape))

if __name__ == "__main__":
    main(*sys.argv[1:])
'''


def test_spawn_works_when_the_folder_is_only_cloned_into_custom(ts, tiny_instaflow_path, tmp_path):
    """launch.py loads custom/threestudio-rfds by file path; threestudio's spawn child must still
    find the encoding function (it imports it as threestudio_rfds.adapter.cache_worker)."""
    import subprocess
    import sys

    from ts_support import PLACEHOLDERS

    script = tmp_path / "not_installed.py"
    script.write_text(NOT_INSTALLED_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), threestudio_root(), PLACEHOLDERS, PACKAGE_DIR,
                        tiny_instaflow_path, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode == 3:
        pytest.skip("threestudio_rfds is installed non-editably here; cannot simulate a clone into custom/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SHAPE (1, 77, 32)" in r.stdout
