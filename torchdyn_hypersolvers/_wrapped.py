"""Wrapped solvers: a torchdyn fixed-step solver that holds a hypersolver and changes how it steps.

A wrapper (e.g. :class:`~.guard.Guarded`) is itself a torchdyn solver. It reads what it needs of
the hypersolver's step through :meth:`~.solvers.HyperSolver.step_parts` and its state through
public properties, and forwards the rest: what a solver is (``order``, ``tableau``, ``dtype``), where
g is valid (``validity``, ``time_grid``, ``describe``). :func:`unwrap` gives back the hypersolver
(``save`` stores that one). As diffrax's ``AbstractWrappedSolver``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from ._loop import fixed_solve
from .solvers import FixedStepSolver, HyperSolver
from .tableaus import ButcherTableau, VectorField
from .validity import Validity

__all__ = ["WrappedSolver", "unwrap"]


class WrappedSolver(nn.Module):
    """A solver wrapping a :class:`~.solvers.HyperSolver`: its ``state_dict`` keys start with
    ``hypersolver.``; by default every hook and step is the hypersolver's (subclasses override them)."""

    stepping_class = "fixed"

    def __init__(self, hypersolver: HyperSolver):
        super().__init__()
        if not isinstance(hypersolver, HyperSolver):
            raise TypeError(
                f"{type(self).__name__} wraps a HyperSolver (e.g. HyperEuler(g)), got {type(hypersolver).__name__}"
            )
        self.hypersolver = hypersolver

    @property
    def order(self) -> int:
        return self.hypersolver.order

    @property
    def tableau(self) -> ButcherTableau:
        return self.hypersolver.tableau

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return self.hypersolver.dtype

    @property
    def validity(self) -> Optional[Validity]:
        """Where the hypersolver's g was fitted."""
        return self.hypersolver.validity

    @property
    def base_solver(self) -> FixedStepSolver:
        return self.hypersolver.base_solver

    @property
    def time_grid(self) -> Optional[Tensor]:
        """The hypersolver's tuned time grid (None when it was not tuned)."""
        return self.hypersolver.time_grid

    def describe(self) -> str:
        """The hypersolver's description (a subclass adds what the wrapper does)."""
        return self.hypersolver.describe()

    def sync_device_dtype(self, x: Any, t_span: Tensor) -> Tuple[Any, Tensor]:
        """torchdyn hook (once per solve): the hypersolver's."""
        return self.hypersolver.sync_device_dtype(x, t_span)

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """The fast path's once-per-solve hook: the hypersolver's."""
        self.hypersolver.check_inputs(x, t_span)

    def record_initial_state(self, z0: Tensor) -> None:
        """The hypersolver's (a CUDA-graph solve records its static initial state with it)."""
        self.hypersolver.record_initial_state(z0)

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One step; torchdyn's ``(_, x_next, _)`` return (the hypersolver's, unless overridden)."""
        return self.hypersolver.step(f, x, t, dt, k1, args)

    def solve(self, f: VectorField, z0: Tensor, t_span, return_trajectory: bool = True, **fast) -> Tensor:
        """Integrate over ``t_span`` with the package's fast loop (:func:`~._loop.fixed_solve`)."""
        return fixed_solve(self, f, z0, t_span, return_trajectory, **fast)


def unwrap(solver: nn.Module) -> nn.Module:
    """The hypersolver inside any number of :class:`WrappedSolver`\\ s (``solver`` itself if it is none)."""
    while isinstance(solver, WrappedSolver):
        solver = solver.hypersolver
    return solver
