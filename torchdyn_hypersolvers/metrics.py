"""Error metrics, sample distances, task-level decrements and Pareto marking: plain functions on tensors."""

from __future__ import annotations

import math
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
    "wasserstein2",
    "mmd",
    "DISTANCES",
]

MAX_SAMPLES = 2048
"""Sample distances subsample each set to this many samples (seeded) above it."""


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


def _sample_sets(samples: Tensor, reference: Tensor, max_samples: int, seed: int):
    """Both sample sets as float64 ``(N, D)`` (flattened), checked, each subsampled (seeded) to
    ``max_samples`` rows when larger."""
    for name, value in (("samples", samples), ("reference", reference)):
        if not isinstance(value, Tensor) or value.dim() < 1 or not value.is_floating_point():
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{name} must be a floating-point tensor (N, ...) of samples, got {got}")
        if value.shape[0] < 2:
            raise ValueError(f"{name} holds {value.shape[0]} sample(s); a sample distance needs at least 2")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} holds nan or inf: the distance is not defined")
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"samples of shape {tuple(samples.shape[1:])} cannot be compared with reference samples of shape "
            f"{tuple(reference.shape[1:])}"
        )
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise ValueError(f"max_samples must be an int >= 2, got {max_samples!r}")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for value in (samples, reference):
        value = value.detach().flatten(1).to("cpu", torch.float64)
        if value.shape[0] > max_samples:
            value = value[torch.randperm(value.shape[0], generator=generator)[:max_samples]]
        out.append(value)
    return out


def wasserstein2(samples: Tensor, reference: Tensor, max_samples: int = MAX_SAMPLES, seed: int = 0) -> float:
    """The 2-Wasserstein distance between two sample sets ``(N, ...)`` and ``(M, ...)`` (flattened).

    Exact optimal transport (POT's ``ot.emd2``, uniform weights) on squared Euclidean costs, square
    root at the end: the distance of the empirical distributions. A set larger than ``max_samples``
    is subsampled to ``max_samples`` samples drawn with a generator seeded by ``seed`` (exact OT is
    cubic in the number of samples), so the value is then an estimate. Needs POT
    (``pip install "torchdyn-hypersolvers[flow]"``).
    """
    x, y = _sample_sets(samples, reference, max_samples, seed)
    try:
        import ot
    except ImportError as err:  # an optional extra
        raise ImportError(
            'wasserstein2 needs POT (Python Optimal Transport): pip install "torchdyn-hypersolvers[flow]"'
        ) from err
    cost = torch.cdist(x, y).pow(2)
    a = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64)
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64)
    value = ot.emd2(a.numpy(), b.numpy(), cost.numpy(), numItermax=1_000_000)
    return float(max(float(value), 0.0) ** 0.5)


def mmd(
    samples: Tensor,
    reference: Tensor,
    bandwidth: Optional[float] = None,
    max_samples: int = MAX_SAMPLES,
    seed: int = 0,
) -> float:
    """The maximum mean discrepancy between two sample sets ``(N, ...)`` and ``(M, ...)`` (flattened),
    with the Gaussian kernel ``exp(-|x - y|^2 / (2 bandwidth^2))``: the square root of the (biased,
    never negative) MMD^2 estimate. ``bandwidth`` None: the median distance between the pooled samples
    (the median heuristic). No dependency; subsampled above ``max_samples`` as :func:`wasserstein2`.
    """
    x, y = _sample_sets(samples, reference, max_samples, seed)
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(d2.shape[0], dtype=torch.bool)]
        bandwidth = float(off.sqrt().median()) or 1.0
    elif not (isinstance(bandwidth, (int, float)) and bandwidth > 0 and math.isfinite(bandwidth)):
        raise ValueError(f"bandwidth must be a positive number or None, got {bandwidth!r}")
    k = torch.exp(-d2 / (2.0 * bandwidth**2))
    n = x.shape[0]
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()
    return float(value.clamp_min(0.0).sqrt())


DISTANCES = {"w2": wasserstein2, "mmd": mmd}
"""The sample distances by name (what ``Task(distance=...)`` takes)."""
