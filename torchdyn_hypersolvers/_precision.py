"""Reference precision for residual targets: the tolerance and dtype a base order needs.

A residual target is ``(z_ref[k+1] - z[k] - dt psi) / dt**(p+1)``: the reference solver's
error is divided by ``dt**(p+1)`` too. :func:`precise_tolerance` picks the reference tolerance
so that this error is a small fraction of the targets on the finest mesh; :func:`in_float64`
and :func:`float64_field` evaluate f in float64 without touching the user's model.

The rule (``harvest(..., base=...)`` with atol / rtol not given):

1. estimate the base's residual scale ``|R|`` cheaply by step doubling (Richardson): on a
   few initial states, along the finest mesh, one base step of ``dt`` against two of ``dt/2``
   gives the base's local error ``C dt**(p+1)``, so ``|R| ~ mean |z_2 - z_1| / ((1 - 2**-p) |dt|**(p+1))``;
2. ``tol = TARGET_FRACTION * SAFETY * |dt_min|**(p+1) * |R| / (1 + mean |z|)`` (atol = rtol = tol:
   the adaptive solver's error per entry is about ``tol * (1 + |z|)``; the safety factor covers
   the error accumulated over the adaptive steps inside one mesh step and the interpolation);
3. clamped to ``[MIN_TOLERANCE, MAX_TOLERANCE]``;
4. float64 for the reference solve when ``tol < 1e-7`` or ``p >= 2`` (float32's rounding,
   about 6e-8 relative, divided by ``dt**(p+1)``, would swamp the targets).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .tableaus import ButcherTableau, rk_stages

__all__ = [
    "precise_tolerance",
    "in_float64",
    "in_dtype",
    "field_in",
    "float64_field",
    "cast_floating",
    "parameter_dtype",
]

TARGET_FRACTION = 0.01
"""The reference error allowed in the residual targets, as a fraction of them."""
SAFETY = 0.1
MIN_TOLERANCE = 1e-12
MAX_TOLERANCE = 1e-6
FLOAT64_BELOW = 1e-7
"""Tolerances below this (or a base of order >= 2) get a float64 reference solve."""
SAMPLE = 16


def parameter_dtype(module) -> Optional[torch.dtype]:
    """The dtype of a module's first floating-point parameter (or buffer), or None."""
    if isinstance(module, nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
    return None


def in_float64(f: Callable) -> Callable:
    """``f`` evaluating in float64: for a module whose floating-point parameters or buffers are
    not all float64, a float64 deep copy (the user's module is never modified); anything else as it is."""
    return in_dtype(f, torch.float64)


def in_dtype(f: Callable, dtype: torch.dtype) -> Callable:
    """``f`` evaluating in ``dtype``: for a module whose floating-point parameters or buffers are not
    all of it, a deep copy cast to it (the user's module is never modified); anything else as it is."""
    if not isinstance(f, nn.Module):
        return f
    tensors = [*f.parameters(), *f.buffers()]
    if all(v.dtype == dtype for v in tensors if v.is_floating_point()):
        return f
    return copy.deepcopy(f).to(dtype)


def field_in(f: Callable, dtype: torch.dtype, t0: float, probe: Tensor) -> Optional[Callable]:
    """``f`` in ``dtype`` (:func:`in_dtype`) when it answers ``dtype`` for ``probe`` (states) cast to it;
    None when it fails or answers in another dtype."""
    field = in_dtype(f, dtype)
    try:
        with torch.no_grad():
            out = field(torch.tensor(t0, dtype=dtype, device=probe.device), probe.to(dtype))
    except (RuntimeError, TypeError, ValueError):
        return None
    return field if isinstance(out, Tensor) and out.dtype == dtype else None


def float64_field(f: Callable, t0: float, probe: Tensor) -> Optional[Callable]:
    """``f`` in float64 (see :func:`in_float64`) if it returns float64 for float64 states;
    None (with a ``UserWarning``) when it fails or answers in another dtype."""
    field = in_float64(f)
    why = None
    try:
        with torch.no_grad():
            out = field(torch.tensor(t0, dtype=torch.float64, device=probe.device), probe.double())
        if not (isinstance(out, Tensor) and out.dtype == torch.float64):
            why = f"it returned {getattr(out, 'dtype', type(out).__name__)} for float64 states"
    except (RuntimeError, TypeError, ValueError) as err:
        why = f"it failed on float64 states ({type(err).__name__}: {err})"
    if why is None:
        return field
    warnings.warn(
        f"the vector field cannot be evaluated in float64: {why}; the reference is solved in "
        f"{probe.dtype}, which limits the residual targets' precision (they are divided by dt**(p+1)). "
        "Pass the field as an nn.Module (converted to float64 on a copy) or make it follow its input's dtype.",
        UserWarning,
        stacklevel=3,
    )
    return None


def precise_tolerance(
    f: Callable, z0: Tensor, t: Tensor, meshes: Dict[int, Tensor], tableau: ButcherTableau
) -> Tuple[float, float]:
    """``(tol, |R|)``: the reference tolerance of the module docstring's rule for the base
    ``tableau`` on the finest of ``meshes`` (indices into ``t``), and the estimated mean
    ``|R|``; ``f`` is evaluated on up to :data:`SAMPLE` of the states ``z0``, in their dtype."""
    p = tableau.order
    finest = max(meshes, key=lambda n: len(meshes[n]))
    times = t[meshes[finest]].to(dtype=z0.dtype, device=z0.device)
    z = z0[:SAMPLE]
    total, count, scale, dt_min = 0.0, 0, float(z.abs().mean()), math.inf
    with torch.no_grad():
        for k in range(len(times) - 1):
            t_k, dt = times[k], times[k + 1] - times[k]
            one = z + dt * rk_stages(tableau, f, t_k, z, dt)[0]
            half = z + dt / 2 * rk_stages(tableau, f, t_k, z, dt / 2)[0]
            two = half + dt / 2 * rk_stages(tableau, f, t_k + dt / 2, half, dt / 2)[0]
            step = abs(float(dt))
            residual = float((two - one).abs().mean()) / ((1 - 2.0**-p) * step ** (p + 1))
            if math.isfinite(residual):
                total, count = total + residual, count + 1
            z, dt_min = two, min(dt_min, step)
            scale = max(scale, float(z.abs().mean()))
    r_scale = total / count if count else 0.0
    if not (r_scale > 0 and math.isfinite(dt_min)):
        return MIN_TOLERANCE, r_scale  # a field the base integrates exactly (or nothing to measure)
    tol = TARGET_FRACTION * SAFETY * dt_min ** (p + 1) * r_scale / (1 + scale)
    return min(max(tol, MIN_TOLERANCE), MAX_TOLERANCE), r_scale


def cast_floating(data, dtype: Optional[torch.dtype]):
    """A dataclass (``ResidualData``) with its floating-point tensors, and tuples of them, cast
    to ``dtype`` (as it is for None or when nothing changes)."""
    if dtype is None:
        return data

    def cast(value):
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v) for v in value)
        return value

    changes = {}
    for spec in dataclasses.fields(data):
        value = getattr(data, spec.name)
        cast_value = cast(value)
        if cast_value is not value:
            changes[spec.name] = cast_value
    return dataclasses.replace(data, **changes) if changes else data
