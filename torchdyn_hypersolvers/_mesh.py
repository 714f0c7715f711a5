"""Time meshes: validation, unions of uniform meshes, torchdyn's time-reversal convention,
and mapping a per-step function over every step of a trajectory at once."""

from __future__ import annotations

import math
import operator
import warnings
from fractions import Fraction
from typing import Callable, Dict, Iterable, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["check_t_span", "check_time_grid", "forward_time", "step_times", "map_steps", "mesh_union"]


def check_t_span(t_span) -> Tensor:
    """Return ``t_span`` as a 1-D floating tensor of at least two finite, strictly monotonic points."""
    t_span = torch.as_tensor(t_span)
    if not t_span.is_floating_point():
        raise TypeError(f"t_span must be floating point, got dtype {t_span.dtype}; e.g. torch.linspace(0, 1, 9)")
    if t_span.dim() != 1 or t_span.numel() < 2:
        raise ValueError(f"t_span must be 1-D with at least two points, got shape {tuple(t_span.shape)}")
    if not bool(torch.isfinite(t_span).all()):
        raise ValueError(f"t_span must be finite, got {t_span.tolist()}")
    steps = t_span[1:] - t_span[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError(f"t_span must be strictly increasing or strictly decreasing, got {t_span.tolist()}")
    return t_span


def check_time_grid(grid) -> Tuple[float, ...]:
    """A time grid as a tuple of floats: at least two finite, strictly monotonic times (a ``ValueError``
    naming the grid otherwise; one that is not 1-D is refused by its shape, never flattened)."""
    try:
        tensor = torch.as_tensor(grid, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"a time grid is a 1-D sequence of times, e.g. [0.0, 0.5, 1.0]; got {grid!r}") from err
    if tensor.dim() != 1:
        raise ValueError(
            f"a time grid must be 1-D (one time per point), got shape {tuple(tensor.shape)}: pass the grid's "
            "times as a flat list or a 1-D tensor, e.g. [0.0, 0.5, 1.0]"
        )
    values = tuple(float(v) for v in tensor.tolist())
    steps = [b - a for a, b in zip(values, values[1:])]
    if len(values) < 2 or not all(math.isfinite(v) for v in values) or not (
        all(d > 0 for d in steps) or all(d < 0 for d in steps)
    ):
        raise ValueError(f"a time grid needs at least two finite, strictly monotonic times, got {list(values)}")
    return values


def forward_time(f: Callable, t_span: Tensor) -> Tuple[Callable, Tensor]:
    """torchdyn's convention for a decreasing ``t_span``: solve ``-f(-t, z)`` on ``-t_span``.

    Applying it here makes every solve, residual and fit in this package see the same
    (t, dt, f) that a hypersolver sees inside ``torchdyn.numerics.odeint``.
    """
    if t_span[1] < t_span[0]:
        return (lambda t, z: -f(-t, z)), -t_span
    return f, t_span


def step_times(t_span: Tensor) -> Tuple[Tensor, Tensor]:
    """``(t_k, dt_k)`` of every step, in the forward-time frame of :func:`forward_time`."""
    if t_span[1] < t_span[0]:
        t_span = -t_span
    return t_span[:-1], t_span[1:] - t_span[:-1]


def map_steps(fn: Callable, *per_step: Tensor):
    """Apply ``fn`` to every slice ``k`` of the leading (time) dimension in one batched call.

    ``fn`` is written for one step (scalar ``t`` and ``dt``, one batch of states);
    ``torch.func.vmap`` runs all steps together, so f and g see one large batch and
    there is no Python loop over steps. A callable that vmap says it cannot trace
    (data-dependent control flow, ``.item()``, in-place writes such as torchdyn's
    ``GalLinear``) falls back to a loop, with a ``RuntimeWarning`` every time. Any other
    error (out of memory, a CUDA error, a bug in f or g) propagates.
    """
    try:
        return torch.func.vmap(fn)(*per_step)
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError) or "vmap" not in str(err):
            raise
        warnings.warn(
            f"could not vectorise {getattr(fn, '__qualname__', fn)!s} over time steps "
            f"({type(err).__name__}: {err}); falling back to a loop over steps",
            RuntimeWarning,
            stacklevel=2,
        )
    outputs = [fn(*(x[k] for x in per_step)) for k in range(per_step[0].shape[0])]
    return _stack_outputs(outputs)


def _stack_outputs(outputs):
    """Stack per-step outputs along a new leading dim; tuples (nested too) part by part."""
    if isinstance(outputs[0], tuple):
        return tuple(_stack_outputs(list(parts)) for parts in zip(*outputs))
    return torch.stack(outputs)


def _step_count(n):
    """``n`` as a positive int, or None for anything else (2.7, '3', True, 0, -1)."""
    if isinstance(n, bool) or getattr(n, "dtype", None) == torch.bool:
        return None
    try:
        count = operator.index(n)
    except TypeError:
        return None
    return count if count >= 1 else None


def mesh_union(t0: float, t1: float, steps: Sequence[int]) -> Tuple[Tensor, Dict[int, Tensor]]:
    """The union of the uniform meshes with the given step counts on ``[t0, t1]``.

    Points shared by several meshes are stored once (fractions are compared exactly).
    """
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ValueError(f"steps must be a sequence of positive integers, got {steps!r}")
    given = list(steps)
    bad = [n for n in given if _step_count(n) is None]
    if bad or not given:
        raise ValueError(
            f"steps must be positive integers (step counts of uniform meshes), got {given!r}"
            + (f": {', '.join(repr(n) for n in bad)} is not" if bad else "")
        )
    steps = sorted({_step_count(n) for n in given})
    fractions = sorted({Fraction(i, n) for n in steps for i in range(n + 1)})
    position = {fr: k for k, fr in enumerate(fractions)}
    t = torch.tensor([t0 + float(fr) * (t1 - t0) for fr in fractions], dtype=torch.float64)
    meshes = {n: torch.tensor([position[Fraction(i, n)] for i in range(n + 1)]) for n in steps}
    return t, meshes
