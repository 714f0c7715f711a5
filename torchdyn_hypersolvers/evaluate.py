"""Pareto sweeps: solvers x step counts (and adaptive solvers x tolerances) on a model.

Every fixed-step solver -- hypersolvers, this package's bases and torchdyn's own
``Euler`` / ``Midpoint`` / ``RungeKutta4`` -- runs through the package's one fast loop, so
their times compare like for like. Adaptive solvers run through torchdyn's or torchdiffeq's
``odeint``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchdyn.core import NeuralODE

from ._costs import CallCounter, counting_calls, macs, median_times
from ._loop import fixed_solve
from ._mesh import check_t_span, mesh_union
from ._reference import Reference, reference_solve
from ._residuals import correction_inputs
from ._user_model import preserved, resolve_model
from .metrics import DISTANCES, global_truncation_error, pareto_front, task_decrement, terminal_mape
from .registry import resolve_solver
from .solvers import HyperSolver

__all__ = ["ParetoRow", "ParetoResult", "Task", "Reference", "pareto", "generalization", "CLASSICAL"]

CLASSICAL = ("euler", "midpoint", "heun", "rk4")
"""The classical fixed-step bases, by name (the naming rule: :func:`~.registry.resolve_solver`)."""

SolverSpec = Union[str, nn.Module]
Solvers = Union[Sequence[SolverSpec], Mapping[str, SolverSpec]]
"""``pareto``'s ``solvers``: a list (each item labelled by its name) or ``{label: solver}``."""


@dataclass
class ParetoRow:
    """One (solver, step count or tolerance) point of a sweep."""

    solver: str
    kind: str  # 'hyper', 'fixed' or 'adaptive'
    steps: Optional[int]
    tol: Optional[float]
    nfe: int
    g_calls: int
    macs_f: int
    macs_g: int
    macs: int
    wall_ms: float
    terminal_mape: float
    terminal_error: float
    max_terminal_error: float
    global_error: Optional[float]
    task_decrement: Optional[float]
    pareto_nfe: bool = False
    pareto_macs: bool = False
    pareto_wall: bool = False
    distance: Optional[float] = None
    """The sample distance of the final states to the reference's (``Task(distance=...)``), else None."""


COLUMNS = [f.name for f in fields(ParetoRow)]


def _columns(rows: Sequence[ParetoRow]) -> List[str]:
    """The export columns: ``distance`` only when a row has one (sweeps without it export as before)."""
    if any(r.distance is not None for r in rows):
        return COLUMNS
    return [c for c in COLUMNS if c != "distance"]


