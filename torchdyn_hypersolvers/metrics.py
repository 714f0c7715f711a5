"""Error metrics, task-level decrements and Pareto marking: plain functions on tensors."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "terminal_mape",
    "absolute_error",
    "global_truncation_error",
    "accuracy",
    "task_decrement",
    "pareto_front",
]


def _check_same_shape(pred: Tensor, ref: Tensor) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"solution shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)}")


def terminal_mape(pred: Tensor, ref: Tensor, eps: float = 1e-8) -> float:
    """Mean absolute percentage error of final states ``[B, ...]``: ``100 * mean(|pred - ref| / (|ref| + eps))``."""
    _check_same_shape(pred, ref)
    return float(100.0 * ((pred - ref).abs() / (ref.abs() + eps)).mean())


def absolute_error(pred: Tensor, ref: Tensor) -> Tensor:
    """``|pred - ref|`` at every mesh point, element by element: ``[T, B, ...]``."""
    _check_same_shape(pred, ref)
    return (pred - ref).abs()


def global_truncation_error(pred: Tensor, ref: Tensor) -> Tensor:
    """``E(k)``: the mean over the batch of ``||z_k - z(s_k)||_2`` at every mesh point: ``[T]``."""
    _check_same_shape(pred, ref)
    return (pred - ref).flatten(2).norm(dim=2).mean(dim=1)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Percentage of ``argmax(logits) == labels``."""
    return float(100.0 * (logits.argmax(dim=1) == labels).float().mean())


def task_decrement(
    head: Callable[[Tensor], Tensor],
    pred: Tensor,
    ref: Tensor,
    labels: Optional[Tensor] = None,
    metric: Optional[Callable[[Tensor, Tensor], float]] = None,
) -> float:
    """How much a task metric drops when the reference final states are replaced by ``pred``.

    ``metric(outputs, labels)`` defaults to :func:`accuracy`; without ``labels`` the
    reference's own predictions are the labels (agreement with the reference solve).
    Returns ``metric(head(ref)) - metric(head(pred))``.
    """
    metric = metric or accuracy
    with torch.no_grad():
        out_ref, out_pred = head(ref), head(pred)
    if labels is None:
        labels = out_ref.argmax(dim=1)
    return float(metric(out_ref, labels) - metric(out_pred, labels))


def pareto_front(costs: Sequence[float], errors: Sequence[float]) -> List[bool]:
    """Which points are non-dominated: no other point is at most as costly and at most as
    wrong, and strictly better in one of the two. Non-finite errors are never on the front."""
    points = list(zip(costs, errors))
    marks = []
    for c, e in points:
        if not (e == e and abs(e) != float("inf")):
            marks.append(False)
            continue
        dominated = any(
            (c2 <= c and e2 <= e) and (c2 < c or e2 < e) for c2, e2 in points if e2 == e2 and abs(e2) != float("inf")
        )
        marks.append(not dominated)
    return marks
