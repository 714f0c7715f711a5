"""Recognising torchdyn's adjoint solve, where a hypersolver runs its base solver uncorrected.

torchdyn (1.0.x) solves the adjoint of ``sensitivity='adjoint'`` (without ``solver_adjoint``)
and ``'interpolated_adjoint'`` with the forward solver, on a flattened adjoint state that g was
never fitted on. This module tells that solve apart from every other one, and keeps a hypersolver's
per-solve state (its :class:`~.solvers.SolveState`) uncorrected until the backward pass ends.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Callable, Optional

import torch

__all__ = ["torchdyn_adjoint_solve", "torchdyn_vector_field", "solve_uncorrected"]


def torchdyn_adjoint_solve() -> Optional[str]:
    """The sensitivity whose backward (adjoint) solve is starting now, or None: call it from
    ``sync_device_dtype``.

    The signal is the call stack, not the state's shape: torchdyn (1.0.x) solves the adjoint by
    calling ``torchdyn.numerics.odeint`` directly from ``backward`` of the ``autograd.Function``
    built in ``torchdyn.numerics.sensitivity`` (``'adjoint'`` with ``solver_adjoint``, which
    defaults to the forward solver; ``'interpolated_adjoint'`` always with the forward solver),
    and ``odeint`` calls ``solver.sync_device_dtype`` once before stepping. A flattened 1-D state
    would be a guess (unbatched forward states are legal too); this chain is exact, costs one
    walk over a few frames per solve, and matches nothing else (the forward pass runs
    ``odeint`` from ``generic_odeint``, multiple shooting from ``odeint_mshooting``)."""
    frame = _odeint_frame()
    if frame is None:
        return None
    caller = frame.f_back
    if caller is None or caller.f_code.co_name != "backward" or not _in_module(caller, "torchdyn.numerics.sensitivity"):
        return None
    code = caller.f_code  # _gather_odefunc_interp_adjoint's backward reads x(t) off a spline
    interpolated = "interp" in getattr(code, "co_qualname", "") or "x_spline" in code.co_cellvars + code.co_varnames
    return "interpolated_adjoint" if interpolated else "adjoint"


def torchdyn_vector_field() -> Optional[Callable]:
    """The vector field torchdyn's ``odeint`` was given, when the solve starting now is one of its
    (call it from ``sync_device_dtype``; None otherwise): the hook is not handed f, the steps are."""
    frame = _odeint_frame()
    return None if frame is None else frame.f_locals.get("f")


def _odeint_frame():
    """torchdyn's ``odeint`` frame that called the ``sync_device_dtype`` hook running now, or None."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name == "sync_device_dtype":  # ours, a subclass's super() chain
        frame = frame.f_back
    if frame is None or frame.f_code.co_name != "odeint" or not _in_module(frame, "torchdyn.numerics.odeint"):
        return None
    return frame


def _in_module(frame, module: str) -> bool:
    return frame.f_globals.get("__name__") == module


def solve_uncorrected(state, sensitivity: str, solver: str, base: str) -> None:
    """Mark torchdyn's adjoint solve as uncorrected on ``state`` (a hypersolver's
    :class:`~.solvers.SolveState`), for the calling thread (the one that runs the adjoint solve):
    its steps are the base solver's until the backward pass ends, and a UserWarning says so, once
    per state. Call it from ``sync_device_dtype`` (the warning points at torchdyn's ``odeint``)."""
    current = getattr(state, "current", state)  # this thread's part of the state
    current.uncorrected = True
    _reset_after_backward(current)
    if state.adjoint_warned:
        return
    state.adjoint_warned = True
    how = (
        "pass solver_adjoint=... (e.g. 'rk4' or 'dopri5') to choose it"
        if sensitivity == "adjoint"
        else "torchdyn's interpolated_adjoint always reuses the forward solver; use sensitivity='autograd' "
        "or 'adjoint' with solver_adjoint=... to choose it"
    )
    warnings.warn(
        f"{solver} is solving the adjoint of torchdyn's sensitivity={sensitivity!r} with its base "
        f"solver {base} and no correction: g was fitted for the forward state, not the adjoint's; "
        f"{how}. (Shown once per solver.)",
        UserWarning,
        stacklevel=3,
    )


def _reset_after_backward(state) -> None:
    """Set ``state.uncorrected`` back to False once this backward pass ends, so that a later direct
    ``step()`` call is corrected (every solve also resets it). ``state`` is one thread's part of a
    solver's state, held by the callback: autograd may run the callback on another thread."""
    if state.reset_queued:
        return
    ref = weakref.ref(state)

    def reset() -> None:
        live = ref()
        if live is not None:
            live.uncorrected = False
            live.reset_queued = False

    try:
        torch.autograd.Variable._execution_engine.queue_callback(reset)
    except (AttributeError, RuntimeError):  # not inside autograd's engine: the next solve resets it
        return
    state.reset_queued = True
