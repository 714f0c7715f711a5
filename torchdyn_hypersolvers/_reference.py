"""Accurate reference solves with torchdyn's or torchdiffeq's adaptive solvers.

Solvers are named ``'<library>:<method>'`` (``'torchdiffeq:dopri5'``, ``'torchdyn:tsit5'``, ...) or by
a bare shorthand (``'dopri5'``, ``'tsit5'``), as docs/solver-names.md says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torchdiffeq
from torch import Tensor
from torchdyn.numerics import odeint as torchdyn_odeint

from ._checks import check_positive_real
from ._solver_names import resolve_adaptive

__all__ = ["NonFiniteSolveError", "Reference", "reference_solve"]


class NonFiniteSolveError(FloatingPointError):
    """An accurate (adaptive) solve met a vector field value that is nan or inf, or its step size
    collapsed: it cannot go on, and would otherwise never return."""


def reference_solve(f: Callable, z0: Tensor, t_eval: Tensor, reference: str, atol: float, rtol: float) -> Tensor:
    """Solve ``dz/dt = f(t, z)`` from ``z0`` and return the states at ``t_eval``: ``[T, B, ...]``.

    ``t_eval`` may decrease (both libraries integrate backwards). A value of f that is nan or inf
    stops the solve with :class:`~.harvest.NonFiniteSolveError` naming the time (an adaptive solver would
    shrink its step forever); so does a step size that underflows.
    """
    library, _, method = resolve_adaptive(reference).partition(":")
    t_eval = t_eval.to(device=z0.device, dtype=z0.dtype)
    checked = _finite_field(f, reference)
    try:
        if library == "torchdyn":
            return torchdyn_odeint(checked, z0, t_eval, solver=method, atol=atol, rtol=rtol)[1]
        return torchdiffeq.odeint(checked, z0, t_eval, method=method, atol=atol, rtol=rtol)
    except AssertionError as err:  # torchdiffeq's "underflow in dt"
        if "underflow" not in str(err):
            raise
        raise NonFiniteSolveError(
            f"the {reference} solve's step size underflowed ({err}): the vector field is too stiff or "
            f"not smooth on [{float(t_eval[0]):.4g}, {float(t_eval[-1]):.4g}] at atol={atol:g}, rtol={rtol:g}"
        ) from err


def _finite_field(f: Callable, reference: str) -> Callable:
    """``f`` that raises :class:`~.harvest.NonFiniteSolveError` where it returns nan or inf (one host read per
    evaluation: an adaptive solver reads its error estimate back at every step anyway)."""

    def checked(t: Tensor, z: Tensor) -> Tensor:
        out = f(t, z)
        if isinstance(out, Tensor) and not bool(torch.isfinite(out).all()):
            bad = ~torch.isfinite(out.reshape(out.shape[0], -1) if out.dim() > 1 else out.reshape(1, -1)).all(1)
            raise NonFiniteSolveError(
                f"the vector field returned nan or inf at t={float(t):.6g} for {int(bad.sum())} of {bad.numel()} "
                f"states during the {reference} solve; an accurate solve cannot go on from there: check the model "
                "(and any input it reads, such as a control) on these states and this interval"
            )
        return out

    return checked


@dataclass(frozen=True)
class Reference:
    """An accurate adaptive solve: the solver's name (``'dopri5'``, ``'torchdyn:tsit5'``, ...) and its tolerances.

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
