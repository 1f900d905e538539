"""Run a patch on a module right after it has been executed by its own loader (or a hook just
before it is first imported): the mechanism behind tests/cpu_launch/sitecustomize.py and
scripts/device/ts_site/sitecustomize.py."""
import importlib.abc
import importlib.machinery
from typing import Callable, Dict, Optional


class PatchingLoader(importlib.abc.Loader):
    """Executes the module with its own loader, then applies ``patch(module)``."""

    def __init__(self, loader, patch: Callable):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


def patched_spec(name: str, path, patch: Callable) -> Optional[importlib.machinery.ModuleSpec]:
    """The path finder's spec of ``name`` with its loader wrapped to run ``patch`` after it."""
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None and spec.loader is not None:
        spec.loader = PatchingLoader(spec.loader, patch)
    return spec


class PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patches[name](module)`` right after module ``name`` has been executed."""

    def __init__(self, patches: Dict[str, Callable]):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        return patched_spec(name, path, self.patches[name]) if name in self.patches else None


class RunBeforeImport(importlib.abc.MetaPathFinder):
    """Runs ``hooks[name]()`` once, just before module ``name`` is first looked for; the import then
    proceeds as usual."""

    def __init__(self, hooks: Dict[str, Callable[[], None]]):
        self.hooks = dict(hooks)

    def find_spec(self, name, path, target=None):
        hook = self.hooks.pop(name, None)
        if hook is not None:
            hook()
        return None
