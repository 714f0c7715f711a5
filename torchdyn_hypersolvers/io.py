"""Save a fitted hypersolver to one file and load it back, bit for bit.

The file is a ``torch.save`` of plain data (tensors, dicts, lists, str, int, float,
bool, None) and is read with ``torch.load(..., weights_only=True)``: loading never
runs code from the file. It holds g's weights (on the CPU) and what is needed to
rebuild and trust them: the base solver's tableau, the hypernet's class and
constructor arguments, the call convention, the meshes and step sizes g was fitted
on, the fit report's summary, the validity record, and the versions that wrote it.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from . import hypernets
from ._files import read_plain, write_atomic
from ._model_identity import update_digest
from ._records import report_record, tableau_of, tableau_record, trajectories_record, validity_fields, validity_record
from ._solver_names import resolve_base
from ._version import __version__
from ._wrapped import unwrap
from .nonstationary import NonStationaryCoefficients
from .solvers import BaseLike, HyperSolver
from .tableaus import TABLEAUS, ButcherTableau
from .validity import Validity

__all__ = ["FORMAT_VERSION", "save", "load"]

FORMAT_VERSION = 1
"""Version of the file layout; ``load`` refuses files from a newer one."""

_KIND = "torchdyn_hypersolvers.hypersolver"
_HYPERNETS = {
    "MLPHyperNet": hypernets.MLPHyperNet,
    "ConvHyperNet": hypernets.ConvHyperNet,
    "NonStationaryCoefficients": NonStationaryCoefficients,
}
_COEFFICIENTS_KEYS = {"base", "steps", "convention", "g"}
_REQUIRED = ("format_version", "tableau", "solver", "convention", "hypernet", "state_dict")
PathLike = Union[str, os.PathLike]


def _same_method(x: ButcherTableau, y: ButcherTableau) -> bool:
    """The same Runge-Kutta method: order and coefficients equal (names may differ)."""
    return (x.order, x.a, x.b, x.c) == (y.order, y.a, y.b, y.c)


def save(hypersolver: HyperSolver, path: PathLike, trajectories=None, report=None, force: bool = False) -> None:
    """Write a hypersolver's g and its model card to ``path``.

    Args:
        hypersolver: a :class:`~.solvers.HyperSolver` whose g is an ``nn.Module`` (a :class:`~.guard.Guarded`
            one is saved as its hypersolver: the guard's settings are not saved).
        trajectories: the :class:`~.harvest.Trajectories` g was fitted on (recorded: meshes, step
            sizes, state shape, reference solver and tolerances; not the states).
        report: the :class:`~.fit.FitReport` of the fit (recorded: its summary numbers).

    The validity record saved is derived from ``trajectories`` when given, otherwise it is
    ``hypersolver.validity`` (set by :func:`~.fit.fit`). The file is written atomically. A ``path``
    that is a symbolic link is followed: the link stays, its target gets the new content
    (written next to the target, then renamed over it). A file that is replaced keeps its
    permissions and a new one gets the umask's; a read-only file is refused unless ``force``.
    """
    hypersolver = unwrap(hypersolver)  # a wrapped (e.g. Guarded) one: its hypersolver is saved; wrap the loaded one
    if not isinstance(hypersolver, HyperSolver):
        raise TypeError(f"save expects a HyperSolver, got {type(hypersolver).__name__}")
    g = hypersolver.g
    if not isinstance(g, nn.Module):
        raise TypeError(f"g ({type(g).__name__}) is not an nn.Module: there are no weights to save")
    state = {k: v.detach().cpu().clone() for k, v in g.state_dict().items()}
    nonfinite = _nonfinite(state)
    if nonfinite:
        raise ValueError(f"g holds non-finite (nan or inf) weights in {nonfinite}: load would refuse the file")
    name = type(g).__name__
    ours = type(g) is _HYPERNETS.get(name)
    validity = hypersolver.validity
    if trajectories is not None:
        how = report.describe() if report is not None else None
        validity = Validity.of_trajectories(trajectories, how=how)
    solver = type(hypersolver).__name__
    blob = {
        "kind": _KIND,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "torch_version": str(torch.__version__),
        "solver": solver if _solver_class(solver) is type(hypersolver) else "HyperSolver",
        "solver_class": f"{type(hypersolver).__module__}.{type(hypersolver).__qualname__}",
        "tableau": tableau_record(hypersolver.tableau),
        "convention": hypersolver.convention,
        "residual_scale": float(hypersolver.residual_scale),
        "hypernet": {
            "class": name,
            "module": type(g).__module__,
            "config": dict(g.config) if ours else None,
        },
        "state_dict": state,
        "weights_digest": _weights_digest(state),
        "validity": validity_record(validity) if validity is not None else None,
        "time_grid": list(hypersolver.__dict__["_time_grid"]) if hypersolver.time_grid is not None else None,
        "trajectories": trajectories_record(trajectories) if trajectories is not None else None,
        "report": report_record(report) if report is not None else None,
    }
    write_atomic(blob, path, prefix=".hypersolver-", force=force)


def _nonfinite(state: Dict[str, torch.Tensor]) -> list:
    return [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not torch.isfinite(v).all()]


def _weights_digest(state: Dict[str, torch.Tensor]) -> str:
    """A SHA-256 of the weights (names, dtypes, shapes, bytes): torch.load does not check its archive's CRCs."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        update_digest(digest, state[key])
    return digest.hexdigest()


def _read(path: PathLike, map_location) -> Dict[str, Any]:
    blob = read_plain(path, map_location, "a hypersolver file")
    if not isinstance(blob, dict) or blob.get("kind") != _KIND:
        hint = " (it looks like a Trajectories file: use Trajectories.load)" if _is_trajectories(blob) else ""
        raise ValueError(f"{os.fspath(path)!s} is not a hypersolver file written by torchdyn_hypersolvers.save{hint}")
    version = blob.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: format_version is {version!r}, not an int")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!s} has format version {version}, newer than the {FORMAT_VERSION} this "
            f"torchdyn_hypersolvers {__version__} reads (it was written by torchdyn_hypersolvers "
            f"{blob.get('package_version')}); upgrade torchdyn-hypersolvers to load it"
        )
    missing = [k for k in _REQUIRED if k not in blob]
    if missing:
        raise ValueError(f"{os.fspath(path)!s} is corrupt: it lacks {missing}")
    state = blob["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: its state_dict is not a dict of tensors")
    nonfinite = _nonfinite(state)
    if nonfinite:
        raise ValueError(f"{os.fspath(path)!s} holds non-finite (nan or inf) weights in {nonfinite}; it cannot be used")
    saved = blob.get("weights_digest")  # files from before 0.3 have none
    if saved is not None and saved != _weights_digest(state):
        raise ValueError(
            f"{os.fspath(path)!s} is corrupt: its weights do not match the digest saved with them (changed or "
            "damaged after saving)"
        )
    for key in ("solver", "convention"):
        if not isinstance(blob[key], str):
            raise ValueError(f"{os.fspath(path)!s} is corrupt: its {key} must be a str, got {blob[key]!r}")
    _check_record(blob["hypernet"], path, "hypernet")
    return blob


