"""Diffusers backends (docs/backends.md): ``load_backend("sd3" | "flux" | "instaflow", **kwargs)``.

Imports are lazy so that ``import threestudio_rfds.backends`` does not import diffusers models.
"""
from __future__ import annotations

from importlib import import_module

BACKENDS = {
    "sd3": ("threestudio_rfds.backends.sd3", "SD3Backend"),
    "flux": ("threestudio_rfds.backends.flux", "FluxBackend"),
    "instaflow": ("threestudio_rfds.backends.instaflow", "InstaFlowBackend"),
}


def backend_class(name: str):
    """The backend class registered under ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(import_module(module), cls)


def load_backend(name: str, **kwargs):
    """Build the backend ``name`` ("sd3", "flux" or "instaflow"); kwargs go to its constructor."""
    return backend_class(name)(**kwargs)


__all__ = ["BACKENDS", "backend_class", "load_backend"]
