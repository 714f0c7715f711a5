"""Save a fitted hypersolver to one file and load it back, bit for bit.

The file is a ``torch.save`` of plain data (tensors, dicts, lists, str, int, float,
bool, None) and is read with ``torch.load(..., weights_only=True)``: loading never
runs code from the file. It holds g's weights (on the CPU) and what is needed to
rebuild and trust them: the base solver's tableau, the hypernet's class and
constructor arguments, the call convention, the meshes and step sizes g was fitted
on, the fit report's summary, the validity record, and the versions that wrote it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from . import hypernets
from .solvers import (
    BaseLike,
    HyperAlpha,
    HyperEuler,
    HyperHeun,
    HyperMidpoint,
    HyperRalston,
    HyperRK4,
    HyperSolver,
    resolve_base,
)
from .tableaus import ButcherTableau
from .validity import Validity

__all__ = ["FORMAT_VERSION", "save", "load"]

FORMAT_VERSION = 1
"""Version of the file layout; ``load`` refuses files from a newer one."""

_KIND = "torchdyn_hypersolvers.hypersolver"
_HYPERNETS = {"MLPHyperNet": hypernets.MLPHyperNet, "ConvHyperNet": hypernets.ConvHyperNet}
_SOLVERS = {
    cls.__name__: cls for cls in (HyperSolver, HyperEuler, HyperMidpoint, HyperHeun, HyperRalston, HyperRK4, HyperAlpha)
}
_REQUIRED = ("format_version", "tableau", "solver", "convention", "hypernet", "state_dict")
PathLike = Union[str, os.PathLike]


def _package_version() -> str:
    from . import __version__

    return __version__


def _tableau_record(tableau: ButcherTableau) -> Dict[str, Any]:
    return {
        "name": tableau.name,
        "order": int(tableau.order),
        "a": [[float(v) for v in row] for row in tableau.a],
        "b": [float(v) for v in tableau.b],
        "c": [float(v) for v in tableau.c],
    }


def _tableau_of(record: Dict[str, Any]) -> ButcherTableau:
    return ButcherTableau(
        record["name"],
        int(record["order"]),
        tuple(tuple(row) for row in record["a"]),
        tuple(record["b"]),
        tuple(record["c"]),
    )


def _same_method(x: ButcherTableau, y: ButcherTableau) -> bool:
    """The same Runge-Kutta method: order and coefficients equal (names may differ)."""
    return (x.order, x.a, x.b, x.c) == (y.order, y.a, y.b, y.c)


def _trajectories_record(trajectories) -> Dict[str, Any]:
    step_sizes = {}
    for n in trajectories.steps:
        t_span, _ = trajectories.mesh(n)
        dts = (t_span[1:] - t_span[:-1]).abs()
        step_sizes[int(n)] = [float(dts.min()), float(dts.max())]
    return {
        "steps": [int(n) for n in trajectories.steps],
        "t": trajectories.t.detach().cpu().clone(),
        "meshes": {int(n): idx.detach().cpu().clone() for n, idx in trajectories.meshes.items()},
        "step_sizes": step_sizes,
        "state_shape": [int(n) for n in trajectories.state_shape],
        "count": len(trajectories),
        "dtype": str(trajectories.states.dtype),
        "reference": str(trajectories.reference),
        "atol": float(trajectories.atol),
        "rtol": float(trajectories.rtol),
    }


def _report_record(report) -> Dict[str, Any]:
    return {
        "method": str(report.method),
        "iterations": int(report.iterations),
        "wall_time": float(report.wall_time),
        "residual_error": {int(n): float(v) for n, v in report.residual_error.items()},
        "base_residual_error": {int(n): float(v) for n, v in report.base_residual_error.items()},
        "final_loss": float(report.loss_history[-1]) if report.loss_history else None,
        "adversarial_worst": [float(v) for v in report.adversarial_worst],
    }


def save(hypersolver: HyperSolver, path: PathLike, trajectories=None, report=None) -> None:
    """Write a hypersolver's g and its model card to ``path``.

    Args:
        hypersolver: a :class:`HyperSolver` whose g is an ``nn.Module``.
        trajectories: the :class:`Trajectories` g was fitted on (recorded: meshes, step
            sizes, state shape, reference solver and tolerances; not the states).
        report: the :class:`FitReport` of the fit (recorded: its summary numbers).

    The validity record saved is derived from ``trajectories`` when given, otherwise it is
    ``hypersolver.validity`` (set by :func:`fit`). The file is written atomically.
    """
    if not isinstance(hypersolver, HyperSolver):
        raise TypeError(f"save expects a HyperSolver, got {type(hypersolver).__name__}")
    g = hypersolver.g
    if not isinstance(g, nn.Module):
        raise TypeError(f"g ({type(g).__name__}) is not an nn.Module: there are no weights to save")
    name = type(g).__name__
    ours = type(g) is _HYPERNETS.get(name)
    validity = Validity.of_trajectories(trajectories, report) if trajectories is not None else hypersolver.validity
    solver = type(hypersolver).__name__
    blob = {
        "kind": _KIND,
        "format_version": FORMAT_VERSION,
        "package_version": _package_version(),
        "torch_version": str(torch.__version__),
        "solver": solver if type(hypersolver) is _SOLVERS.get(solver) else "HyperSolver",
        "solver_class": f"{type(hypersolver).__module__}.{type(hypersolver).__qualname__}",
        "tableau": _tableau_record(hypersolver.tableau),
        "convention": hypersolver.convention,
        "hypernet": {
            "class": name,
            "module": type(g).__module__,
            "config": dict(g.config) if ours else None,
        },
        "state_dict": {k: v.detach().cpu().clone() for k, v in g.state_dict().items()},
        "validity": validity.to_dict() if validity is not None else None,
        "trajectories": _trajectories_record(trajectories) if trajectories is not None else None,
        "report": _report_record(report) if report is not None else None,
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".hypersolver-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(blob, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path: PathLike, map_location) -> Dict[str, Any]:
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"cannot read {os.fspath(path)!s} as a hypersolver file (truncated, corrupt, or holding objects "
            f"that weights_only loading refuses): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(blob, dict) or blob.get("kind") != _KIND:
        hint = " (it looks like a Trajectories file: use Trajectories.load)" if _is_trajectories(blob) else ""
        raise ValueError(f"{os.fspath(path)!s} is not a hypersolver file written by torchdyn_hypersolvers.save{hint}")
    version = blob.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: format_version is {version!r}, not an int")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!s} has format version {version}, newer than the {FORMAT_VERSION} this "
            f"torchdyn_hypersolvers {_package_version()} reads (it was written by torchdyn_hypersolvers "
            f"{blob.get('package_version')}); upgrade torchdyn-hypersolvers to load it"
        )
    missing = [k for k in _REQUIRED if k not in blob]
    if missing:
        raise ValueError(f"{os.fspath(path)!s} is corrupt: it lacks {missing}")
    state = blob["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: its state_dict is not a dict of tensors")
    return blob


def _is_trajectories(blob) -> bool:
    return isinstance(blob, dict) and {"t", "states", "meshes"} <= set(blob)


def _check_fits(g: nn.Module, state: Dict[str, torch.Tensor], path: PathLike, saved_class: str) -> None:
    own = g.state_dict()
    problems = []
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(own) & set(state)):
        if own[key].shape != state[key].shape:
            problems.append(f"{key}: file {tuple(state[key].shape)} vs g {tuple(own[key].shape)}")
        elif own[key].dtype != state[key].dtype:
            problems.append(f"{key}: file {state[key].dtype} vs g {own[key].dtype} (cast g first)")
    if problems:
        raise ValueError(
            f"the weights in {os.fspath(path)!s} (saved from a {saved_class}) do not fit the given g "
            f"({type(g).__name__}): {'; '.join(problems)}"
        )


def _rebuild_hypernet(record: Dict[str, Any], path: PathLike) -> nn.Module:
    cls = _HYPERNETS.get(record["class"])
    if cls is None or record.get("module") != hypernets.__name__ or record.get("config") is None:
        raise ValueError(
            f"{os.fspath(path)!s} holds the weights of a user hypernet {record['class']} (from module "
            f"{record.get('module')}), which load cannot rebuild: pass an instance, "
            f"load(path, g={record['class']}(...))"
        )
    with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
        return cls(**record["config"])


def _rebuild_solver(name: str, tableau: ButcherTableau, g: Callable, convention: str) -> HyperSolver:
    cls = _SOLVERS.get(name, HyperSolver)
    if cls is HyperAlpha:
        hs = HyperAlpha(g, alpha=tableau.c[1], convention=convention)
    elif cls is HyperSolver:
        hs = HyperSolver(tableau, g, convention=convention)
    else:
        hs = cls(g, convention=convention)
    if not _same_method(hs.tableau, tableau):  # a class whose base is not the saved one: keep the saved tableau
        hs = HyperSolver(tableau, g, convention=convention)
    return hs


def load(
    path: PathLike,
    g: Optional[nn.Module] = None,
    map_location=None,
    base: Optional[BaseLike] = None,
) -> HyperSolver:
    """Read a file written by :func:`save` and return the hypersolver, with its validity record.

    Args:
        g: the hypernet to load the weights into. Optional for the package's
            ``MLPHyperNet`` / ``ConvHyperNet`` (rebuilt from the saved constructor
            arguments); required for any other g. A g you pass keeps its device.
        map_location: as for ``torch.load``; a rebuilt g is placed where the weights land
            (the CPU by default, whatever device the hypersolver was saved from).
        base: the base solver you expect (a name, tableau or solver); a file fitted for
            another one is refused, since g's residual is that of its own base.

    Raises:
        ValueError: a truncated or corrupt file, a newer format version, a different base
            solver, or weights that do not fit ``g`` (missing / unexpected keys, shapes).
    """
    blob = _read(path, map_location)
    tableau = _tableau_of(blob["tableau"])
    if base is not None:
        wanted = resolve_base(base)
        if not _same_method(wanted, tableau):
            raise ValueError(
                f"{os.fspath(path)!s} holds a hypersolver for base solver {tableau.name!r} (order "
                f"{tableau.order}), not the requested {wanted.name!r} (order {wanted.order}); g learned "
                "the residual of its own base solver and is wrong for any other"
            )
    state = blob["state_dict"]
    if g is None:
        g = _rebuild_hypernet(blob["hypernet"], path)
        floating = [v for v in state.values() if v.is_floating_point()]
        if floating:
            g.to(device=floating[0].device, dtype=floating[0].dtype)
    elif not isinstance(g, nn.Module):
        raise TypeError(f"load needs g to be an nn.Module to hold the weights, got {type(g).__name__}")
    _check_fits(g, state, path, blob["hypernet"]["class"])
    g.load_state_dict(state)
    hs = _rebuild_solver(blob["solver"], tableau, g, blob["convention"])
    if blob.get("validity") is not None:
        hs.validity = Validity.from_dict(blob["validity"])
    return hs
