"""threestudio integration: registers the RFDS guidance types, prompt processors and aliases.

    rfds-sd3-guidance, rfds-rev-sd3-guidance, rfds-flux-guidance, rfds-rev-flux-guidance,
    rfds-instaflow-guidance, rfds-rev-instaflow-guidance
    rfds-sd3-prompt-processor, rfds-flux-prompt-processor, rfds-instaflow-prompt-processor
    aliases for the paper's configs: RFDS, RFDS-Rev, RFDS-sd3, RFDS-Rev-sd3, sd3-prompt-processor, rf-system
    Gaussian splats on gsplat: rfds-gaussians, rfds-gsplat-renderer, rfds-gaussian-system, rfds-gaussian-exporter

Only this subpackage imports threestudio, and only when :func:`register` is called.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

__all__ = ["register", "registered_names"]


def _classes() -> Dict[str, type]:
    from .gaussians.exporter import EXPORTERS
    from .gaussians.geometry import GEOMETRIES
    from .gaussians.renderer import RENDERERS
    from .gaussians.system import SYSTEMS as GAUSSIAN_SYSTEMS
    from .guidance import GUIDANCES, REFERENCE_ALIASES
    from .prompt_processor import PROMPT_PROCESSORS, SD3PromptProcessor
    from .system import SYSTEMS

    return {**GUIDANCES, **PROMPT_PROCESSORS, **REFERENCE_ALIASES, "sd3-prompt-processor": SD3PromptProcessor,
            **SYSTEMS, **GEOMETRIES, **RENDERERS, **GAUSSIAN_SYSTEMS, **EXPORTERS}


def _same(a: type, b: type) -> bool:
    """The same class, or the same class re-imported (same module and qualified name)."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register() -> List[str]:
    """Register every class under its name with threestudio; idempotent.

    A name that another extension already took is skipped with a warning (threestudio itself
    would raise).  Returns the names that now resolve to this package's classes."""
    from .compat import require_threestudio

    threestudio = require_threestudio()
    ours = []
    for name, cls in _classes().items():
        taken = threestudio.__modules__.get(name)
        if taken is None:
            threestudio.register(name)(cls)
        elif not _same(taken, cls):
            warnings.warn(
                f"threestudio-rfds: the name {name!r} is already registered by {taken.__module__}."
                f"{taken.__qualname__}; keeping that one (use this package's other names instead)",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        ours.append(name)
    return ours


def registered_names() -> List[str]:
    """All names this package registers (when free)."""
    return list(_classes())
