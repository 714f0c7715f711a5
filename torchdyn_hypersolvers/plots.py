"""Figures written to files (matplotlib, headless): Pareto fronts and per-mesh-point errors."""

from __future__ import annotations

import os
from typing import Union

from torch import Tensor

__all__ = ["plot_pareto", "plot_mesh_error"]

_LABELS = {"nfe": "NFE (evaluations of f)", "macs": "MACs (f and g)", "wall_ms": "wall-clock (ms)"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is in the `examples` extra
        raise ImportError("plots need matplotlib: pip install 'torchdyn-hypersolvers[examples]'") from err
    return plt


def plot_pareto(result, path: Union[str, os.PathLike], cost: str = "nfe", error: str = "terminal_mape") -> str:
    """Error against ``cost`` (``'nfe'``, ``'macs'`` or ``'wall_ms'``), log scales, one line per
    solver; the non-dominated points are circled and joined."""
    if cost not in _LABELS:
        raise ValueError(f"cost must be one of {sorted(_LABELS)}, got {cost!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    names = list(dict.fromkeys(r.solver for r in result.rows))
    for name in names:
        rows = sorted((r for r in result.rows if r.solver == name), key=lambda r: getattr(r, cost))
        style = "--" if rows[0].kind == "adaptive" else "-"
        width = 2.4 if rows[0].kind == "hyper" else 1.2
        ax.plot(
            [getattr(r, cost) for r in rows],
            [getattr(r, error) for r in rows],
            style,
            marker="o",
            lw=width,
            ms=4,
            label=name,
        )
    front_attr = {"nfe": "pareto_nfe", "macs": "pareto_macs", "wall_ms": "pareto_wall"}[cost]
    front = sorted((r for r in result.rows if getattr(r, front_attr)), key=lambda r: getattr(r, cost))
    if front:
        ax.step(
            [getattr(r, cost) for r in front],
            [getattr(r, error) for r in front],
            where="post",
            color="k",
            lw=1,
            alpha=0.6,
            label="Pareto front",
        )
        ax.scatter(
            [getattr(r, cost) for r in front],
            [getattr(r, error) for r in front],
            s=90,
            facecolors="none",
            edgecolors="k",
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_LABELS[cost])
    ax.set_ylabel("terminal MAPE (%)" if error == "terminal_mape" else error)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
