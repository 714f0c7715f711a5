"""Learned time grids: where a fixed number of steps should fall on ``[t0, t1]``.

A grid of ``n`` steps is ``n`` logits: the step sizes are ``(t1 - t0) * softmax(logits)``, so
every grid is strictly monotone, starts at ``t0`` and ends at ``t1`` exactly, and the zero
logits are the uniform grid. :func:`fit_time_grid` fits the logits to a solver's terminal error
against reference solutions; the solver (and its g) and the vector field do not change.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._checks import check_int, nonfinite_rows
from ._loop import fixed_solve
from ._mesh import check_t_span
from ._outside_fit import outside_fit_ignored
from ._user_model import owned_modules, preserved

__all__ = ["grid_from_logits", "fit_time_grid", "grid_collision"]

LOGIT_BOUND = 4.0
"""Logits are kept in [-4, 4]: no step is more than e^8 (about 3000) times another, and no two
grid points can round to the same time."""


def grid_from_logits(logits: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
    """The ``t_span`` of ``len(logits)`` steps from ``t0`` to ``t1`` with step fractions ``softmax(logits)``."""
    if logits.dim() != 1 or logits.numel() < 1:
        raise ValueError(f"logits must be 1-D with one entry per step, got shape {tuple(logits.shape)}")
    t0, t1 = t0.to(logits).reshape(1), t1.to(logits).reshape(1)
    inner = t0 + (t1 - t0) * torch.cumsum(torch.softmax(logits, 0), 0)[:-1]
    return torch.cat([t0, inner, t1])


def fit_time_grid(
    solver: nn.Module,
    f: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor,
    z1: Tensor,
    t_span,
    steps: int,
    iterations: int = 200,
    lr: float = 0.05,
    batch_size: int = 256,
    seed: Optional[int] = 0,
) -> Tensor:
    """The grid of ``steps`` steps on ``[t_span[0], t_span[-1]]`` on which ``solver`` best reaches ``z1`` from ``z0``.

    Minimises the mean terminal error ``||solve(z0) - z1||`` over batches of ``batch_size``
    initial states with Adam, starting from the uniform grid; only the grid's ``steps`` logits
    are fitted (gradients are taken with respect to them alone: neither the solver's g nor f gets
    a ``.grad``). Returns the grid (detached, in ``z0``'s dtype, on its device).

    Args:
        solver: any fixed-step solver of the torchdyn protocol (a hypersolver, or a classical one).
        z0, z1: initial states ``[N, ...]`` and the reference states at ``t_span[-1]``.
        t_span: its first and last points are the grid's ends (a decreasing one is a backward grid).
    """
    check_int(steps, "steps")
    check_int(iterations, "iterations", minimum=0)
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and {tuple(z1.shape)}")
    _check_states(z0, "z0")
    _check_states(z1, "z1")
    span = check_t_span(t_span)
    t0, t1 = span[0].to(z0), span[-1].to(z0)
    collision = grid_collision(steps, span[0], span[-1], z0.dtype)
    if collision:
        raise ValueError(collision)
    logits = torch.zeros(steps, dtype=z0.dtype, device=z0.device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    z1 = z1.to(z0)
    good = logits.detach().clone()
    modes = [(m, m.training) for m in solver.modules()]
    solver.eval()
    try:
        # f's modules: eval mode, and every parameter and buffer put back (a BatchNorm's running statistics)
        with preserved(*owned_modules(f), restore=True), outside_fit_ignored():  # between fitted steps: no warnings
            for iteration in range(iterations):
                index = torch.randperm(len(z0), generator=generator)[:batch_size].to(z0.device)
                grid = grid_from_logits(logits, t0, t1)
                final = fixed_solve(solver, f, z0[index], grid, return_trajectory=False)
                loss = (final - z1[index]).flatten(1).norm(dim=1).mean()
                (grad,) = torch.autograd.grad(loss, [logits])
                if not bool(torch.isfinite(loss) and torch.isfinite(grad).all()):
                    _warn_non_finite(iteration, iterations, loss)  # go back to the last logits whose solve was finite
                    break
                good = logits.detach().clone()
                logits.grad = grad
                optimizer.step()
                with torch.no_grad():
                    logits.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
            else:
                good = logits.detach()
    finally:
        for module, flag in modes:
            module.train(flag)
    return grid_from_logits(good, t0, t1)


def grid_collision(steps: int, t0, t1, dtype: torch.dtype) -> str:
    """Why ``steps`` steps on ``[t0, t1]`` cannot be told apart in ``dtype`` ('' when they can): the
    smallest step a grid may take (logits at the bound) is not above the spacing of ``dtype``'s
    numbers at the interval's larger end, so a learned grid would hold repeated times."""
    t0, t1 = float(t0), float(t1)
    smallest = abs(t1 - t0) / (1.0 + (steps - 1) * math.exp(2 * LOGIT_BOUND))  # one logit at -bound, the rest at +
    spacing = torch.finfo(dtype).eps * max(abs(t0), abs(t1))
    if smallest > spacing:
        return ""
    name = str(dtype).replace("torch.", "")
    return (
        f"{steps} steps on [{t0:.10g}, {t1:.10g}] collide at {name} resolution: a learned grid's smallest step "
        f"({smallest:.3g}) is not above the spacing of {name} times near {max(abs(t0), abs(t1)):.3g} ({spacing:.3g}); "
        "use float64 or shift t (an interval that starts near 0), or fewer steps"
    )


def _check_states(z: Tensor, name: str) -> None:
    """Refuse (``ValueError``, with the rows) empty states or states with nan or inf."""
    if z.dim() == 0 or len(z) == 0:
        raise ValueError(f"{name} is empty (0 rows, shape {tuple(z.shape)}): pass states [N, ...] with N >= 1")
    bad, rows = nonfinite_rows(z)
    if bad:
        raise ValueError(
            f"{name} has non-finite (nan or inf) values in {len(bad)} of {len(z)} rows (rows {rows}): a grid cannot "
            "be fitted to them; remove or repair those rows"
        )


def _warn_non_finite(iteration: int, iterations: int, loss: Tensor) -> None:
    what = "loss" if not math.isfinite(float(loss)) else "gradient"
    warnings.warn(
        f"fit_time_grid: the {what} became non-finite (nan or inf) at iteration {iteration + 1} of {iterations} "
        "(the solve blew up on that grid, or f returned nan); the last finite grid is returned"
        + (" (the uniform grid)" if iteration == 0 else ""),
        UserWarning,
        stacklevel=3,
    )