def _check_record(record, path: PathLike, what: str) -> None:
    """A hypernet record is well typed: ``class`` a str, ``module`` a str or None, ``config`` a dict or None."""
    if not isinstance(record, dict) or not isinstance(record.get("class"), str):
        raise ValueError(
            f"{os.fspath(path)!s} is corrupt: its {what} record needs a class name (a str), got {record!r}"
        )
    if record.get("module") is not None and not isinstance(record["module"], str):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: its {what} module must be a str, got {record['module']!r}")
    if record.get("config") is not None and not isinstance(record["config"], dict):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: its {what} config must be a dict, got {record['config']!r}")


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


def _rebuild_hypernet(
    record: Dict[str, Any], state: Dict[str, torch.Tensor], path: PathLike, tableau: Optional[ButcherTableau] = None
) -> nn.Module:
    """g rebuilt from its record, once the parameter shapes its config implies (built on the meta device,
    nothing allocated) are those of the stored weights. ``tableau``: the solver's, which a
    ``NonStationaryCoefficients`` must start from."""
    build = _builder(record, path, tableau)
    config = record["config"]
    try:  # the parameter shapes the config implies, without allocating them
        with torch.device("meta"):
            shell = build()
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(
            f"{os.fspath(path)!s} is corrupt: its hypernet config {config!r} does not build a {record['class']}: "
            f"{type(err).__name__}: {err}"
        ) from err
    implied = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    if implied != stored:
        differ = [
            f"{k}: config {implied.get(k, 'absent')} vs file {stored.get(k, 'absent')}"
            for k in sorted(set(implied) | set(stored))
            if implied.get(k) != stored.get(k)
        ]
        count = sum(math.prod(shape) for shape in implied.values())
        raise ValueError(
            f"{os.fspath(path)!s} is corrupt: its hypernet config {config!r} implies {count} parameters with other "
            f"shapes than the {sum(v.numel() for v in state.values())} stored: {'; '.join(differ[:6])}"
        )
    with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
        return build()


