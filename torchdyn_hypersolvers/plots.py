"""Figures written to files (matplotlib, headless): Pareto fronts and per-mesh-point errors."""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Union

from torch import Tensor

from .metrics import pareto_front

__all__ = ["plot_pareto", "plot_mesh_error"]

_LABELS = {"nfe": "NFE (evaluations of f)", "macs": "MACs (f and g)", "wall_ms": "wall-clock (ms)"}
_ERRORS = {
    "terminal_mape": "terminal MAPE (%)",
    "terminal_error": "terminal error: mean of \u2016z(T) \u2212 z_ref(T)\u2016\u2082",  # over the inputs
    "max_terminal_error": "max terminal error: max of \u2016z(T) \u2212 z_ref(T)\u2016\u2082",
    "global_error": "mean global truncation error",
    "task_decrement": "task decrement",
}


def _draw_front(ax, rows, costs, error: str, cost: str) -> None:
    """Circle and join the rows on the front of ``error`` against ``cost``."""
    marks = pareto_front(costs, [getattr(r, error) for r in rows])
    on_front = sorted((r for r, mark in zip(rows, marks) if mark), key=lambda r: getattr(r, cost))
    xs, ys = [getattr(r, cost) for r in on_front], [getattr(r, error) for r in on_front]
    ax.step(xs, ys, where="post", color="k", lw=1, alpha=0.6, label="Pareto front")
    ax.scatter(xs, ys, s=90, facecolors="none", edgecolors="k", zorder=3)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is in the `examples` extra
        raise ImportError("plots need matplotlib: pip install 'torchdyn-hypersolvers[examples]'") from err
    return plt


def plot_pareto(
    result,
    path: Optional[Union[str, os.PathLike]] = None,
    cost: str = "nfe",
    error: str = "terminal_mape",
    ax=None,
    front: bool = True,
    title: Optional[str] = None,
):
    """Error against ``cost`` (``'nfe'``, ``'macs'`` or ``'wall_ms'``), log scales, one line per
    solver; with ``front``, the non-dominated points (of this error against this cost) are
    circled and joined.

    ``error`` is any numeric row column (``'terminal_mape'``, ``'terminal_error'``: the mean over
    inputs of the L2 norm of the final state's error, ``'global_error'``, ...); rows without it
    (adaptive rows have no ``global_error``) are left out. The cost axis is labelled with the
    rows' own costs (``4``, ``8``, ``16`` evaluations of f; ``11.5M`` MACs), thinned where they
    would overlap. ``title`` (e.g. the model and the inputs) goes above the plot.

    Without ``ax``, a new figure is saved to ``path`` and the path returned. With a matplotlib
    ``ax``, the plot is drawn into it and the ``ax`` returned; nothing is saved unless a ``path``
    is given too (then its figure is saved there and the path returned)."""
    if cost not in _LABELS:
        raise ValueError(f"cost must be one of {sorted(_LABELS)}, got {cost!r}")
    if ax is None and path is None:
        raise ValueError("plot_pareto needs a path to save to or an ax to draw into")
    rows = [r for r in result.rows if getattr(r, error) is not None]
    if not rows:
        raise ValueError(f"no row has a value for {error!r}")
    own = ax is None
    if own:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in dict.fromkeys(r.solver for r in rows):
        mine = sorted((r for r in rows if r.solver == name), key=lambda r: getattr(r, cost))
        ax.plot(
            [getattr(r, cost) for r in mine],
            [getattr(r, error) for r in mine],
            "--" if mine[0].kind == "adaptive" else "-",
            marker="o",
            lw=2.4 if mine[0].kind == "hyper" else 1.2,
            ms=4,
            label=name,
        )
    costs = [getattr(r, cost) for r in rows]
    if front and not any(c != c for c in costs):  # untimed sweeps have no wall-clock front
        _draw_front(ax, rows, costs, error, cost)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _cost_ticks(ax, costs, cost)
    _error_ticks(ax, [getattr(r, error) for r in rows])
    ax.set_xlabel(_LABELS[cost])
    ax.set_ylabel(_ERRORS.get(error, error), fontsize=9)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if path is None:
        return ax
    figure = ax.get_figure()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    if own:
        plt.close(figure)
    return str(path)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _thinned(values: Sequence[float], labels: Sequence[str], ax) -> List[int]:
    """Indices of the sorted ``values`` whose labels fit side by side on ``ax``'s log x axis."""
    lo, hi = ax.get_xlim()
    width_in = ax.get_position().width * ax.get_figure().get_figwidth()
    decades_per_inch = (math.log10(hi) - math.log10(lo)) / max(width_in, 1e-6)
    char_in = 0.6 * 8 / 72  # an 8-point digit is about 0.6 em wide
    kept: List[int] = []
    for i, value in enumerate(values):
        if kept:
            j = kept[-1]
            need = ((len(labels[i]) + len(labels[j])) / 2 * char_in + 0.12) * decades_per_inch
            if math.log10(value) - math.log10(values[j]) < need:
                continue
        kept.append(i)
    return kept


def _cost_ticks(ax, costs: Sequence[float], cost: str) -> None:
    """Ticks at the rows' own costs, as plain labels, thinned where they would overlap."""
    from matplotlib.ticker import NullFormatter

    values = sorted({float(c) for c in costs if c == c and 0 < c < math.inf})
    if not values:
        return
    fmt = {"nfe": lambda v: f"{v:.0f}", "macs": _si}.get(cost, lambda v: f"{v:.3g}")
    labels = [fmt(v) for v in values]
    kept = _thinned(values, labels, ax)
    ax.set_xticks([values[i] for i in kept], [labels[i] for i in kept], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _error_ticks(ax, errors: Sequence[float]) -> None:
    """Log error axis: over up to three decades, ticks at 1, 2, 5 x 10^k with plain labels (the
    default labels every minor tick there, and they overlap); decades otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = [e for e in errors if e == e and 0 < e < math.inf]
    if finite and math.log10(max(finite) / min(finite)) <= 3:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", labelsize=8)


def plot_mesh_error(abs_error: Tensor, path: Union[str, os.PathLike], samples: int = 4, title: str = "") -> str:
    """The seed's picture for image states: ``|z_k - z(s_k)|`` (channel mean) for a few
    samples (rows) at every mesh point (columns). ``abs_error``: ``[T, B, C, H, W]``."""
    if abs_error.dim() != 5:
        raise ValueError(f"plot_mesh_error needs image states [T, B, C, H, W], got {tuple(abs_error.shape)}")
    plt = _pyplot()
    err = abs_error.detach().float().mean(2).cpu()
    T, B = err.shape[:2]
    samples = min(samples, B)
    vmax = float(err[:, :samples].max()) or 1.0
    fig, axes = plt.subplots(samples, T, figsize=(1.2 * T, 1.2 * samples + 0.4), squeeze=False)
    for i in range(samples):
        for k in range(T):
            axes[i][k].imshow(err[k, i], vmin=0, vmax=vmax, cmap="inferno")
            axes[i][k].axis("off")
            if i == 0:
                axes[i][k].set_title(f"k={k}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
