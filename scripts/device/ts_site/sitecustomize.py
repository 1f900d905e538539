"""Start-up hooks for threestudio's unchanged ``launch.py`` when scripts/device/run.sh trains with it.

Python imports ``sitecustomize`` from the first ``PYTHONPATH`` folder that has one; run.sh puts
this folder there for the ``launch.py`` subprocesses only.  It

* appends ``tests/placeholders`` (tinycudann, nvdiffrast: import-only, unused with the
  pure-torch encodings) and answers ``import`` of modules that threestudio imports at start-up but
  a NeRF run never uses (``STUBS``) with an empty module, when they are not installed;
* with ``RFDS_NERFACC=torch``, puts the pure-torch kernels of ``tests/nerfacc_torch.py`` at
  ``nerfacc.cuda._backend`` (else nerfacc JIT-builds or loads its CUDA kernels);
* with ``RFDS_STEP_LOG=<file>``, appends one JSON line per training step (seconds since the
  previous step's end, after a device sync; peak GPU memory; render size) from
  ``BaseSystem.on_train_batch_end``: s/iteration survives a run killed at its timeout;
* saves threestudio's test videos as GIF when imageio-ffmpeg is missing (the device has none);
* with ``RFDS_CPU_SMOKE=1``, first loads the tests' CPU shim (tests/cpu_launch/sitecustomize.py).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import time
import types

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_TESTS = os.path.join(_REPO, "tests")
sys.path.append(os.path.join(_TESTS, "cpu_launch"))
from post_import import patched_spec  # noqa: E402
STUBS = ("wandb", "envlight", "controlnet_aux", "igl", "IPython", "pysdf", "xatlas", "mcubes")

if os.environ.get("RFDS_CPU_SMOKE") == "1":  # the tests' CPU shim: Trainer → cpu, get_device → cpu, nerfacc → torch
    _spec = importlib.util.spec_from_file_location("_rfds_cpu_launch", os.path.join(_TESTS, "cpu_launch", "sitecustomize.py"))
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
else:
    sys.path.append(os.path.join(_TESTS, "placeholders"))


class _Stub(types.ModuleType):
    """An empty module whose attributes are inert classes (``from controlnet_aux import X`` works)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        module.__path__ = []  # a package, so that submodule imports also resolve to stubs


def _patch_nerfacc(_module) -> None:
    sys.path.append(_TESTS)
    import nerfacc_torch

    nerfacc_torch.install()


def _step_logger(module) -> None:
    path = os.environ.get("RFDS_STEP_LOG")
    if not path:
        return
    import torch

    base = module.BaseSystem
    original = base.on_train_batch_end
    state = {"t": time.perf_counter()}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        result = original(self, outputs, batch, batch_idx)
        cuda = torch.cuda.is_available() and os.environ.get("RFDS_CPU_SMOKE") != "1"
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        rec = {"step": int(self.true_global_step), "s": round(now - state["t"], 4),
               "height": int(batch.get("height", 0)) if isinstance(batch, dict) else None,
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}
        state["t"] = now
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return result

    base.on_train_batch_end = on_train_batch_end


def _gif_without_ffmpeg(module) -> None:
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return
    original = module.SaverMixin.save_img_sequence

    def save_img_sequence(self, filename, img_dir, matcher, save_format="mp4", *args, **kwargs):
        return original(self, filename, img_dir, matcher, "gif", *args, **kwargs)

    module.SaverMixin.save_img_sequence = save_img_sequence


PATCHES = {"threestudio.systems.base": _step_logger, "threestudio.utils.saving": _gif_without_ffmpeg}
if os.environ.get("RFDS_NERFACC") == "torch" and os.environ.get("RFDS_CPU_SMOKE") != "1":
    PATCHES["nerfacc"] = _patch_nerfacc  # (the CPU shim already does it)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches ``PATCHES`` modules after they run; stubs ``STUBS`` that are not installed."""

    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if name in PATCHES:
            return patched_spec(name, path, PATCHES[name])
        if top in STUBS and (name != top or importlib.machinery.PathFinder.find_spec(name, path) is None):
            if name != top and not isinstance(sys.modules.get(top), _Stub):
                return None  # a real package's submodule
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        return None


sys.meta_path.insert(0, _Finder())
