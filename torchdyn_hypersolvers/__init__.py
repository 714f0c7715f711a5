"""Hypersolvers for torchdyn: fast, learned fixed-step solvers for Neural ODEs."""

from .evaluate import ParetoResult, ParetoRow, generalization, pareto
from .fit import Adversarial, FitDivergedError, FitReport, fit
from .harvest import Trajectories, harvest
from .hypernets import ConvHyperNet, MLPHyperNet
from .io import load, save
from .metrics import absolute_error, global_truncation_error, pareto_front, task_decrement, terminal_mape
from .plots import plot_mesh_error, plot_pareto
from .reference import REFERENCE_SOLVERS
from .registry import register, registered, unregister
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
    HyperSolver,
    Midpoint,
    Ralston,
)
from .tableaus import EULER, HEUN, MIDPOINT, RALSTON, ButcherTableau, alpha_tableau, rk_increment
from .tableaus import RK4 as RK4_TABLEAU

__version__ = "0.1.0"

__all__ = [
    "HyperSolver",
    "HyperEuler",
    "HyperMidpoint",
    "HyperHeun",
    "HyperRalston",
    "HyperRK4",
    "HyperAlpha",
    "FixedStepSolver",
    "Euler",
    "Midpoint",
    "Heun",
    "Ralston",
    "RK4",
    "Alpha",
    "ButcherTableau",
    "EULER",
    "MIDPOINT",
    "HEUN",
    "RALSTON",
    "RK4_TABLEAU",
    "alpha_tableau",
    "rk_increment",
    "MLPHyperNet",
    "ConvHyperNet",
    "harvest",
    "Trajectories",
    "REFERENCE_SOLVERS",
    "fit",
    "FitReport",
    "Adversarial",
    "FitDivergedError",
    "save",
    "load",
    "pareto",
    "generalization",
    "ParetoResult",
    "ParetoRow",
    "terminal_mape",
    "absolute_error",
    "global_truncation_error",
    "task_decrement",
    "pareto_front",
    "plot_pareto",
    "plot_mesh_error",
    "register",
    "unregister",
    "registered",
    "__version__",
]
