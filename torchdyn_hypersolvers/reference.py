"""Accurate reference solves by name, from torchdyn and torchdiffeq.

Names: ``'torchdyn:dopri5'``, ``'torchdyn:tsit5'``, ``'torchdiffeq:<method>'`` for
torchdiffeq's adaptive methods (``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``,
``adaptive_heun``). A bare ``'tsit5'`` means torchdyn's; a bare ``'dopri5'``,
``'dopri8'``, ... means torchdiffeq's.
"""

from __future__ import annotations

from typing import Callable, List

from torch import Tensor

__all__ = ["REFERENCE_SOLVERS", "check_reference", "reference_solve"]

_TORCHDYN = ("dopri5", "tsit5")
_TORCHDIFFEQ = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
_BARE = {"tsit5": "torchdyn:tsit5", **{m: f"torchdiffeq:{m}" for m in _TORCHDIFFEQ}}

REFERENCE_SOLVERS: List[str] = sorted(
    [f"torchdyn:{m}" for m in _TORCHDYN] + [f"torchdiffeq:{m}" for m in _TORCHDIFFEQ] + list(_BARE)
)
"""Every accepted reference solver name."""


def check_reference(name: str) -> str:
    """The canonical ``'library:method'`` form of a reference solver name."""
    canonical = _BARE.get(name, name)
    library, _, method = canonical.partition(":")
    known = _TORCHDYN if library == "torchdyn" else _TORCHDIFFEQ if library == "torchdiffeq" else ()
    if method not in known:
        raise ValueError(f"unknown reference solver {name!r}; known: {', '.join(REFERENCE_SOLVERS)}")
    return canonical


def reference_solve(f: Callable, z0: Tensor, t_eval: Tensor, reference: str, atol: float, rtol: float) -> Tensor:
    """Solve ``dz/dt = f(t, z)`` from ``z0`` and return the states at ``t_eval``: ``[T, B, ...]``.

    ``t_eval`` may decrease (both libraries integrate backwards).
    """
    library, _, method = check_reference(reference).partition(":")
    t_eval = t_eval.to(device=z0.device, dtype=z0.dtype)
    if library == "torchdyn":
        from torchdyn.numerics import odeint

        _, states = odeint(f, z0, t_eval, solver=method, atol=atol, rtol=rtol)
        return states
    import torchdiffeq

    return torchdiffeq.odeint(f, z0, t_eval, method=method, atol=atol, rtol=rtol)
