"""threestudio-rfds: rectified-flow score distillation (RFDS, RFDS-Rev, iRFDS) for threestudio.

The core (``flow``, ``rfds``, ``protocol``, ``backends``, ``text``, ``tools``) is plain PyTorch
and diffusers.  Only ``threestudio_rfds.adapter`` imports threestudio.

threestudio's ``launch.py`` loads this folder from ``custom/threestudio-rfds`` under the module
name ``threestudio-rfds``; we then load (or reuse) the canonical package ``threestudio_rfds``
and register its classes once, so both import paths share one set of classes.
"""
import importlib.util
import os
import sys

from .version import __version__

__all__ = ["__version__", "register_threestudio"]


def register_threestudio():
    """Register the guidance and prompt-processor classes with threestudio (idempotent)."""
    from .adapter import register

    return register()


if __name__ != "threestudio_rfds":  # loaded from custom/ by threestudio's launch.py
    if "threestudio_rfds" not in sys.modules:
        try:
            import threestudio_rfds  # noqa: F401  (installed with `pip install -e`)
        except ImportError:  # not installed: load this folder under the canonical name
            _here = os.path.dirname(os.path.abspath(__file__))
            _spec = importlib.util.spec_from_file_location(
                "threestudio_rfds", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here]
            )
            _mod = importlib.util.module_from_spec(_spec)
            sys.modules["threestudio_rfds"] = _mod
            _spec.loader.exec_module(_mod)
    sys.modules["threestudio_rfds"].register_threestudio()
