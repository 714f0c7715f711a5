"""Figures written to files (matplotlib, headless): Pareto fronts and per-mesh-point errors."""

from __future__ import annotations

import os
from typing import Optional, Union

from torch import Tensor

from .metrics import pareto_front

__all__ = ["plot_pareto", "plot_mesh_error"]

_LABELS = {"nfe": "NFE (evaluations of f)", "macs": "MACs (f and g)", "wall_ms": "wall-clock (ms)"}
_ERRORS = {
    "terminal_mape": "terminal MAPE (%)",
    "terminal_error": "terminal error (mean |z - z_ref|)",
    "max_terminal_error": "max terminal error",
    "global_error": "mean global truncation error",
    "task_decrement": "task decrement",
}


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
):
    """Error against ``cost`` (``'nfe'``, ``'macs'`` or ``'wall_ms'``), log scales, one line per
    solver; with ``front``, the non-dominated points (of this error against this cost) are
    circled and joined.

    ``error`` is any numeric row column (``'terminal_mape'``, ``'terminal_error'``,
    ``'global_error'``, ...); rows without it (adaptive rows have no ``global_error``) are left
    out. Without ``ax``, a new figure is saved to ``path`` and the path returned. With a
    matplotlib ``ax``, the plot is drawn into it and the ``ax`` returned; nothing is saved
    unless a ``path`` is given too (then its figure is saved there and the path returned)."""
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
        fig, ax = plt.subplots(figsize=(6, 4.2))
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
        marks = pareto_front(costs, [getattr(r, error) for r in rows])
        on_front = sorted((r for r, mark in zip(rows, marks) if mark), key=lambda r: getattr(r, cost))
        ax.step(
            [getattr(r, cost) for r in on_front],
            [getattr(r, error) for r in on_front],
            where="post",
            color="k",
            lw=1,
            alpha=0.6,
            label="Pareto front",
        )
        ax.scatter(
            [getattr(r, cost) for r in on_front],
            [getattr(r, error) for r in on_front],
            s=90,
            facecolors="none",
            edgecolors="k",
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_LABELS[cost])
    ax.set_ylabel(_ERRORS.get(error, error))
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
