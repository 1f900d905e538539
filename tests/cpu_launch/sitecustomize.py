"""Test-only CPU shim for threestudio's unchanged ``launch.py`` (tests/test_threestudio_e2e.py).

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one;
the end-to-end tests put this folder on ``PYTHONPATH`` of the ``python launch.py …`` subprocess
(and so of threestudio's spawned prompt child and of ``rfds-bench run``'s children).  Nothing in
the package imports it.  It only bends what threestudio hard-codes for CUDA:

* Lightning's ``Trainer(accelerator="gpu", devices=-1)`` (launch.py) → ``accelerator="cpu", devices=1``;
* ``threestudio.utils.misc.get_device()`` (always ``cuda:<rank>``, imported by name in many
  modules) → ``cpu``, by swapping the one function object's code so every binding answers cpu;
* nerfacc's CUDA kernels → the pure-torch stand-in ``tests/nerfacc_torch.py``;
* gsplat's CUDA kernels → ``tests/gsplat_torch.py``, installed just before ``gsplat`` is first
  imported, so ``gsplat.cuda._backend`` never starts its JIT build (nvcc may exist here);
* tinycudann / nvdiffrast → the import-only placeholders in ``tests/placeholders`` (appended to
  ``sys.path``, so real installations win).

``RFDS_TEST_FORBID_TRANSFORMERS=1`` makes every ``transformers`` model load raise: a test that a
run reuses cached prompt embeddings without loading any text encoder.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.dirname(_HERE)
sys.path.append(os.path.join(_TESTS, "placeholders"))
sys.path.append(_HERE)  # also when this file is loaded by path (scripts/device/ts_site/sitecustomize.py)
from post_import import PatchAfterImport, RunBeforeImport  # noqa: E402


def _cpu_trainer(module) -> None:
    init = module.Trainer.__init__

    def __init__(self, *args, **kwargs):
        kwargs["accelerator"], kwargs["devices"] = "cpu", 1
        init(self, *args, **kwargs)

    module.Trainer.__init__ = __init__


def _cpu_get_device(module) -> None:
    def get_device():
        return torch.device("cpu")  # noqa: F821 — resolved in threestudio.utils.misc's globals

    module.get_device.__code__ = get_device.__code__


def _nerfacc_torch(_module) -> None:
    sys.path.append(_TESTS)
    import nerfacc_torch

    nerfacc_torch.install()


def _gsplat_torch() -> None:
    sys.path.append(_TESTS)
    import gsplat_torch

    gsplat_torch.install()


def _forbid_transformers(module) -> None:
    def refuse(cls, *args, **kwargs):
        raise RuntimeError(f"RFDS_TEST_FORBID_TRANSFORMERS: {cls.__name__}.from_pretrained was called")

    module.PreTrainedModel.from_pretrained = classmethod(refuse)


PATCHES = {
    "pytorch_lightning.trainer.trainer": _cpu_trainer,
    "threestudio.utils.misc": _cpu_get_device,
    "nerfacc": _nerfacc_torch,
}
if os.environ.get("RFDS_TEST_FORBID_TRANSFORMERS") == "1":
    PATCHES["transformers.modeling_utils"] = _forbid_transformers


sys.meta_path.insert(0, PatchAfterImport(PATCHES))
sys.meta_path.insert(0, RunBeforeImport({"gsplat": _gsplat_torch}))
