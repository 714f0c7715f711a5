"""The warning a solve gives outside where its g was fitted, and the one way to silence it.

Every solve checks the hypersolver's :class:`~.validity.Validity` record once (in
``sync_device_dtype`` for torchdyn, in the fast loop for the package's own solves, never per
step) and warns with :class:`OutsideFitWarning` when the step sizes, interval, direction or
state shape lie outside it. Code that solves outside on purpose (a grid search, a comparison
across step counts) wraps it in :func:`outside_fit_ignored`; users may also filter the class
with ``warnings.filterwarnings('ignore', category=OutsideFitWarning)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
from typing import Iterator, List

import torch
from torch import Tensor

from ._model_identity import check_model

__all__ = [
    "TOLERANCE",
    "OutsideFitWarning",
    "outside_fit_ignored",
    "check_solve",
    "check_model_of",
    "outside_fit_problems",
]

TOLERANCE = 0.05
"""Relative slack beyond the fitted step-size range (and interval) before a solve warns."""

STATE_MARGIN = 0.5
"""Initial states further than this share of the harvested range's width outside it (per feature) warn."""

_IGNORED = contextvars.ContextVar("torchdyn_hypersolvers_outside_fit_ignored", default=False)


class OutsideFitWarning(UserWarning):
    """A hypersolver is solving outside where its g was fitted: its correction is an extrapolation."""


@contextlib.contextmanager
def outside_fit_ignored() -> Iterator[None]:
    """Within the block, solves do not check their validity record (no :class:`OutsideFitWarning`,
    and none of the check's work). Per thread and per async task."""
    token = _IGNORED.set(True)
    try:
        yield
    finally:
        _IGNORED.reset(token)


def outside_fit_problems(validity, x: Tensor, t_span) -> List[str]:
    """How a solve of ``x`` over ``t_span`` leaves ``validity``'s fitted range, in phrases ([] when
    it does not). One host synchronisation when ``t_span`` lives on an accelerator."""
    t_span = torch.as_tensor(t_span)
    if t_span.dim() != 1 or t_span.numel() < 2:
        return []  # the solver itself refuses such a mesh
    dts = (t_span[1:] - t_span[:-1]).abs()
    lo, hi, start, end = torch.stack([dts.min(), dts.max(), t_span[0], t_span[-1]]).tolist()
    problems = []
    if lo < validity.dt_min * (1 - TOLERANCE) or hi > validity.dt_max * (1 + TOLERANCE):
        problems.append(f"with step sizes |dt| in [{lo:.4g}, {hi:.4g}]")
    if validity.t0 is not None:
        direction = "forward" if end > start else "backward"
        if direction != validity.direction:
            problems.append("backward in time (t decreasing)" if direction == "backward" else "forward in time")
        fitted_lo, fitted_hi = min(validity.t0, validity.t1), max(validity.t0, validity.t1)
        slack = TOLERANCE * (fitted_hi - fitted_lo)
        if min(start, end) < fitted_lo - slack or max(start, end) > fitted_hi + slack:
            text = f"over the interval from t={start + 0.0:.4g} to t={end + 0.0:.4g}"
            if fitted_lo - slack <= -max(start, end) and -min(start, end) <= fitted_hi + slack:
                text += " (a backward solve as torchdyn runs it: -f(-t, z) on the negated t_span)"
            problems.append(text)
    shape = tuple(x.shape[1:])
    if shape != validity.state_shape:
        problems.append(f"with states of shape {shape}")
    elif validity.has_state_range and x.shape[0] > 0:
        outside = int(validity.outside(x, STATE_MARGIN).sum())
        if outside:
            problems.append(
                f"from {outside} of {x.shape[0]} initial states outside the harvested states' range "
                f"(widened by {STATE_MARGIN:.0%} of its width per feature)"
            )
    return problems


def check_solve(solver, x: Tensor, t_span) -> None:
    """Warn (:class:`OutsideFitWarning`) when ``solver`` carries a validity record and a solve of
    ``x`` over ``t_span`` leaves it; nothing without a record or inside :func:`outside_fit_ignored`."""
    if _IGNORED.get():
        return
    _check_g_weights(solver)
    validity = getattr(solver, "validity", None)
    if validity is None:
        return
    problems = outside_fit_problems(validity, x, t_span)
    if problems:
        warnings.warn(
            f"{type(solver).__name__} is solving {' and '.join(problems)}, outside where its g was fitted: "
            f"{validity.range_text()}. Its correction is an extrapolation there; describe() says more.",
            OutsideFitWarning,
            stacklevel=_user_stacklevel(),
        )


def _check_g_weights(solver) -> None:
    """Warn (``RuntimeWarning``) when g holds nan or inf weights: every corrected step would be nan.
    One host read per solve; never while fitting (the fit has its own divergence check)."""
    g = getattr(solver, "hypernet", None)
    params = [p for p in g.parameters() if p.is_floating_point()] if isinstance(g, torch.nn.Module) else []
    versions = tuple((id(p), p._version) for p in params)  # bumped by every in-place change autograd sees
    if not params or solver.__dict__.get("_finite_weights") == versions:
        return
    if bool(torch.stack(torch._foreach_norm([p.detach() for p in params], float("inf"))).isfinite().all()):
        solver.__dict__["_finite_weights"] = versions  # checked again only when a weight changes
        return
    names = [name for name, p in g.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    warnings.warn(
        f"{type(solver).__name__}'s g holds nan or inf weights ({', '.join(names[:5])}): its corrections, and so "
        "the solution, are not finite; refit or reload g (load refuses such files)",
        RuntimeWarning,
        stacklevel=_user_stacklevel(),
    )


def check_model_of(solver, f) -> None:
    """Warn (:class:`OutsideFitWarning`, once per model object) when ``solver``'s g was fitted on a
    model with other weights than ``f``'s; nothing inside :func:`outside_fit_ignored` or for ``f=None``."""
    if f is None or _IGNORED.get():
        return
    text = check_model(solver, f)
    if text is not None:
        warnings.warn(text, OutsideFitWarning, stacklevel=_user_stacklevel())


_LIBRARY_PREFIXES = ("torchdyn_hypersolvers", "torchdyn", "torch", "torchdiffeq", "pytorch_lightning", "lightning")


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside this package, torchdyn and torch, so that a
    warning names the user's line (and Python's default filter shows it once per line and problem)."""
    frame, level = sys._getframe(2), 2  # the caller of check_solve
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_PREFIXES:
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2
