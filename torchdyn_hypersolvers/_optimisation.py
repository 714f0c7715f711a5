"""The optimisation recipe of every fit of g, shared by :func:`~.fit.fit` and the Lightning module.

AdamW with cosine annealing, gradient-norm clipping, a stop with :class:`FitDivergedError`
when the loss or the gradient stops being finite, and the hypersolver's validity record
suspended while g changes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["FitDivergedError", "LastFinite", "diverged", "optimizer_and_schedule", "clip_gradients", "fitting"]


class FitDivergedError(FloatingPointError):
    """The fitting loss or its gradient stopped being finite; g keeps its last finite weights."""


def diverged(event: str, where: str) -> FitDivergedError:
    """The error for ``event`` (``'the residual loss became nan'``) at ``where`` (``'iteration 12'``)."""
    return FitDivergedError(f"{event} at {where}; g keeps its weights from before it")


class LastFinite:
    """One copy of g's parameters, refreshed before every optimiser step (a device copy, no host
    synchronisation), so that a fit that diverges can put back g's last finite weights."""

    def __init__(self, params: List[nn.Parameter]):
        self.params = list(params)
        with torch.no_grad():
            self.copy = [p.detach().clone() for p in self.params]

    def keep(self) -> None:
        """Remember the current weights (call it just before ``optimizer.step()``)."""
        with torch.no_grad():
            torch._foreach_copy_(self.copy, [p.detach() for p in self.params])

    def restore_if_nonfinite(self) -> bool:
        """Put the remembered weights back when any current weight is nan or inf; whether it did."""
        with torch.no_grad():
            if all(bool(torch.isfinite(p).all()) for p in self.params):
                return False
            torch._foreach_copy_([p.data for p in self.params], self.copy)
        return True


def optimizer_and_schedule(
    params: List[nn.Parameter], lr: float, lr_min: float, weight_decay: float, iterations: int
) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW, annealed from ``lr`` to ``lr_min`` over ``iterations`` steps on a cosine."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=lr_min)
    return optimizer, schedule


def clip_gradients(params: List[nn.Parameter], clip: float, where: str) -> None:
    """Clip the gradients' global norm at ``clip``; a non-finite gradient stops the fit."""
    try:
        torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=True)
    except RuntimeError as err:
        raise diverged("the gradient became non-finite", where) from err


@contextlib.contextmanager
def fitting(hs: nn.Module) -> Iterator[None]:
    """g in training mode and the validity record suspended (no warnings while g changes);
    both restored on exit, whatever happens."""
    modes = [(m, m.training) for m in hs.modules()]
    validity, hs.validity = hs.validity, None
    hs.train()
    try:
        yield
    finally:
        for m, flag in modes:
            m.train(flag)
        hs.validity = validity
