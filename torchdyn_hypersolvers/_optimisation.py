"""The optimisation recipe of every fit of g, shared by :func:`~.fit.fit`, :func:`~.tuning.tune` and
the Lightning module.

:class:`Recipe` holds the settings (AdamW with cosine annealing, gradient-norm clipping, the batch
schedule, the iterations); the helpers here run them: a stop with :class:`FitDivergedError` when
the loss or the gradient stops being finite, and g in training mode with the outside-the-fit
warning silenced while g changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._checks import check_int
from ._outside_fit import outside_fit_ignored

__all__ = [
    "Recipe",
    "resolve_recipe",
    "FitDivergedError",
    "LastFinite",
    "diverged",
    "optimizer_and_schedule",
    "clip_gradients",
    "fitting",
]


def _check_real(value, name: str, *, zero: bool = False, infinite: bool = False) -> float:
    """``value`` as a float if it is a real number (not a bool, not nan) above zero (or at zero with
    ``zero``; infinite only with ``infinite``); else a ``ValueError`` naming ``name`` and the value."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value >= 0 if zero else value > 0) and (infinite or math.isfinite(value))
    if not ok:
        what = "a non-negative" if zero else "a positive"
        raise ValueError(f"{name} must be {what}{'' if infinite else ' finite'} number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Recipe:
    """How g is optimised: AdamW with cosine annealing, gradient clipping and the paper's batch schedule.

    ``warmup`` iterations on one batch of ``batch_size`` trajectories, then a new batch every
    ``swap_every`` iterations; AdamW with ``weight_decay``, its learning rate annealed on a cosine
    from ``lr`` to ``lr_min`` over ``iterations``; the gradients' global norm clipped at ``clip``
    (``float('inf')``: no clipping).

    ``refine``: after the fit, this many iterations of trajectory fitting on the meshes fitted, each
    mesh's mean ``|z - z_ref|`` divided by the base solver's, from ``lr_min`` to ``lr_min / 10``
    (0: none). ``balance_meshes``: weigh each mesh's residual error by ``1 / mean(R**2)`` on that mesh
    (residual fitting; ``None``: for a base of order 4 or more) and scale g's output to the targets'
    root mean square (``hs.residual_scale``; not for a g that scales its own output), so that g learns
    residuals of order one on every mesh. Both are :func:`~.fit.fit`'s only.

    Fields can be overridden by keyword where a recipe is taken: ``fit(hs, trajectories,
    recipe=Recipe(lr=5e-3), iterations=200)``; ``recipe.replace(iterations=200)`` is a copy.
    """

    iterations: int = 1000
    batch_size: int = 64
    lr: float = 1e-2
    lr_min: float = 5e-4
    weight_decay: float = 1e-6
    warmup: int = 10
    swap_every: int = 10
    clip: float = 1.0
    refine: int = 0
    balance_meshes: Optional[bool] = None

    def __post_init__(self) -> None:
        for name, minimum in (("iterations", 1), ("batch_size", 1), ("warmup", 0), ("swap_every", 1), ("refine", 0)):
            check_int(getattr(self, name), name, minimum)
        _check_real(self.lr, "lr", zero=True, infinite=True)  # an infinite lr diverges: fit says so
        _check_real(self.lr_min, "lr_min", zero=True)
        _check_real(self.weight_decay, "weight_decay", zero=True)
        _check_real(self.clip, "clip", infinite=True)
        if self.balance_meshes is not None and not isinstance(self.balance_meshes, bool):
            raise ValueError(f"balance_meshes must be None or a bool, got {self.balance_meshes!r}")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)


def resolve_recipe(
    recipe: Optional[Recipe],
    overrides: Dict[str, Any],
    caller: str,
    fields: Optional[Tuple[str, ...]] = None,
    positional: Optional[str] = None,
) -> Recipe:
    """``recipe`` (default ``Recipe()``) with ``caller``'s keyword ``overrides`` of its fields applied.

    An override that is not one of ``fields`` (default: every field) is a ``TypeError`` naming it, as
    Python's own. A number given as ``recipe`` is the field ``positional`` that stood in its place
    before recipes (``fit(hs, trajectories, 'residual', 500)``): accepted with a ``DeprecationWarning``.
    """
    allowed = fields if fields is not None else tuple(f.name for f in dataclasses.fields(Recipe))
    for name in overrides:
        if name not in allowed:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    if positional is not None and isinstance(recipe, numbers.Real) and not isinstance(recipe, bool):
        if positional in overrides:
            raise TypeError(f"{caller}() got multiple values for argument {positional!r}")
        warnings.warn(
            f"{caller}()'s positional {positional} is deprecated: pass {positional}={recipe!r} "
            f"or recipe=Recipe({positional}=...)",
            DeprecationWarning,
            stacklevel=3,
        )
        recipe, overrides = None, {positional: recipe, **overrides}
    if recipe is None:
        recipe = Recipe()
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"{caller}() takes recipe=Recipe(...), got {type(recipe).__name__}")
    return recipe.replace(**overrides) if overrides else recipe


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
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)  # fewer ops on the CPU too
    if all(p.device.type == "cpu" for p in params):
        # AdamW asks at every step whether a CUDA graph is being captured, an accelerator query each time (about
        # 0.15 ms with PYTORCH_NVML_BASED_CUDA_CHECK=1, which importing Lightning sets: a twentieth of a small
        # g's iteration). No graph capture involves CPU parameters.
        optimizer._accelerator_graph_capture_health_check = _no_capture_to_check
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=lr_min)
    return optimizer, schedule


def _no_capture_to_check() -> None:
    """The optimiser's graph-capture check, for parameters on the CPU."""


def clip_gradients(params: List[nn.Parameter], clip: float, where: str) -> None:
    """Clip the gradients' global norm at ``clip``; a non-finite gradient stops the fit."""
    try:
        torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=True)
    except RuntimeError as err:
        raise diverged("the gradient became non-finite", where) from err


@contextlib.contextmanager
def fitting(hs: nn.Module, keep: Sequence[nn.Module] = ()) -> Iterator[None]:
    """g in training mode and no outside-the-fit warnings while g changes (:func:`outside_fit_ignored`);
    the modes restored on exit, whatever happens. ``hs.validity`` is not touched. The modules in
    ``keep`` (the vector field, when g holds it) stay in the mode they are in."""
    modes = [(m, m.training) for m in hs.modules()]
    kept = [(m, m.training) for module in keep for m in module.modules()]
    hs.train()
    for m, flag in kept:  # parents before their children: each ends in its own mode
        m.train(flag)
    try:
        with outside_fit_ignored():
            yield
    finally:
        for m, flag in modes:
            m.train(flag)
