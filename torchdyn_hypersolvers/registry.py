"""Make a solver reachable by name in torchdyn: ``NeuralODE(f, solver='my-hs')``.

Registration is explicit (never a side effect of import) and cannot shadow one of
torchdyn's own solver names. torchdyn instantiates a named solver by calling the
registered entry with a dtype; the entry hands back the registered instance itself,
so every model that names it shares the same fitted g.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from .names import ADAPTIVE_SOLVERS, FIXED_STEP_SOLVERS

__all__ = ["register", "unregister", "registered", "registered_solver"]

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
