"""Fitting for one budget, end to end: g and the time grid together, on the error of the whole solve.

A residual fit teaches g the base solver's local error on every step of several meshes, so that one
g serves many step counts. Once the budget is fixed (``n`` steps), what matters is the error at the
end of the one ``n``-step solve: :func:`fit_budget` starts from the fitted g and the uniform grid
and fits both to it (later work on learned solvers, Bespoke and LD3, fits for the budget the same
way; the grid is ``n`` softmax logits, as :func:`~.tuning.fit_time_grid` fits them alone).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch
from torch import Tensor

from ._optimisation import Recipe, fitting, resolve_recipe
from ._time_grid import LOGIT_BOUND, grid_collision, grid_from_logits
from ._user_model import owned_modules, preserved
from .fit import FitReport, _optimise, _placed
from .harvest import Trajectories
from .nonstationary import NonStationarySolver
from .solvers import HyperSolver
from .validity import Validity

__all__ = ["BUDGET_RECIPE", "COEFFICIENTS_RECIPE", "fit_budget"]

BUDGET_RECIPE = Recipe(iterations=500, batch_size=256, lr=2e-3, lr_min=1e-5, weight_decay=0.0, warmup=0)
"""The default recipe: a gentle learning rate, since g starts from its residual fit."""
COEFFICIENTS_RECIPE = BUDGET_RECIPE.replace(lr=5e-3)
"""The default recipe of per-step coefficients without g: they start from the base tableau, not from a fitted
g, and learn faster at a higher learning rate (tune's coefficient-only finalists on five workloads, same
iterations, fitted alone: 0.3-1.0x the held-out error at ``BUDGET_RECIPE``'s learning rate on 26 of 28
budgets, 1.1x and 1.3x on two)."""


def fit_budget(
    hs: HyperSolver,
    trajectories: Trajectories,
    recipe: Optional[Recipe] = None,
    grid: bool = True,
    progress: bool = True,
    seed: Optional[int] = 0,
    **overrides,
) -> FitReport:
    """Fit g (and, with ``grid``, the time grid) for the budget of ``trajectories``' one mesh.

    The loss is the mean over trajectories of ``||z_n - z_ref(t1)||``, the terminal error of the
    hypersolver's ``n``-step solve from each reference's first state, on batches of
    ``recipe.batch_size`` trajectories (a new batch every iteration); gradients flow to g's
    parameters and the grid's logits, never to f. Start from a fitted g (``fit`` or ``tune``): the
    default recipe (:data:`BUDGET_RECIPE`, 500 iterations) only refines it; per-step coefficients
    without g (a :class:`~.nonstationary.NonStationarySolver` with none) get :data:`COEFFICIENTS_RECIPE`,
    at a higher learning rate. At the end
    ``hs.time_grid`` is the fitted grid (the uniform one without ``grid``), and ``hs.validity``
    covers its step sizes. Returns the :class:`~.fit.FitReport` (method ``'budget'``).

    Raises:
        ValueError: trajectories with more than one mesh (select the budget's: ``trajectories.replace(
            meshes={n: trajectories.meshes[n]})``), a grid whose points collide in the states' dtype.
    """
    if recipe is None:
        recipe = COEFFICIENTS_RECIPE if _coefficients_only(hs) else BUDGET_RECIPE
    recipe = resolve_recipe(recipe, overrides, "fit_budget")
    if len(trajectories.meshes) != 1:
        raise ValueError(
            f"fit_budget fits one budget: the trajectories hold meshes of {trajectories.steps} steps; select one, "
            "e.g. trajectories.replace(meshes={n: trajectories.meshes[n]})"
        )
    trajectories, f, params = _placed(hs, trajectories, None)
    (steps,) = trajectories.steps
    t_span, states = trajectories.mesh(steps)
    dtype = params[0].dtype
    z0, z1, t_span = states[0].to(dtype), states[-1].to(dtype), t_span.to(dtype)
    if grid and grid_collision(steps, t_span[0], t_span[-1], dtype):
        raise ValueError(grid_collision(steps, t_span[0], t_span[-1], dtype))
    logits = torch.zeros(steps, dtype=dtype, device=z0.device, requires_grad=grid)
    loss = _TerminalLoss(hs, f, z0, z1, t_span, logits, recipe.batch_size, seed)
    start = time.perf_counter()
    with preserved(*owned_modules(f)), fitting(hs):
        history = _optimise(params + ([logits] if grid else []), loss, recipe, "budget", progress)
    final = loss.grid().detach()
    hs.time_grid = final
    dts = (final[1:] - final[:-1]).abs()  # the record covers the grid's steps
    report = FitReport("budget", recipe.iterations, time.perf_counter() - start, history, {}, {})
    record = Validity.of_trajectories(trajectories, how=f"{report.describe()} on a {steps}-step grid")
    widest = {"dt_min": min(record.dt_min, dts.min().item()), "dt_max": max(record.dt_max, dts.max().item())}
    hs.validity = dataclasses.replace(record, **widest)
    return report


def _coefficients_only(hs: HyperSolver) -> bool:
    """Whether ``hs`` learns per-step coefficients and has no g."""
    return isinstance(hs, NonStationarySolver) and hs.coefficients.g is None


class _TerminalLoss:
    """The loss of one iteration: the terminal error of the solve of a fresh batch on the current grid."""

    def __init__(self, hs, f, z0: Tensor, z1: Tensor, t_span: Tensor, logits: Tensor, batch: int, seed):
        self.hs, self.f, self.z0, self.z1, self.logits, self.batch = hs, f, z0, z1, logits, batch
        self.t0, self.t1 = t_span[0], t_span[-1]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def grid(self) -> Tensor:
        return grid_from_logits(self.logits.clamp(-LOGIT_BOUND, LOGIT_BOUND), self.t0, self.t1)

    def __call__(self, i: int) -> Tensor:
        index = torch.randperm(len(self.z0), generator=self.generator)[: self.batch].to(self.z0.device)
        final = self.hs.solve(self.f, self.z0[index], self.grid(), return_trajectory=False)
        return (final - self.z1[index]).flatten(1).norm(dim=1).mean()
