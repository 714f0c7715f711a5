"""Module paths of earlier versions, still importable with a ``DeprecationWarning``.

Internal modules are private (``_mesh``, ``_loop``, ...) as of 0.3. Code that imported one of
them by its old public path (``torchdyn_hypersolvers.mesh``) gets a stand-in module that
forwards every attribute to the names' new homes, warning at each use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Dict, Tuple

__all__ = ["MOVED_MODULES", "install"]

MOVED_MODULES: Dict[str, Tuple[str, ...]] = {
    "adjoint": ("_adjoint",),
    "costs": ("_costs",),
    "files": ("_files",),
    "grid": ("_time_grid",),
    "loop": ("_loop",),
    "mesh": ("_mesh",),
    "names": ("_solver_names", "registry"),
    "precision": ("_precision",),
    "recipe": ("_optimisation",),
    "reference": ("_reference",),
    "states": ("_states",),
    "user_model": ("_user_model",),
}
"""Old module name -> the modules its names live in now, searched in order."""

_PACKAGE = __name__.rpartition(".")[0]


class _MovedModule(types.ModuleType):
    """Stands in for a module that moved: attribute lookups go to the new modules, with a warning."""

    def __init__(self, name: str, targets: Tuple[str, ...]):
        super().__init__(f"{_PACKAGE}.{name}")
        self._targets = targets

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(f"{_PACKAGE}.{target}")
            if hasattr(module, attr):
                warnings.warn(
                    f"{self.__name__} is private now: import {attr} from {module.__name__} "
                    "(or from the package's top level where it is exported); the old path will be removed",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path, target=None):
        package, _, name = fullname.rpartition(".")
        if package != _PACKAGE or name not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec) -> types.ModuleType:
        return _MovedModule(spec.name.rpartition(".")[2], MOVED_MODULES[spec.name.rpartition(".")[2]])

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Make the old module paths importable (once per process)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
