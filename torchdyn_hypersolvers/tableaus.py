"""Explicit Runge-Kutta base solvers as data, and the one step that runs them all.

A base solver is a :class:`ButcherTableau`: the stage matrix ``a`` (strictly lower
triangular, stored row by row), the weights ``b`` and the nodes ``c``. The single
function :func:`rk_stages` evaluates any of them (:func:`rk_increment` is the same step
handing back only the first stage); every fixed-step solver, hypersolver, residual
computation and evaluation in this package goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor

VectorField = Callable[[Tensor, Tensor], Tensor]
"""A vector field ``f(t, z) -> dz/dt``: what every solver in this package integrates."""

__all__ = [
    "ButcherTableau",
    "EULER",
    "MIDPOINT",
    "HEUN",
    "RALSTON",
    "RK4",
    "alpha_tableau",
    "rk_increment",
    "rk_stages",
    "StepCoefficients",
    "TABLEAUS",
]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Args:
        name: short name, also the key under which it is looked up by string.
        order: the method's order of accuracy ``p`` (local error ``O(dt**(p+1))``).
        a: the rows of the strictly lower-triangular stage matrix; row ``i`` holds
            ``a[i+1][0..i]`` (the first stage has no row).
        b: the weights of the stages in the increment.
        c: the nodes, ``c[0] == 0`` for every explicit method.
    """

    name: str
    order: int
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    c: Tuple[float, ...]

    def __post_init__(self) -> None:
        stages = len(self.b)
        if len(self.c) != stages or len(self.a) != stages - 1:
            raise ValueError(
                f"tableau {self.name!r}: {stages} weights need {stages} nodes and "
                f"{stages - 1} rows of a; got {len(self.c)} nodes and {len(self.a)} rows"
            )
        for i, row in enumerate(self.a):
            if len(row) != i + 1:
                raise ValueError(
                    f"tableau {self.name!r}: row {i + 1} of a must have {i + 1} entries "
                    f"(explicit methods are strictly lower triangular), got {len(row)}"
                )
        if self.c[0] != 0.0:
            raise ValueError(f"tableau {self.name!r}: an explicit method needs c[0] == 0, got {self.c[0]}")

    @property
    def stages(self) -> int:
        """Number of evaluations of f per step."""
        return len(self.b)


EULER = ButcherTableau("euler", order=1, a=(), b=(1.0,), c=(0.0,))
"""Forward Euler: 1 stage, order 1."""

MIDPOINT = ButcherTableau("midpoint", order=2, a=((0.5,),), b=(0.0, 1.0), c=(0.0, 0.5))
"""Explicit midpoint (modified Euler): 2 stages, order 2; the alpha family at alpha = 1/2."""

HEUN = ButcherTableau("heun", order=2, a=((1.0,),), b=(0.5, 0.5), c=(0.0, 1.0))
"""Heun's method (explicit trapezoid, improved Euler): 2 stages, order 2; alpha = 1.

Not Heun's third-order method, which some texts also call "Heun"."""

RALSTON = ButcherTableau("ralston", order=2, a=((2.0 / 3.0,),), b=(0.25, 0.75), c=(0.0, 2.0 / 3.0))
"""Ralston's second-order method: 2 stages, alpha = 2/3, b = (1/4, 3/4).

It minimises the bound on the local truncation error among two-stage methods. Some
implementations get it wrong by using alpha = 3/4 with these weights."""

RK4 = ButcherTableau(
    "rk4",
    order=4,
    a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0),
    c=(0.0, 0.5, 0.5, 1.0),
)
"""The classical fourth-order Runge-Kutta method: 4 stages, order 4."""


def alpha_tableau(alpha: float) -> ButcherTableau:
    """The two-stage, second-order family with ``c2 = a21 = alpha``.

    ``b = (1 - 1/(2 alpha), 1/(2 alpha))``: alpha = 1/2 is the midpoint method,
    alpha = 1 Heun's, alpha = 2/3 Ralston's.
    """
    alpha = float(alpha)
    if not alpha > 0.0:
        raise ValueError(f"the alpha family needs alpha > 0, got alpha={alpha}")
    w = 1.0 / (2.0 * alpha)
    return ButcherTableau(f"alpha({alpha:g})", order=2, a=((alpha,),), b=(1.0 - w, w), c=(0.0, alpha))


TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN, RALSTON, RK4)}
"""The base solvers reachable by name (the naming rule: :func:`~.registry.resolve_solver`)."""


class StepCoefficients(NamedTuple):
    """One step's Runge-Kutta coefficients as :func:`rk_stages` reads them, Python numbers or tensors
    (a :class:`ButcherTableau` is one; a non-stationary solver builds one per step from learned values):
    ``a`` the rows of the stage matrix, ``b`` the weights, ``c`` the nodes (``c[0]`` is not read)."""

    a: Sequence[Sequence[Union[float, Tensor]]]
    b: Sequence[Union[float, Tensor]]
    c: Sequence[Union[float, Tensor]]


def rk_stages(
    tableau: Union[ButcherTableau, StepCoefficients],
    f: VectorField,
    t: Tensor,
    z: Tensor,
    dt: Tensor,
    k1: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """One explicit Runge-Kutta step, as an increment and all its stage evaluations.

    Returns ``(psi, (k_1, ..., k_s))`` such that the base solver's step is ``z + dt * psi``;
    the stages (``k_1 = f(t, z)``) are handed back so that callers (the hypersolver
    correction) reuse them instead of evaluating f again. Pass ``k1`` when it is already
    known. Exactly ``tableau.stages`` evaluations of f (one fewer when ``k1`` is given),
    no host synchronisation: Python-number zeros are skipped, tensor coefficients always applied.
    """
    if k1 is None:
        k1 = f(t, z)
    stages = [k1]
    for row, c in zip(tableau.a, tableau.c[1:]):
        z_stage = z + dt * _combine(row, stages)
        stages.append(f(t + c * dt, z_stage))
    return _combine(tableau.b, stages), tuple(stages)


def rk_increment(
    tableau: ButcherTableau, f: VectorField, t: Tensor, z: Tensor, dt: Tensor, k1: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """:func:`rk_stages` handing back only the first stage: ``(psi, k1)``, ``k1 = f(t, z)``."""
    psi, stages = rk_stages(tableau, f, t, z, dt, k1)
    return psi, stages[0]


def _combine(weights: Sequence[Union[float, Tensor]], stages: Sequence[Tensor]) -> Tensor:
    """``sum(w * k)``. Python-number weights of zero are skipped and of one not multiplied; tensor
    weights (learned coefficients) are always applied: comparing them would synchronise with the host."""
    total = None
    for w, k in zip(weights, stages):
        if isinstance(w, (int, float)):
            if w == 0.0:
                continue
            term = k if w == 1.0 else w * k
        else:
            term = w * k
        total = term if total is None else total + term
    if total is None:  # a row of zeros (not produced by any tableau here)
        return stages[0] * 0.0
    return total