@dataclass
class ParetoResult:
    """The rows of a sweep, with exports. Errors are against the reference solve."""

    rows: List[ParetoRow]
    reference: str
    reference_tol: float
    distance: Optional[str] = None
    """The name of the rows' sample distance (``'w2'``, ``'mmd'``, a function's name), None without one."""

    def __iter__(self) -> Iterator[ParetoRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def solvers(self) -> List[str]:
        """The solver labels, in sweep order, each once."""
        return list(dict.fromkeys(r.solver for r in self.rows))

    def row(self, solver: str, steps: Optional[int] = None, tol: Optional[float] = None) -> ParetoRow:
        """The row of ``solver`` (its label) at ``steps`` (fixed-step) or ``tol`` (adaptive).

        ``steps`` and ``tol`` may be left out when the solver has a single row. Raises
        ``KeyError`` when no row matches and ``ValueError`` when several do, naming what exists.
        """
        mine = [r for r in self.rows if r.solver == solver]
        if not mine:
            raise KeyError(f"no rows for solver {solver!r}; the sweep's solvers are {self.solvers}")
        matches = [
            r
            for r in mine
            if (steps is None or r.steps == steps)
            and (tol is None or (r.tol is not None and math.isclose(r.tol, tol, rel_tol=1e-9)))
        ]
        settings = ", ".join(_setting(r) for r in mine)
        if not matches:
            asked = " and ".join(
                ([f"steps={steps}"] if steps is not None else []) + ([f"tol={tol:g}"] if tol is not None else [])
            )
            raise KeyError(f"solver {solver!r} has no row with {asked}; its rows: {settings}")
        if len(matches) > 1:
            raise ValueError(f"solver {solver!r} has {len(matches)} rows ({settings}): pass steps= or tol=")
        return matches[0]

    def to_csv(self, path: Union[str, os.PathLike]) -> str:
        with open(path, "w", newline="") as fh:
            columns = _columns(self.rows)
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in self.rows:
                values = asdict(row)
                writer.writerow({c: values[c] for c in columns})
        return str(path)

    def to_json(self, path: Union[str, os.PathLike]) -> str:
        columns = set(_columns(self.rows))
        blob = {
            "reference": self.reference,
            "reference_tol": self.reference_tol,
            "rows": [{c: v for c, v in asdict(r).items() if c in columns} for r in self.rows],
        }
        if self.distance is not None:
            blob["distance"] = self.distance
        with open(path, "w") as fh:
            json.dump(blob, fh, indent=2)
        return str(path)

    def to_markdown(self) -> str:
        """A markdown table; ``*`` marks points on the error-vs-NFE front, ``m`` on the
        error-vs-MACs front, ``w`` on the error-vs-wall-clock front. A sample distance, when the
        sweep measured one, is a column after the terminal error."""
        has_task = any(r.task_decrement is not None for r in self.rows)
        has_distance = any(r.distance is not None for r in self.rows)
        head = "| solver | steps / tol | NFE | g calls | MACs | wall (ms) | terminal MAPE (%) | terminal error |"
        rule = "|---|---|---|---|---|---|---|---|"
        if has_distance:
            head, rule = head + f" {_distance_title(self.distance)} |", rule + "---|"
        if has_task:
            head, rule = head + " task decrement |", rule + "---|"
        lines = [head + " front |", rule + "---|"]
        for r in self.rows:
            setting = str(r.steps) if r.steps is not None else f"tol {r.tol:g}"
            marks = ("*" if r.pareto_nfe else "") + ("m" if r.pareto_macs else "") + ("w" if r.pareto_wall else "")
            cells = [
                r.solver,
                setting,
                str(r.nfe),
                str(r.g_calls),
                _si(r.macs),
                f"{r.wall_ms:.3g}",
                f"{r.terminal_mape:.3g}",
                f"{r.terminal_error:.3g}",
            ]
            if has_distance:
                cells.append("" if r.distance is None else f"{r.distance:.3g}")
            if has_task:
                cells.append("" if r.task_decrement is None else f"{r.task_decrement:.2f}")
            lines.append("| " + " | ".join(cells + [marks]) + " |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Union[str, os.PathLike], prefix: str = "pareto", plots: bool = True) -> Dict[str, str]:
        """Write CSV, JSON, markdown and (with matplotlib) the three front figures."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {
            "csv": self.to_csv(os.path.join(out_dir, f"{prefix}.csv")),
            "json": self.to_json(os.path.join(out_dir, f"{prefix}.json")),
        }
        md = os.path.join(out_dir, f"{prefix}.md")
        with open(md, "w") as fh:
            fh.write(self.to_markdown())
        paths["markdown"] = md
        if plots:
            from .plots import plot_pareto

            for cost in ("nfe", "macs", "wall_ms"):
                paths[f"png_{cost}"] = plot_pareto(self, os.path.join(out_dir, f"{prefix}_{cost}.png"), cost=cost)
        return paths


def _distance_title(name: Optional[str]) -> str:
    titles = {"w2": "W2 to reference", "mmd": "MMD to reference"}
    return titles.get(name or "", f"{name or 'distance'} to reference")


def _setting(row: ParetoRow) -> str:
    return f"steps={row.steps}" if row.steps is not None else f"tol={row.tol:g}"


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _name(solver: SolverSpec) -> str:
    """A list item's label: a string's own text; a module's ``name`` if it declares one, else its class name."""
    if isinstance(solver, str):
        return solver
    return getattr(solver, "name", None) or type(solver).__name__


def _labelled(solvers: Solvers) -> List[Tuple[str, SolverSpec]]:
    """``(label, solver)`` pairs: a dict's own keys, or each list item's name
    (a string's text, a module's ``name``, else its class)."""
    if isinstance(solvers, (str, nn.Module)):
        solvers = [solvers]
    if isinstance(solvers, Mapping):
        pairs = list(solvers.items())
        bad = [label for label, _ in pairs if not isinstance(label, str) or not label]
        if bad:
            raise TypeError(f"solver labels must be non-empty strings, got {bad!r}")
    else:
        pairs = [(_name(s), s) for s in solvers]
    labels = [label for label, _ in pairs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(
            f"several solvers are labelled {', '.join(map(repr, repeated))}; label each once, "
            "e.g. solvers={'mine': hs, 'euler': 'euler'}"
        )
    return pairs


def _head_after(model, z0: Tensor, t_ends: Tensor) -> Optional[Callable[[Tensor], Tensor]]:
    """For an ``nn.Sequential``, the layers after its NeuralODE, fed what the NeuralODE
    returns for ``t_span = [t0, t1]`` (``[z0, z1]``, with ``t_eval`` when it returns it)."""
    if not isinstance(model, nn.Sequential):
        return None
    for k, layer in enumerate(model):
        if isinstance(layer, NeuralODE):
            rest = model[k + 1 :]
            if len(rest) == 0:
                return None

            def head(final: Tensor, node=layer, rest=rest) -> Tensor:
                states = torch.stack([z0, final])
                return rest((t_ends, states) if node.return_t_eval else states)

            return head
    return None


def pareto(
    model,
    x: Tensor,
    t_span,
    solvers: Solvers = CLASSICAL + ("dopri5",),
    steps: Sequence[int] = (4, 8, 16),
    tolerances: Sequence[float] = (1e-2, 1e-3, 1e-4),
    reference: Union[str, Reference] = "dopri5",
    task: Optional[Task] = None,
    repeats: int = 5,
    timing: bool = True,
    **options,
) -> ParetoResult:
    """Sweep ``solvers`` x ``steps`` (adaptive ones x ``tolerances``) on a model and inputs.

    Args:
        model: a NeuralODE, a module containing one (the layers before it make z(0); for an
            ``nn.Sequential`` the layers after it are the task ``head``, fed what the
            NeuralODE returns on ``[t0, t1]``), or a vector field ``f(t, z)`` with ``x`` the
            initial states.
        x: the inputs; t_span: its endpoints give the interval (a decreasing one integrates backwards).
        solvers: hypersolvers and fixed-step solvers (modules or names such as ``'euler'``),
            and adaptive solvers by name (``'dopri5'``, ``'torchdyn:tsit5'``, ...): a list, or
            a dict ``{label: solver}``. A row's ``solver`` is its label: the dict's key; for a
            list item, a string's own text, a module's ``name`` if it declares one, else its
            class name. Labels must be unique (look rows up with :meth:`ParetoResult.row`).
        reference: what errors are measured against: an adaptive solver's name (at tolerance
            1e-7) or a :class:`~.harvest.Reference`; ``reference_tol=`` (a keyword) sets its tolerance.
        task: the task metric (:class:`Task`); ``head=``, ``labels=``, ``metric=``, ``distance=``
            (keywords) build one. The row's ``task_decrement`` is ``metric(head(reference)) -
            metric(head(solution))``; with a ``distance`` (``'w2'``, ``'mmd'`` or ``fn(samples,
            reference) -> float``) the row's ``distance`` is that of the final states to the reference's.
        repeats: interleaved timing repeats (median); ``timing=False`` skips timing.

    Each row counts NFE of f and calls of g (counted, not assumed), MACs of f and g
    separately, the median wall-clock time, and errors against the reference solve.
    """
    reference, task = _sweep_options(reference, task, options)
    f, initial_state, module = resolve_model(model)
    span = check_t_span(t_span)
    classified = [(label, *resolve_solver(s)) for label, s in _labelled(solvers)]
    with preserved(module), torch.no_grad():
        z0 = initial_state(x)
        t_union, meshes = mesh_union(float(span[0]), float(span[-1]), steps)
        t_union = t_union.to(z0)
        ref = reference_solve(f, z0, t_union, reference.full_name, reference.atol, reference.rtol)
        t_ends = torch.tensor([float(span[0]), float(span[-1])]).to(z0)
        if task.head is None:
            task = dataclasses.replace(task, head=_head_after(model, z0, t_ends))
        sweep = _Sweep(f, z0, t_ends, ref, task, macs(f, t_ends[0], z0))
        for name, kind, target in classified:
            if kind == "adaptive":
                sweep.adaptive(name, target, tolerances)
            else:
                sweep.fixed(name, kind, target, {n: (t_union[meshes[n]], ref[meshes[n]]) for n in steps})
        if timing:
            sweep.time(repeats)
    _mark_fronts(sweep.rows)
    return ParetoResult(sweep.rows, reference.full_name, reference.atol, task.distance_name)


def _sweep_options(reference, task: Optional[Task], options: Dict) -> Tuple[Reference, Task]:
    """The sweep's reference (tolerance 1e-7 unless given) and task, from the arguments and the
    keyword forms ``reference_tol=``, ``head=``, ``labels=``, ``metric=``, ``distance=``."""
    unknown = sorted(set(options) - {"reference_tol", "head", "labels", "metric", "distance"})
    if unknown:
        raise TypeError(f"pareto() got unexpected keyword arguments {unknown}")
    tol = options.get("reference_tol")
    chosen = Reference.of(reference, atol=tol, rtol=tol)
    chosen = Reference.of(chosen, atol=chosen.atol or 1e-7, rtol=chosen.rtol or 1e-7)
    task = task if task is not None else Task()
    given = {k: options[k] for k in ("head", "labels", "metric", "distance") if options.get(k) is not None}
    return chosen, dataclasses.replace(task, **given) if given else task


class _Sweep:
    """The rows of one sweep, and the solves to time for them (one per row)."""

    def __init__(self, f, z0: Tensor, t_ends: Tensor, ref: Tensor, task: Task, macs_f: int):
        self.f, self.z0, self.t_ends, self.ref, self.task, self.macs_f = f, z0, t_ends, ref, task, macs_f
        self.rows: List[ParetoRow] = []
        self.runs: Dict[int, Callable[[], object]] = {}

    def adaptive(self, name: str, solver: str, tolerances: Sequence[float]) -> None:
        f, z0, t_ends = self.f, self.z0, self.t_ends
        for tol in tolerances:
            counter = CallCounter(f)
            sol = reference_solve(counter, z0, t_ends, solver, tol, tol)
            self._add(name, "adaptive", tol=tol, nfe=counter.calls, final=sol[-1], ref_final=self.ref[-1])
            self.runs[len(self.rows) - 1] = lambda tl=tol: reference_solve(f, z0, t_ends, solver, tl, tl)

    def fixed(self, name: str, kind: str, target: nn.Module, meshes: Dict[int, Tuple[Tensor, Tensor]]) -> None:
        f, z0, t_ends = self.f, self.z0, self.t_ends
        macs_g = 0
        if kind == "hyper":
            macs_g = macs(target.correction, *correction_inputs(target, f, t_ends[0], z0, t_ends[1] - t_ends[0]))
        for n, (mesh_t, mesh_ref) in meshes.items():
            counter = CallCounter(f)
            with _count_g(target) as g_counter:
                sol = fixed_solve(target, counter, z0, mesh_t)
            error = global_truncation_error(sol, mesh_ref).mean()
            self._add(name, kind, steps=n, nfe=counter.calls, g_calls=g_counter.calls, macs_g=macs_g,
                      final=sol[-1], ref_final=mesh_ref[-1], global_error=error)
            self.runs[len(self.rows) - 1] = lambda m=mesh_t: fixed_solve(target, f, z0, m, return_trajectory=False)

    def _add(self, name: str, kind: str, **counts) -> None:
        self.rows.append(_row(solver=name, kind=kind, macs_f=self.macs_f, task=self.task, **counts))

    def time(self, repeats: int) -> None:
        """Every row's median wall-clock time, from interleaved repeats of its solve."""
        times = median_times({str(k): fn for k, fn in self.runs.items()}, repeats=repeats)
        for k in self.runs:
            self.rows[k].wall_ms = 1e3 * times[str(k)]


@contextlib.contextmanager
def _count_g(stepper: nn.Module) -> Iterator[CallCounter]:
    """Count calls of a hypersolver's g (zero for a classical solver)."""
    g = getattr(stepper, "hypernet", None) if isinstance(stepper, HyperSolver) else None
    if isinstance(g, nn.Module):
        with counting_calls(g) as counter:
            yield counter
    elif g is not None:
        counter = CallCounter(g)
        stepper.hypernet = counter
        try:
            yield counter
        finally:
            stepper.hypernet = g
    else:
        yield CallCounter(None)


Distance = Union[str, Callable[[Tensor, Tensor], float]]


@dataclass(frozen=True)
class Task:
    """A sweep's task metric: how much ``metric(head(final state), labels)`` drops from the
    reference's. ``head`` None: no task (for an ``nn.Sequential`` model, :func:`pareto` uses the
    layers after its NeuralODE); ``labels`` None: the reference's own predictions; ``metric`` None:
    accuracy.

    ``distance``: a sample distance of each solver's final states to the reference's, the cost in
    sample quality of a sampler: ``'w2'`` (:func:`~.metrics.wasserstein2`, needs POT), ``'mmd'``
    (:func:`~.metrics.mmd`) or a function ``(samples, reference) -> float``. None: not measured."""

    head: Optional[Callable[[Tensor], Tensor]] = None
    labels: Optional[Tensor] = None
    metric: Optional[Callable[[Tensor, Tensor], float]] = None
    distance: Optional[Distance] = None

    def __post_init__(self) -> None:
        d = self.distance
        if isinstance(d, str) and d.lower() not in DISTANCES:
            raise ValueError(
                f"unknown distance {d!r}: pass one of {sorted(DISTANCES)} or a function (samples, reference)"
            )
        if d is not None and not isinstance(d, str) and not callable(d):
            raise TypeError(f"distance must be a name ({sorted(DISTANCES)}) or a function, got {type(d).__name__}")

    @property
    def distance_name(self) -> Optional[str]:
        """The distance's name (a function's ``__name__``), None without one."""
        d = self.distance
        if d is None or isinstance(d, str):
            return None if d is None else d.lower()
        return getattr(d, "__name__", type(d).__name__)

    def decrement(self, final: Tensor, ref_final: Tensor) -> Optional[float]:
        if self.head is None:
            return None
        return task_decrement(self.head, final, ref_final, self.labels, self.metric)

    def sample_distance(self, final: Tensor, ref_final: Tensor) -> Optional[float]:
        """The distance of the final states to the reference's (None without a distance)."""
        d = self.distance
        if d is None:
            return None
        fn = DISTANCES[d.lower()] if isinstance(d, str) else d
        return float(fn(final, ref_final))


def _row(
    *,
    solver: str,
    kind: str,
    steps: Optional[int] = None,
    tol: Optional[float] = None,
    nfe: int,
    g_calls: int = 0,
    macs_f: int,
    macs_g: int = 0,
    final: Tensor,
    ref_final: Tensor,
    global_error: Optional[Tensor] = None,
    task: Task,
) -> ParetoRow:
    """A row from one solve's counts and final state (errors against ``ref_final``); untimed."""
    errors = (final - ref_final).flatten(1).norm(dim=1)
    return ParetoRow(
        solver=solver,
        kind=kind,
        steps=steps,
        tol=tol,
        nfe=nfe,
        g_calls=g_calls,
        macs_f=macs_f,
        macs_g=macs_g,
        macs=nfe * macs_f + g_calls * macs_g,
        wall_ms=float("nan"),
        terminal_mape=terminal_mape(final, ref_final),
        terminal_error=float(errors.mean()),
        max_terminal_error=float(errors.max()),
        global_error=None if global_error is None else float(global_error),
        task_decrement=task.decrement(final, ref_final),
        distance=task.sample_distance(final, ref_final),
    )


def _mark_fronts(rows: List[ParetoRow]) -> None:
    errors = [r.terminal_mape for r in rows]
    for attr, cost in (("pareto_nfe", "nfe"), ("pareto_macs", "macs"), ("pareto_wall", "wall_ms")):
        costs = [getattr(r, cost) for r in rows]
        if any(c != c for c in costs):  # untimed
            continue
        for row, mark in zip(rows, pareto_front(costs, errors)):
            setattr(row, attr, mark)


def generalization(
    hs: HyperSolver,
    model,
    x: Tensor,
    t_span,
    bases: Sequence[str] = ("euler", "midpoint", "heun", "rk4"),
    steps: Sequence[int] = (4, 8, 16),
    **kwargs,
) -> ParetoResult:
    """Base-solver generalisation (supplement C.2): the g fitted for ``hs``'s base, used
    with each of ``bases`` (rows ``g(<fitted base>)@<base>``), next to the bases alone."""
    solvers: Dict[str, SolverSpec] = {}
    for base in bases:
        moved = HyperSolver(base, hs.hypernet, convention=hs.convention)
        solvers[f"g({hs.tableau.name})@{moved.tableau.name}"] = moved
        solvers[_name(base)] = base
    return pareto(model, x, t_span, solvers=solvers, steps=steps, **kwargs)