_PASS_COEFFICIENTS = "load(path, g=NonStationaryCoefficients(base, steps, g={}(...)))"


def _builder(
    record: Dict[str, Any], path: PathLike, tableau: Optional[ButcherTableau], hint: str = "load(path, g={}(...))"
) -> Callable[[], nn.Module]:
    """A function that builds g from its record (refused, with how to load it instead, for a user's g)."""
    name = record["class"]
    cls = _HYPERNETS.get(name)
    if cls is NonStationaryCoefficients and record.get("config") is None:  # saved before it had a config
        raise ValueError(
            f"{os.fspath(path)!s} holds NonStationaryCoefficients saved without their config, which load cannot "
            f"rebuild: pass {_PASS_COEFFICIENTS.format('YourG')} (g=None for none)"
        )
    if cls is None or record.get("module") != cls.__module__ or record.get("config") is None:
        raise ValueError(
            f"{os.fspath(path)!s} holds the weights of a user hypernet {name} (from module "
            f"{record.get('module')}), which load cannot rebuild: pass an instance, {hint.format(name)}"
        )
    config = record["config"]
    if cls is NonStationaryCoefficients:
        return _coefficients_builder(config, path, tableau)
    return lambda: cls(**config)


def _coefficients_builder(config: Dict[str, Any], path: PathLike, tableau: Optional[ButcherTableau]) -> Callable:
    """A function that builds a ``NonStationaryCoefficients`` (and its g) from its checked config."""
    where = f"{os.fspath(path)!s} is corrupt"
    if set(config) != _COEFFICIENTS_KEYS:
        raise ValueError(
            f"{where}: its NonStationaryCoefficients config has the keys {sorted(config)}, "
            f"not {sorted(_COEFFICIENTS_KEYS)}"
        )
    base = config["base"]
    if isinstance(base, str):
        if base not in TABLEAUS:
            raise ValueError(f"{where}: its coefficients' base {base!r} is none of {sorted(TABLEAUS)}")
        base = TABLEAUS[base]
    else:
        base = tableau_of(base, f"{where} (the coefficients' base)")
    if tableau is not None and base != tableau:
        raise ValueError(
            f"{where}: its coefficients start from base {base.name!r}, not from the solver's {tableau.name!r}"
        )
    inner = config["g"]
    if inner is not None:
        _check_record(inner, path, "coefficients' g")
        if inner["class"] == "NonStationaryCoefficients":
            raise ValueError(f"{where}: its coefficients' g is NonStationaryCoefficients again")
        inner = _builder(inner, path, None, _PASS_COEFFICIENTS)
    steps, convention = config["steps"], config["convention"]
    return lambda: NonStationaryCoefficients(base, steps, None if inner is None else inner(), convention)


def _solver_class(name: str) -> type:
    """This package's hypersolver class of that name (a user's subclass is rebuilt as HyperSolver)."""
    return HyperSolver.named(name)


