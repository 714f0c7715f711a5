"""Hypersolvers for torchdyn: fast, learned fixed-step solvers for Neural ODEs.

The public API is what ``__all__`` lists. Tableaus and the generic step live in
:mod:`.tableaus`, error metrics in :mod:`.metrics`, validity records in :mod:`.validity`;
modules whose names start with ``_`` are internal.
"""

import importlib
import warnings

from . import _compat
from ._version import __version__
from .evaluate import ParetoResult, generalization, pareto
from .fit import Adversarial, FitDivergedError, FitReport, Recipe, fit
from .guard import Guarded
from .harvest import Trajectories, harvest
from .hypernets import ConvHyperNet, MLPHyperNet
from .io import load, save
from .multistage import MultiStageHyperNet, MultiStageHyperSolver
from .plots import plot_pareto
from .registry import register
from .solvers import (
    RK4,
    Alpha,
    Euler,
    FixedStepSolver,
    Heun,
    HyperAlpha,
    HyperEuler,
    HyperHeun,
    HyperMidpoint,
    HyperRalston,
    HyperRK4,
    HyperRungeKutta4,
    HyperSolver,
    Midpoint,
    Ralston,
)
from .tableaus import ButcherTableau
from .tuning import TuneResult, tune

__all__ = [
    "HyperSolver",
    "HyperEuler",
    "HyperMidpoint",
    "HyperHeun",
    "HyperRalston",
    "HyperRK4",
    "HyperRungeKutta4",
    "HyperAlpha",
    "Guarded",
    "MultiStageHyperSolver",
    "MultiStageHyperNet",
    "FixedStepSolver",
    "Euler",
    "Midpoint",
    "Heun",
    "Ralston",
    "RK4",
    "Alpha",
    "ButcherTableau",
    "MLPHyperNet",
    "ConvHyperNet",
    "tune",
    "TuneResult",
    "harvest",
    "Trajectories",
    "fit",
    "Recipe",
    "FitReport",
    "Adversarial",
    "FitDivergedError",
    "save",
    "load",
    "pareto",
    "ParetoResult",
    "generalization",
    "plot_pareto",
    "register",
    "__version__",
]

# Names importable from the top level before 0.2, now in the module that owns them.
_MOVED = {
    "EULER": ("tableaus", "EULER"),
    "MIDPOINT": ("tableaus", "MIDPOINT"),
    "HEUN": ("tableaus", "HEUN"),
    "RALSTON": ("tableaus", "RALSTON"),
    "RK4_TABLEAU": ("tableaus", "RK4"),
    "alpha_tableau": ("tableaus", "alpha_tableau"),
    "rk_increment": ("tableaus", "rk_increment"),
    "REFERENCE_SOLVERS": ("_solver_names", "ADAPTIVE_SOLVERS"),
    "ParetoRow": ("evaluate", "ParetoRow"),
    "terminal_mape": ("metrics", "terminal_mape"),
    "absolute_error": ("metrics", "absolute_error"),
    "global_truncation_error": ("metrics", "global_truncation_error"),
    "task_decrement": ("metrics", "task_decrement"),
    "pareto_front": ("metrics", "pareto_front"),
    "plot_mesh_error": ("plots", "plot_mesh_error"),
    "unregister": ("registry", "unregister"),
    "registered": ("registry", "registered"),
}


_compat.install()  # the module paths of earlier versions (torchdyn_hypersolvers.mesh, ...)


def __getattr__(name: str):
    if name in _MOVED:
        module, attr = _MOVED[name]
        warnings.warn(
            f"torchdyn_hypersolvers.{name} moved to torchdyn_hypersolvers.{module}.{attr}; "
            "the top-level name will be removed in a future version",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
