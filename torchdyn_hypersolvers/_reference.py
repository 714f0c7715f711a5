"""Accurate reference solves with torchdyn's or torchdiffeq's adaptive solvers.

Solvers are named as in :mod:`~._solver_names`: ``'torchdiffeq:dopri5'``, ``'torchdyn:tsit5'``, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import Tensor

from ._checks import check_positive_real
from ._solver_names import resolve_adaptive

__all__ = ["Reference", "reference_solve"]


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


@dataclass(frozen=True)
class Reference:
    """An accurate adaptive solve: the solver, named as in :mod:`._solver_names`, and its tolerances.

    ``Reference('dopri5', atol=1e-9, rtol=1e-9)``. A tolerance left None is chosen by the function
    that takes the reference (``harvest``: for the base solver's order; ``pareto``: 1e-7)."""

    solver: str = "dopri5"
    atol: Optional[float] = None
    rtol: Optional[float] = None

    def __post_init__(self) -> None:
        resolve_adaptive(self.solver, role="reference")
        for name in ("atol", "rtol"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive_real(getattr(self, name), name))

    @property
    def full_name(self) -> str:
        """``'<library>:<method>'``."""
        return resolve_adaptive(self.solver, role="reference")

    @classmethod
    def of(cls, reference: Union[str, Reference], **tolerances: Optional[float]) -> Reference:
        """``reference`` (a name or a :class:`Reference`) with the tolerances given here (``atol=``,
        ``rtol=``; None leaves one as it is) in place of its own."""
        unknown = sorted(set(tolerances) - {"atol", "rtol"})
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; a reference takes atol= and rtol=")
        base = reference if isinstance(reference, Reference) else cls(reference)
        given = {k: v for k, v in tolerances.items() if v is not None}
        return dataclasses.replace(base, **given) if given else base
