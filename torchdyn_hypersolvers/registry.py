"""Solvers by name: make one reachable in torchdyn (``NeuralODE(f, solver='my-hs')``), and
resolve any solver a function of this package is given (a module or a name).

Registration is explicit (never a side effect of import) and cannot shadow one of
torchdyn's own solver names. torchdyn instantiates a named solver by calling the
registered entry with a dtype; the entry hands back the registered instance itself,
so every model that names it shares the same fitted g.
"""

from __future__ import annotations

from enum import Enum
from typing import Dict, List, NamedTuple, Optional, Union

from torch import nn
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from ._solver_names import ADAPTIVE_SOLVERS, FIXED_STEP_SOLVERS, is_adaptive_name, resolve_adaptive
from .solvers import FixedStepSolver, HyperSolver
from .tableaus import TABLEAUS

__all__ = ["SolverKind", "Resolved", "register", "unregister", "registered", "registered_solver", "resolve_solver"]


class SolverKind(str, Enum):
    """What a resolved solver is; compares equal to its value (``SolverKind.HYPER == 'hyper'``)."""

    HYPER = "hyper"
    """A hypersolver: a base solver corrected by g."""
    FIXED = "fixed"
    """A classical fixed-step solver."""
    ADAPTIVE = "adaptive"
    """An adaptive solver of torchdyn or torchdiffeq, by its ``'<library>:<method>'`` name."""

    __str__ = str.__str__


class Resolved(NamedTuple):
    """A resolved solver: its :class:`SolverKind`, and the module (hyper, fixed) or the full
    ``'<library>:<method>'`` name (adaptive)."""

    kind: SolverKind
    solver: Union[nn.Module, str]

_OURS: Dict[str, _Instance] = {}


class _Instance:
    """Stands in for a solver class in torchdyn's table; calling it returns the instance."""

    def __init__(self, solver: nn.Module):
        self.solver = solver

    def __call__(self, dtype=None) -> nn.Module:
        return self.solver


def register(name: str, solver: nn.Module) -> None:
    """Register ``solver`` (a fitted hypersolver, or any fixed-step solver here) under ``name``.

    Re-registering a name this package registered replaces it; a name that already means
    a solver (torchdyn's ``'euler'``, ``'dopri5'``, ..., this package's ``'heun'``, ``'ralston'``,
    or a ``'library:method'`` name) is refused.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a solver name must be a non-empty string, got {name!r}")
    if ":" in name or name in ADAPTIVE_SOLVERS:
        raise ValueError(f"cannot register {name!r}: names with ':' are reserved for 'library:method' solvers")
    if name in SOLVER_DICT and name not in _OURS:
        raise ValueError(
            f"cannot register {name!r}: it would shadow torchdyn's solver of that name; choose another name"
        )
    if name.lower() in FIXED_STEP_SOLVERS:
        raise ValueError(f"cannot register {name!r}: it names this package's {name.lower()} solver; choose another")
    if not (hasattr(solver, "step") and getattr(solver, "stepping_class", None) == "fixed"):
        raise TypeError(f"register expects a fixed-step solver with a step method, got {type(solver).__name__}")
    _OURS[name] = _Instance(solver)
    SOLVER_DICT[name] = _OURS[name]


def unregister(name: str) -> None:
    """Remove a name this package registered."""
    if name not in _OURS:
        raise KeyError(f"{name!r} was not registered by torchdyn_hypersolvers; registered: {registered()}")
    del _OURS[name]
    SOLVER_DICT.pop(name, None)


def registered() -> List[str]:
    """The names registered so far."""
    return sorted(_OURS)


def registered_solver(name: str) -> Optional[nn.Module]:
    """The solver registered under ``name``, or None."""
    entry = _OURS.get(name)
    return None if entry is None else entry.solver


def resolve_solver(solver: Union[str, nn.Module]) -> Resolved:
    """Resolve a solver given as a module or by name (the naming rule of docs/solver-names.md, plus
    the names given to :func:`register`)."""
    if isinstance(solver, HyperSolver):
        return Resolved(SolverKind.HYPER, solver)
    if isinstance(solver, nn.Module):
        if getattr(solver, "stepping_class", None) != "fixed" or not hasattr(solver, "step"):
            raise ValueError(
                f"solver {type(solver).__name__} is not a fixed-step solver; name adaptive ones by string "
                f"({', '.join(ADAPTIVE_SOLVERS)})"
            )
        return Resolved(SolverKind.FIXED, solver)
    if isinstance(solver, str):
        if solver.lower() in TABLEAUS:
            return Resolved(SolverKind.FIXED, FixedStepSolver(solver))
        mine = registered_solver(solver)
        if mine is not None:
            return Resolved(SolverKind.HYPER if isinstance(mine, HyperSolver) else SolverKind.FIXED, mine)
        if is_adaptive_name(solver):
            return Resolved(SolverKind.ADAPTIVE, resolve_adaptive(solver))
    raise ValueError(
        f"unknown solver {solver!r}: pass a (hyper)solver module, a fixed-step name "
        f"({', '.join(FIXED_STEP_SOLVERS)} or a registered name) or an adaptive one ({', '.join(ADAPTIVE_SOLVERS)})"
    )
