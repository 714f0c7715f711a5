"""Solver names: the one rule by which base and adaptive solvers given by name are resolved.

The naming rule, used by :func:`~.harvest.harvest`, :func:`~.fit.fit`, :func:`~.evaluate.pareto`,
:func:`~.io.load` and :func:`~.registry.register` alike (:func:`~.registry.resolve_solver` applies it
to any solver):

- a bare name is one of this package's explicit fixed-step solvers (``'euler'``,
  ``'midpoint'``, ``'heun'``, ``'ralston'``, ``'rk4'``) or a name given to :func:`register`;
- an adaptive solver is named ``'<library>:<method>'``: ``'torchdyn:dopri5'``,
  ``'torchdyn:tsit5'``, ``'torchdiffeq:dopri5'``, ``'torchdiffeq:dopri8'``, ...;
- a bare adaptive name is accepted as a shorthand for the library that has it
  (``'tsit5'`` is torchdyn's, ``'dopri8'``, ``'bosh3'``, ... torchdiffeq's); ``'dopri5'``,
  which both have, means torchdiffeq's.

torchdyn 1.0.6's own ``'rk4'`` evaluates its stages at ``t, t + dt/2, t + dt/2`` (first order
on time-dependent fields); the bare name ``'rk4'`` here is the classical method. Pass
torchdyn's ``RungeKutta4()`` as a module to use it anyway.
"""

from __future__ import annotations

from torch import nn

from .tableaus import EULER, MIDPOINT, RK4, TABLEAUS, ButcherTableau

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_STEP_SOLVERS",
    "resolve_adaptive",
    "resolve_base",
]

_TORCHDYN = ("dopri5", "tsit5")
_TORCHDIFFEQ = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_BARE = {"tsit5": "torchdyn:tsit5", **{m: f"torchdiffeq:{m}" for m in _TORCHDIFFEQ}}

ADAPTIVE_SOLVERS = tuple(sorted([f"torchdyn:{m}" for m in _TORCHDYN] + [f"torchdiffeq:{m}" for m in _TORCHDIFFEQ]))
"""Every adaptive solver by its full name; the bare shorthands of the module docstring also resolve."""

FIXED_STEP_SOLVERS = tuple(sorted(TABLEAUS))
"""The bare names of this package's explicit fixed-step solvers."""

# torchdyn's fixed-step classes, recognised by class name so that no private import is needed.
_TORCHDYN_FIXED = {"Euler": EULER, "Midpoint": MIDPOINT, "RungeKutta4": RK4}
_TORCHDYN_ADAPTIVE = {"dopri5", "DormandPrince45", "DormandPrince5", "tsit5", "Tsitouras45", "Tsitouras5"}
_TORCHDYN_IMPLICIT = {"ieuler", "implicit_euler", "ImplicitEuler", "alf", "AsynchronousLeapfrog"}
_NEED_EXPLICIT = f"a hypersolver needs an explicit fixed-step base ({', '.join(repr(n) for n in FIXED_STEP_SOLVERS)})"


def resolve_adaptive(name: str, role: str = "adaptive") -> str:
    """The full ``'<library>:<method>'`` name of an adaptive solver given by name; ``role``
    (e.g. ``'reference'``) names what it is for in error messages."""
    if not isinstance(name, str):
        raise TypeError(f"a {role} solver is named by a string such as 'torchdiffeq:dopri5', got {name!r}")
    full = _BARE.get(name, name)
    library, _, method = full.partition(":")
    known = _TORCHDYN if library == "torchdyn" else _TORCHDIFFEQ if library == "torchdiffeq" else ()
    if method not in known:
        raise ValueError(
            f"unknown {role} solver {name!r}; known: {', '.join(ADAPTIVE_SOLVERS)} (or the shorthands {sorted(_BARE)})"
        )
    return full


def is_adaptive_name(name: str) -> bool:
    try:
        resolve_adaptive(name)
    except ValueError:
        return False
    return True


def resolve_base(base) -> ButcherTableau:
    """The Butcher tableau of an explicit fixed-step base solver given in any accepted form:
    a bare name, a :class:`ButcherTableau`, one of this package's solvers, or torchdyn's
    ``Euler`` / ``Midpoint`` / ``RungeKutta4``. Adaptive and implicit solvers are refused."""
    if isinstance(base, ButcherTableau):
        return base
    if isinstance(base, nn.Module) and isinstance(getattr(base, "tableau", None), ButcherTableau):
        return base.tableau
    if isinstance(base, str):
        if base in _TORCHDYN_ADAPTIVE or is_adaptive_name(base):
            raise ValueError(f"base solver {base!r} is adaptive; {_NEED_EXPLICIT}")
        if base in _TORCHDYN_IMPLICIT:
            raise ValueError(f"base solver {base!r} is implicit or symplectic; {_NEED_EXPLICIT}")
        try:
            return TABLEAUS[base.lower()]
        except KeyError:
            raise ValueError(f"unknown base solver {base!r}; {_NEED_EXPLICIT}") from None
    if isinstance(base, nn.Module):
        name = type(base).__name__
        if getattr(base, "stepping_class", None) == "adaptive":
            raise ValueError(f"base solver {name} is adaptive; {_NEED_EXPLICIT}")
        if name in _TORCHDYN_FIXED and not hasattr(base, "hypernet"):
            return _TORCHDYN_FIXED[name]
        raise ValueError(
            f"base solver {name} is not an explicit Runge-Kutta method this package knows; pass a name, "
            "a ButcherTableau, or torchdyn's Euler / Midpoint / RungeKutta4"
        )
    raise TypeError(f"cannot use {base!r} as a base solver")
