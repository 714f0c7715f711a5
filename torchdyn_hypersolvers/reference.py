"""Accurate reference solves with torchdyn's or torchdiffeq's adaptive solvers.

Solvers are named as in :mod:`.names`: ``'torchdiffeq:dopri5'``, ``'torchdyn:tsit5'``, ...
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .names import resolve_adaptive

__all__ = ["reference_solve"]


def reference_solve(f: Callable, z0: Tensor, t_eval: Tensor, reference: str, atol: float, rtol: float) -> Tensor:
    """Solve ``dz/dt = f(t, z)`` from ``z0`` and return the states at ``t_eval``: ``[T, B, ...]``.

    ``t_eval`` may decrease (both libraries integrate backwards).
    """
    library, _, method = resolve_adaptive(reference).partition(":")
    t_eval = t_eval.to(device=z0.device, dtype=z0.dtype)
    if library == "torchdyn":
        from torchdyn.numerics import odeint

        _, states = odeint(f, z0, t_eval, solver=method, atol=atol, rtol=rtol)
        return states
    import torchdiffeq

    return torchdiffeq.odeint(f, z0, t_eval, method=method, atol=atol, rtol=rtol)