def _rebuild_solver(name: str, tableau: ButcherTableau, g: Callable, convention: str) -> HyperSolver:
    cls = _solver_class(name)
    if cls.tableau is not None and not _same_method(cls.tableau, tableau):
        cls = HyperSolver  # a class whose base is not the saved one: keep the saved tableau
    return cls.from_tableau(tableau, g, convention=convention)


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
            arguments) and a ``NonStationarySolver``'s ``NonStationaryCoefficients`` (with
            no g or one of those); required for any other g. A g you pass keeps its device.
        map_location: as for ``torch.load``; a rebuilt g is placed where the weights land
            (the CPU by default, whatever device the hypersolver was saved from).
        base: the base solver you expect (a name, tableau or solver); a file fitted for
            another one is refused, since g's residual is that of its own base.

    Raises:
        ValueError: a truncated, corrupt or non-hypersolver file (a text file, ...), a newer
            format version, a different base solver, weights that do not fit ``g`` (missing /
            unexpected keys, shapes) or are not finite, an inconsistent tableau (order not an
            int >= 1, ``sum(b) != 1``, row sums of ``a`` other than ``c``, non-finite
            coefficients), a missing or ill-typed field (tableau, solver, convention, hypernet
            class / config, validity record; named), a hypernet config whose parameter shapes
            differ from the stored weights' (checked without building it), and
            ``map_location='cuda'`` on a machine without CUDA.
    """
    blob = _read(path, map_location)
    tableau = tableau_of(blob["tableau"], f"{os.fspath(path)!s} is corrupt")
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
        g = _rebuild_hypernet(blob["hypernet"], state, path, tableau)
        floating = [v for v in state.values() if v.is_floating_point()]
        if floating:
            g.to(device=floating[0].device, dtype=floating[0].dtype)
    elif not isinstance(g, nn.Module):
        raise TypeError(f"load needs g to be an nn.Module to hold the weights, got {type(g).__name__}")
    _check_fits(g, state, path, blob["hypernet"]["class"])
    g.load_state_dict(state)
    hs = _rebuild_solver(blob["solver"], tableau, g, blob["convention"])
    scale = blob.get("residual_scale", 1.0)  # files from before 0.2 have none
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < float("inf"):
        raise ValueError(f"{os.fspath(path)!s} is corrupt: residual_scale is {scale!r}, not a positive finite number")
    hs.residual_scale = float(scale)
    record = blob.get("validity")
    grid = blob.get("time_grid", record.get("grid") if isinstance(record, dict) else None)  # 0.2 kept it there
    try:
        if record is not None:
            hs.validity = Validity(**validity_fields(record))
        hs.time_grid = grid
        if grid is not None and hs.validity is not None:
            _check_grid_fits(hs.__dict__["_time_grid"], hs.validity)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{os.fspath(path)!s} is corrupt: {err}") from err
    return hs


def _check_grid_fits(grid, validity: Validity) -> None:
    """Refuse a time grid that is not where g was fitted: other ends than the fitted interval, or
    step sizes outside the fitted range (a grid edited by hand, a file put together from two)."""
    steps = [abs(b - a) for a, b in zip(grid, grid[1:])]
    slack = 1e-6 * max(abs(grid[-1] - grid[0]), 1e-12)
    if validity.t0 is not None and (abs(grid[0] - validity.t0) > slack or abs(grid[-1] - validity.t1) > slack):
        raise ValueError(
            f"its time grid runs from t={grid[0]:.6g} to t={grid[-1]:.6g} but g was fitted from t={validity.t0:.6g} "
            f"to t={validity.t1:.6g}"
        )
    if min(steps) < validity.dt_min * (1 - 1e-6) or max(steps) > validity.dt_max * (1 + 1e-6):
        raise ValueError(
            f"its time grid has step sizes in [{min(steps):.6g}, {max(steps):.6g}] but g was fitted on "
            f"[{validity.dt_min:.6g}, {validity.dt_max:.6g}]"
        )


def from_paper_state_dict(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """g's weights from a checkpoint of the paper's code, for ``hs.hypernet.load_state_dict``.

    The paper's hypersolver modules hold the vector field under ``f`` and the hypernet under
    ``g``, so their state dicts have ``f.*`` and ``g.*`` keys; ours hold g under ``hypernet``.
    The ``'g.'`` prefix is stripped and ``f.*`` keys are left out (the vector field is yours).
    A Lightning-style checkpoint ``{'state_dict': {...}}`` is looked into.

    Raises:
        ValueError: no ``g.*`` key, or keys that are neither ``g.*`` nor ``f.*`` (named).
    """
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    other = sorted(k for k in state_dict if not (k.startswith("g.") or k.startswith("f.")))
    if other:
        raise ValueError(
            f"a paper checkpoint holds g.* and f.* keys; got also {other[:5]}{' ...' if len(other) > 5 else ''}"
        )
    mapped = {k[len("g.") :]: v for k, v in state_dict.items() if k.startswith("g.")}
    if not mapped:
        raise ValueError(f"no g.* keys in this state dict (keys: {sorted(state_dict)[:5]}): it holds no hypernet")
    return mapped
