"""Time meshes: validation, torchdyn's time-reversal convention, and mapping a
per-step function over every step of a trajectory at once."""

from __future__ import annotations

import warnings
from typing import Callable, Tuple

import torch
from torch import Tensor

__all__ = ["check_t_span", "forward_time", "step_times", "map_steps"]


def check_t_span(t_span) -> Tensor:
    """Return ``t_span`` as a 1-D tensor of at least two strictly monotonic points."""
    t_span = torch.as_tensor(t_span)
    if t_span.dim() != 1 or t_span.numel() < 2:
        raise ValueError(f"t_span must be 1-D with at least two points, got shape {tuple(t_span.shape)}")
    if not t_span.is_floating_point():
        t_span = t_span.to(torch.get_default_dtype())
    steps = t_span[1:] - t_span[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError(f"t_span must be strictly increasing or strictly decreasing, got {t_span.tolist()}")
    return t_span


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


_warned_fallback = set()


def map_steps(fn: Callable, *per_step: Tensor):
    """Apply ``fn`` to every slice ``k`` of the leading (time) dimension in one batched call.

    ``fn`` is written for one step (scalar ``t`` and ``dt``, one batch of states);
    ``torch.func.vmap`` runs all steps together, so f and g see one large batch and
    there is no Python loop over steps. A callable that vmap cannot trace (for
    example data-dependent control flow on ``t``) falls back to a loop, with a warning.
    """
    try:
        return torch.func.vmap(fn)(*per_step)
    except RuntimeError as err:  # vmap's tracing failures; ValueError/TypeError propagate
        key = type(err).__name__
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            warnings.warn(
                f"could not vectorise over time steps ({key}: {err}); falling back to a loop over steps",
                RuntimeWarning,
                stacklevel=2,
            )
    outputs = [fn(*(x[k] for x in per_step)) for k in range(per_step[0].shape[0])]
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs))
    return torch.stack(outputs)
