"""tune: the fastest hypersolver for a model at each budget, with a learned time grid.

``tune`` holds out part of the inputs, harvests the rest once (targets as precise as the
highest-order base needs), fits one g per candidate (base solver x hypernet options), compares
every candidate with the classical solvers and dopri5 on the held-out inputs, keeps the best
hypersolver per budget, fits a time grid for it, then g and the grid together for the budget,
end to end (each kept only when it lowers the held-out error by at least 1%). With the default g it also
fits a wider g for each budget's best candidate, on the meshes of the budgets that candidate won;
every finalist is timed on the held-out inputs, so that :meth:`TuneResult.cheapest` returns the
fastest one that is accurate enough. Under torchrun every fit is made on one rank and sent to all.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import check_int, nonfinite_rows
from ._costs import median_times
from ._files import check_writable, write_text_atomic
from ._loop import fixed_solve
from ._mesh import check_t_span
from ._model_identity import weights_digest
from ._optimisation import Recipe
from ._outside_fit import outside_fit_ignored
from ._precision import field_in, parameter_dtype
from ._progress import progress_bar
from ._reference import reference_solve
from ._time_grid import fit_time_grid, grid_collision, grid_from_logits
from ._user_model import check_field_output, owned_modules, preserved, resolve_model
from ._workers import check_workers, fork_can_backprop, in_workers
from .budget import fit_budget
from .evaluate import ParetoResult, ParetoRow, Task, _distance_title, pareto
from .fit import FitReport, fit, residual_data
from .harvest import Trajectories
from .hypernets import MLPHyperNet
from .io import save
from .nonstationary import NonStationarySolver
from .shards import gather_fitted, harvest_across_ranks, take_turns
from .solvers import FixedStepSolver, HyperEuler, HyperMidpoint, HyperRK4, HyperSolver

__all__ = ["Choice", "Search", "TuneResult", "tune", "fit_time_grid", "grid_from_logits"]

DEFAULT_BASES = (HyperEuler, HyperMidpoint, HyperRK4)
_CLASSICAL_BY_STAGES = {1: "euler", 2: "midpoint", 4: "rk4"}
"""The classical solver of each stage count: the baselines of the comparison."""
PRUNE_FACTOR = 100.0
"""A (base, budget) is not fitted when the base solver's held-out error there is more than this
many times the best classical solver's: g would have to learn the residual to better than 1%."""
MATCH_LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32)
GRID_GAIN = 0.99
"""A learned grid is kept when its held-out error is below this fraction of the uniform grid's."""
DEFAULT_G_SIZES = ((64, 64), (128, 128, 128))
"""The default g's hidden layers: the first for every candidate, the wider ones for each budget's best."""
BUDGET_NFE = 4
"""Budget fits for more evaluations of f than this get proportionally fewer iterations (each costs more)."""
HELD_OUT_MAX = 512
"""The most inputs the default ``held_out`` keeps out of the fit (a quarter of them otherwise)."""
HIGH_ORDER_ITERATIONS = 2
"""A base of order 4 or more (RK4) is fitted for this many times the recipe's iterations: its residuals are
the smallest, and g needs longer to learn them as accurately as its budgets ask (a CNF at 16 evaluations of
f: 0.185x RK4's error with 2000 iterations, 0.11x with 4000); its fits are the cheapest per iteration (the
fewest steps per trajectory)."""
FAST_DTYPE = torch.float32
"""The dtype g is fitted in, whatever the model's. Residual fits: g's output is a correction scaled by
``dt**(p+1)``, and float32 learns it as well as float64 at half the arithmetic on a CPU; the targets are
computed in the trajectories' dtype first. Budget fits of a float64 model: on a float32 copy of f (a module;
a field that cannot run in float32 is fitted in its own dtype), kept only when they lower the held-out
error, measured in float64. The fitted g is cast to the model's dtype (the float64 van der Pol and Lorenz
benchmark models: tune in 0.55-0.65x the time, its choices as accurate)."""
STAGE_AWARE = {True: (True,), False: (False,), "both": (False, True)}
"""``Search.stage_aware``: whether the candidates of a base of several stages have a g that reads every stage."""
ALONE_FACTOR = 10.0
"""A budget's per-step coefficients without g are not fitted when its base solver's held-out error is more
than this many times the budget's best hypersolver's: learned coefficients and grid lower a base's error
2-3x on the benchmark workloads, so they could not come near (nor be worth their fit)."""
_DEPRECATED = {
    "CLASSICAL": ("the classical solver per stage count is private now", _CLASSICAL_BY_STAGES),
    "OUTSIDE_FIT": (
        "filter OutsideFitWarning, or solve within outside_fit_ignored()",
        ".*outside where its g was fitted.*",
    ),
}


@dataclass
class Choice:
    """The hypersolver kept for one budget.

    ``error``: its held-out mean terminal error (L2 norm per input) on ``mesh``;
    ``uniform_error``: the same on the uniform mesh of ``steps`` steps (equal when no learned
    grid beat it); ``wall_ms``: the median wall time of one solve of the held-out inputs, g's
    cost counted, measured interleaved with the budget's other finalists; ``g_size``: the hidden
    layers of tune's default g (None for a g given as ``hypernet``)."""

    nfe: int
    label: str
    solver: HyperSolver
    mesh: Tensor
    steps: int
    error: float
    uniform_error: float
    wall_ms: float
    learned_grid: bool
    fitted_for_budget: bool = False
    """g and the grid were fitted together for this budget (``Search(budget_iterations=...)``)."""
    g_size: Optional[Tuple[int, ...]] = None
    distance: Optional[float] = None
    """The sample distance of its final states to the reference's (``Search(distance=...)``), else None."""


@dataclass
class TuneResult:
    """What :func:`tune` found: a choice per budget and the held-out comparison behind it.

    ``held_out`` are the inputs compared on (``x[held_out_index]``); ``table`` the comparison
    (every candidate, the classical solvers and dopri5); ``pruned`` what was not fitted and why;
    ``candidates`` every fitted hypersolver by label; ``target_error`` the error of ``match``;
    ``options`` every budget's finalists (the choice and, with the default g, its wider-g rival),
    each timed: what :meth:`cheapest` picks from."""

    choices: Dict[int, Choice]
    table: ParetoResult
    pruned: Dict[str, str]
    held_out: Tensor
    held_out_index: Tensor
    target_error: Optional[float] = None
    match: Optional[str] = None
    seconds: float = 0.0
    candidates: Dict[str, HyperSolver] = field(default_factory=dict, repr=False)
    fit_reports: Dict[str, object] = field(default_factory=dict, repr=False)
    options: List[Choice] = field(default_factory=list, repr=False)

    def solver_for(self, nfe: int) -> Tuple[HyperSolver, Tensor]:
        """``(hypersolver, t_span)`` chosen for ``nfe`` evaluations of f."""
        if nfe not in self.choices:
            why = self.pruned.get(f"NFE {nfe}")
            if why is None:
                raise KeyError(f"nfe={nfe!r} was not tuned (tuned budgets: {sorted(self.choices)}); tune it")
            raise KeyError(f"no choice for nfe={nfe!r}: {why} (tuned budgets: {sorted(self.choices)})")
        choice = self.choices[nfe]
        return choice.solver, choice.mesh

    def cheapest(self, error: Optional[float] = None) -> Tuple[HyperSolver, Tensor]:
        """``(hypersolver, t_span)`` of the fastest option (measured wall time on the held-out inputs;
        fewer NFE on a tie) whose held-out error is at most ``error`` (default: the error of the
        solver given as ``match``). It may be a budget's wider- or narrower-g finalist rather than
        its choice: ``options`` lists them all."""
        return self.fastest(error).solver, self.fastest(error).mesh

    def fastest(self, error: Optional[float] = None) -> Choice:
        """The option :meth:`cheapest` returns, with its numbers."""
        goal = self.target_error if error is None else error
        if goal is None:
            raise ValueError("cheapest needs an error (or a tune(..., match=...) result)")
        pool = [c for c in (self.options or self.choices.values()) if c.error <= goal]
        if pool:
            return min(pool, key=lambda c: (c.wall_ms, c.nfe))
        errors = ", ".join(f"NFE {n}: {c.error:.3g}" for n, c in sorted(self.choices.items()))
        raise ValueError(f"no tuned budget reaches a held-out error of {goal:.3g} ({errors}); tune larger budgets")

    def to_markdown(self) -> str:
        """The choices, with the best classical solver and dopri5 next to them."""
        lines = [
            "| NFE | choice | steps | held-out error | uniform grid | best classical | its error | wall (ms) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for nfe, c in sorted(self.choices.items()):
            classical = self._best_classical(nfe)
            name, err = classical if classical else ("-", float("nan"))
            grid = _how_fitted(c)
            lines.append(
                f"| {nfe} | {c.label} ({grid}) | {c.steps} | {c.error:.3g} | {c.uniform_error:.3g} | {name} "
                f"| {err:.3g} | {c.wall_ms:.2f} |" + ("" if c.distance is None else f" {c.distance:.3g} |")
            )
        if any(c.distance is not None for c in self.choices.values()):
            lines[0] += f" {_distance_title(self.table.distance)} |"
            lines[1] += "---|"
        adaptive = [r for r in self.table if r.kind == "adaptive"]
        if adaptive:
            lines += ["", "| adaptive | tol | NFE | held-out error | wall (ms) |", "|---|---|---|---|---|"]
            lines += [
                f"| {r.solver} | {r.tol:g} | {r.nfe} | {r.terminal_error:.3g} | {r.wall_ms:.2f} |"
                + ("" if r.distance is None else f" {r.distance:.3g} |")
                for r in adaptive
            ]
            if adaptive[0].distance is not None:
                lines[-len(adaptive) - 2] += f" {_distance_title(self.table.distance)} |"
                lines[-len(adaptive) - 1] += "---|"
        if len(self.options) > len(self.choices):
            lines += ["", "| NFE | finalist | g | held-out error | wall (ms) |", "|---|---|---|---|---|"]
            lines += [
                f"| {c.nfe} | {c.label} | {_size_name(c.g_size)} | {c.error:.3g} | {c.wall_ms:.2f} |"
                for c in sorted(self.options, key=lambda c: (c.nfe, c.wall_ms))
            ]
        if self.target_error is not None:
            lines += ["", f"Target: {self.match} (held-out error {self.target_error:.3g})."]
        if self.pruned:
            lines += ["", "Not fitted:"] + [f"- {k}: {why}" for k, why in self.pruned.items()]
        return "\n".join(lines) + "\n"

    def _best_classical(self, nfe: int) -> Optional[Tuple[str, float]]:
        rows = [r for r in self.table if r.kind == "fixed" and r.nfe == nfe and math.isfinite(r.terminal_error)]
        best = min(rows, key=lambda r: r.terminal_error, default=None)
        return None if best is None else (best.solver, best.terminal_error)

    def save(self, folder, force: bool = False) -> None:
        """One loadable file per choice (``nfe<N>.pt``: :func:`~.io.load` it; the grid comes back as
        ``hs.time_grid``), the table (``tune.md``) and the numbers (``tune.json``).

        Every file is written atomically; a replaced file keeps its permissions, a new one gets the
        umask's. A read-only file among them is refused (``PermissionError`` naming it) unless
        ``force``, before any file is written: a refused save leaves the folder as it was."""
        os.makedirs(folder, exist_ok=True)
        solvers = {os.path.join(folder, f"nfe{nfe}.pt"): choice for nfe, choice in self.choices.items()}
        texts = {os.path.join(folder, "tune.md"): self.to_markdown(), os.path.join(folder, "tune.json"): self._json()}
        for path in (*solvers, *texts):
            check_writable(path, force)
        for path, choice in solvers.items():
            save(choice.solver, path, report=self.fit_reports.get(choice.label), force=force)
        for path, text in texts.items():
            write_text_atomic(text, path, prefix=".tune-", force=force)

    def _json(self) -> str:
        numbers = {
            str(n): {k: v for k, v in dataclasses.asdict(c).items() if k not in ("solver", "mesh")}
            | {"mesh": c.mesh.tolist()}
            for n, c in self.choices.items()
        }
        options = [
            {"nfe": c.nfe, "label": c.label, "g_size": c.g_size, "error": c.error, "wall_ms": c.wall_ms}
            for c in self.options
        ]
        return json.dumps(
            {"choices": numbers, "options": options, "pruned": self.pruned, "target_error": self.target_error}, indent=2
        )


@dataclass(frozen=True)
class Search:
    """What :func:`tune` tries, and how hard; any field can also be given to ``tune`` as a keyword.

    Args:
        bases: the hypersolver classes to try (each fitted on the step counts its stage count
            divides the budgets into).
        hypernet: ``hypernet(cls, stage_aware) -> g``, a fresh g for a hypersolver class (default: a
            time-aware, standardised :class:`~.hypernets.MLPHyperNet` of two 64-wide layers, for
            states ``(B, D)``; image states need one).
        stage_aware: for a base of two or more stages, g reads every stage of the base step and z0
            (True, the default: the more accurate at 48 of 52 (base, budget) pairs of four benchmark
            workloads, and at every budget where a base of several stages won), only ``z``, ``f(z)`` and
            ``dt`` (False), or both are fitted and compared (``'both'``: two candidates per such base).
        recipe: how each candidate's g is fitted (a :class:`~.fit.Recipe`; 2000 iterations, twice as many
            for a base of order 4 or more: ``HIGH_ORDER_ITERATIONS``); ``tune(..., iterations=300)``
            changes its iterations alone.
        grid, grid_iterations: fit a time grid for each budget's choice (kept only when it lowers
            the held-out error).
        budget_iterations: then fit the choice's g and grid together for its budget, end to end
            (:func:`~.budget.fit_budget`, this many iterations up to 4 evaluations of f,
            proportionally fewer for more; kept only when it lowers the held-out error by 1%; it fits the
            grid, so ``grid_iterations`` are not spent then). None (the default): half the
            recipe's iterations; 0: not done.
        g_sizes: the hidden layers of the default g: the first for every candidate, each other one
            for every budget's best candidate (fitted once per candidate on the meshes of the budgets
            it won, then gridded and fitted for the budget the same way); the finalists are timed
            and :meth:`TuneResult.cheapest` picks by time. Ignored with a ``hypernet``.
        coefficients_alone: with the budget fit, also fit, per budget whose best base has several
            stages, that base's per-step coefficients alone (a
            :class:`~.nonstationary.NonStationarySolver` without g: no cost per step beyond f's), unless
            the base's held-out error there is over ``ALONE_FACTOR`` (10) times the best hypersolver's.
        held_out: the inputs kept for the comparison and never fitted on: a share of them (a float in
            (0, 1)), a count (an int, ``held_out=256``), or None (the default): a quarter of them, at
            most ``HELD_OUT_MAX`` (512), so that with thousands of inputs the fit gets all the others
            while the comparison, whose cost grows with its batch, stays small.
        max_seconds: stop fitting new candidates and grids after this much wall time (the first
            candidate is always fitted; those skipped are listed in ``TuneResult.pruned``).
        seed: draws the held-out inputs; seeds each g's initialisation, its fit and the grids.
        workers: split the fits over this many forked processes on the CPU (a local gloo process group,
            one share of torch's threads each, as under torchrun): about ``workers`` times faster on as
            many idle cores. Linux (fork) and a model on the CPU only; 1 (the default): this process.
        distance: a sample distance (``'w2'``, ``'mmd'`` or ``fn(samples, reference)``, as
            :class:`~.evaluate.Task` takes it) measured for every row of the table and every finalist:
            what a sampler costs in sample quality. None: not measured.
    """

    bases: Tuple[type, ...] = DEFAULT_BASES
    hypernet: Optional[Callable[[type, bool], nn.Module]] = None
    stage_aware: Union[bool, str] = True
    recipe: Recipe = Recipe(iterations=2000)
    grid: bool = True
    grid_iterations: int = 200
    budget_iterations: Optional[int] = None
    g_sizes: Tuple[Tuple[int, ...], ...] = DEFAULT_G_SIZES
    coefficients_alone: bool = True
    distance: Any = None
    held_out: Union[float, int, None] = None
    max_seconds: Optional[float] = None
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "bases", tuple(self.bases))
        for cls in self.bases:
            if not (isinstance(cls, type) and issubclass(cls, HyperSolver) and cls.tableau is not None):
                raise ValueError(f"bases must be hypersolver classes with a tableau (HyperEuler, ...), got {cls!r}")
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"recipe must be a Recipe, got {type(self.recipe).__name__}")
        _check_held_out(self.held_out)
        if not isinstance(self.stage_aware, (bool, str)) or self.stage_aware not in STAGE_AWARE:
            raise ValueError(f"stage_aware must be True, False or 'both', got {self.stage_aware!r}")
        check_int(self.grid_iterations, "grid_iterations", minimum=0)
        check_int(self.workers, "workers", minimum=1)
        if self.budget_iterations is not None:
            check_int(self.budget_iterations, "budget_iterations", minimum=0)
        object.__setattr__(self, "g_sizes", _check_sizes(self.g_sizes))
        Task(distance=self.distance)  # refuses an unknown distance by name
        if self.max_seconds is not None and not self.max_seconds >= 0:
            raise ValueError(f"max_seconds must be None or a non-negative number, got {self.max_seconds!r}")


def _check_held_out(held_out) -> None:
    """Refuse, by value, a ``held_out`` that is neither None, a share in (0, 1) nor a positive count."""
    if held_out is None:
        return
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise ValueError(f"held_out must be a share in (0, 1) or a count of inputs (an int), got {held_out!r}")
    if isinstance(held_out, int) and held_out < 1:
        raise ValueError(f"held_out must be at least 1 input when a count, got {held_out!r}")
    if isinstance(held_out, float) and not 0.0 < held_out < 1.0:
        raise ValueError(
            f"held_out must be a share in (0, 1) or a count of inputs (an int), got {held_out!r}"
            + (f" (for a count, write held_out={int(held_out)})" if held_out >= 1 and held_out.is_integer() else "")
        )


def _check_sizes(sizes) -> Tuple[Tuple[int, ...], ...]:
    """``g_sizes`` as a tuple of tuples, refused by value unless hidden-layer widths (positive ints)."""

    def is_size(size) -> bool:
        return (
            isinstance(size, (tuple, list))
            and len(size) > 0
            and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in size)
        )

    if not isinstance(sizes, (tuple, list)) or not sizes or not all(map(is_size, sizes)):
        raise ValueError(f"g_sizes must be a non-empty tuple of hidden-layer tuples of positive ints, got {sizes!r}")
    return tuple(tuple(size) for size in sizes)


def _resolve_search(search: Optional[Search], options: Dict[str, Any]) -> Search:
    """``search`` (default ``Search()``) with ``tune``'s keyword ``options`` (its fields, and
    ``iterations``: the recipe's) applied; an unknown keyword is a ``TypeError`` naming it."""
    options = dict(options)
    if search is not None and not isinstance(search, Search):  # tune(model, x, t_span, nfe, match, bases)
        warnings.warn("tune()'s positional bases is deprecated: pass bases=...", DeprecationWarning, stacklevel=3)
        search, options = None, {"bases": search, **options}
    search = search if search is not None else Search()
    names = {f.name for f in dataclasses.fields(Search)}
    for name in options:
        if name not in names and name != "iterations":
            raise TypeError(f"tune() got an unexpected keyword argument {name!r}")
    if "iterations" in options:
        recipe = options.get("recipe", search.recipe)
        options["recipe"] = recipe.replace(iterations=options.pop("iterations"))
    return dataclasses.replace(search, **options) if options else search


def _default_hypernet(state_shape: Tuple[int, ...]) -> Callable[..., nn.Module]:
    if len(state_shape) != 1:
        raise ValueError(
            f"tune's default g is an MLP for states (B, D), got states of shape (B, *{tuple(state_shape)}); "
            "pass hypernet=lambda cls, stage_aware: <a fresh g for hypersolver class cls>, e.g. ConvHyperNet(channels)"
        )
    (dim,) = state_shape

    def make(cls: type, stage_aware: bool, hidden: Tuple[int, ...] = DEFAULT_G_SIZES[0]) -> nn.Module:
        stages = cls.tableau.stages if stage_aware else 1
        return MLPHyperNet(dim, hidden=hidden, time=True, stages=stages, scaled=True)

    return make


def _parse_match(match: str) -> Tuple[str, float]:
    name, sep, tol = match.rpartition(":")
    try:
        value = float(tol)
    except ValueError:
        value = float("nan")
    if not sep or not name or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"match must be '<adaptive solver>:<tolerance>', e.g. 'dopri5:1e-4', got {match!r}")
    return name, value


def _check_budgets(nfe) -> List[int]:
    values = list(nfe)
    if not values:
        raise ValueError(f"nfe must be a non-empty sequence of positive ints, got {nfe!r}")
    return sorted({check_int(n, "nfe") for n in values})


def tune(
    model,
    x: Tensor,
    t_span,
    nfe: Optional[Sequence[int]] = None,
    match: Optional[str] = None,
    search: Optional[Search] = None,
    labels: Optional[Tensor] = None,
    device=None,
    progress: bool = True,
    **options: Any,
) -> TuneResult:
    """Find, per budget of f evaluations, the most accurate hypersolver for ``model``.

    A share of the inputs is held out; the classical solvers on it prune the (base, budget) pairs
    that cannot win; the rest of the inputs are harvested once; one g is fitted per candidate;
    every candidate is compared with the classical solvers and an adaptive one on the held-out
    inputs; per budget the best is kept, with a learned time grid when that lowers its error.

    Args:
        model: what :func:`~.harvest.harvest` takes: a NeuralODE, a module holding one, or ``f(t, z)``.
        x: the inputs (a tensor); ``TuneResult.held_out`` are those compared on.
        t_span: its endpoints give the interval (a decreasing one integrates backwards).
        nfe: the budgets (evaluations of f per solve); default ``(4, 8, 16, 24)``, or with ``match``
            a ladder from 2 to 32.
        match: an adaptive solver and tolerance, ``'dopri5:1e-4'``: its held-out error becomes
            ``TuneResult.target_error`` (what :meth:`TuneResult.cheapest` aims at by default).
        search: the candidates and the effort (a :class:`Search`); its fields (``bases=``,
            ``hypernet=``, ``stage_aware=``, ``grid=``, ``grid_iterations=``, ``held_out=``,
            ``max_seconds=``, ``seed=``, ``workers=``, and ``iterations=``: the recipe's) can be given as keywords.
        labels: the task labels of the inputs' model head (the table's task decrement).
        device: where to harvest and fit (default: where the model computes).
        progress: a tqdm bar over the stages of the search.
    """
    search = _resolve_search(search, options)
    budgets = _check_budgets(nfe if nfe is not None else (MATCH_LADDER if match else (4, 8, 16, 24)))
    target = _parse_match(match) if match is not None else None
    arguments = (model, x, t_span, budgets, (match, target), search, labels, device, progress)
    if search.workers == 1:
        return _tune(*arguments)
    devices = [torch.device(device)] if device is not None else []
    devices += [p.device for m in owned_modules(model) for p in m.parameters()]
    check_workers(search.workers, devices)
    if not fork_can_backprop():
        warnings.warn(
            f"tune(workers={search.workers}) runs in this process: a forked process cannot use autograd once this "
            "one ran autograd's worker threads (a backward through torch.compile does); call tune from a fresh "
            "process to use the workers",
            RuntimeWarning,
            stacklevel=2,
        )
        return _tune(*arguments)
    return in_workers(_tune, search.workers, *arguments)


def _tune(model, x, t_span, budgets, matched, search: Search, labels, device, progress: bool, rank: int = 0):
    """:func:`tune`'s search, in this process or as one of its workers (``rank``: only rank 0 shows progress)."""
    (match, target), progress = matched, progress and rank == 0
    with preserved(*owned_modules(model), restore=True):  # every phase leaves the user's model as it was
        run = _setup(model, x, t_span, labels, device, search)
        finalists = len(run.sizes) + int(search.coefficients_alone)
        bar = _Bar(progress, 3 + 2 * len(search.bases) + len(budgets) * finalists)
        try:
            plan = _plan(run, budgets, bar)
            trajectories = _harvest(run, plan, bar)
            fitted = _fit_candidates(run, trajectories, plan, bar)
            comparison = _compare(run, budgets, fitted, target, bar)
            chosen = _choose(run, budgets, trajectories, fitted, comparison.table, bar)
        finally:
            bar.close()
    pruned = {**plan.pruned, **fitted.pruned, **chosen.pruned}
    _check_choices(budgets, chosen.choices, pruned)
    result = TuneResult(
        chosen.choices,
        comparison.table,
        pruned,
        run.x_test,
        run.test_index,
        comparison.target_error,
        match,
        time.perf_counter() - run.start,
        {label: c.hs for label, c in fitted.candidates.items()},
        {label: c.report for label, c in fitted.candidates.items()},
        chosen.options,
    )
    return gather_fitted({"result": result}, ["result"])["result"]  # under torchrun: rank 0's, on every rank


@dataclass(frozen=True)
class _Run:
    """What every phase of :func:`tune` reads: the model, the inputs split, the search and its clock."""

    model: Any
    f: Callable
    initial_state: Callable
    module: Optional[nn.Module]
    ends: Tensor
    x_test: Tensor
    x_fit: Tensor
    test_index: Tensor
    labels: Optional[Tensor]
    device: Any
    dtype: Optional[torch.dtype]
    fast_f: Optional[Callable]
    make: Callable[..., nn.Module]
    sizes: Tuple[Optional[Tuple[int, ...]], ...]
    search: Search
    start: float

    def out_of_time(self) -> bool:
        """Whether the search's ``max_seconds`` have passed."""
        seconds = self.search.max_seconds
        return seconds is not None and time.perf_counter() - self.start > seconds

    def skipped(self) -> str:
        return f"not fitted: the {self.search.max_seconds:g} s budget was spent"


def _setup(model, x: Tensor, t_span, labels: Optional[Tensor], device, search: Search) -> _Run:
    """Check the inputs, resolve the model and hold out a share of the inputs (drawn with the seed)."""
    start = time.perf_counter()
    if not isinstance(x, Tensor):
        raise TypeError(f"tune needs the inputs as a tensor, got {type(x).__name__}")
    if len(x) < 4:
        raise ValueError(f"tune needs at least 4 inputs to hold some out, got {len(x)}")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"labels must have one entry per input: got {len(labels)} labels for {len(x)} inputs")
    _check_finite_inputs(x)
    _check_dtypes(model, x)
    held = _held_out_count(len(x), search.held_out)
    span = check_t_span(t_span)
    f, initial_state, module = resolve_model(model)
    with preserved(module), torch.no_grad():
        z = initial_state(x[:2])
        check_field_output(f, span[0], z)  # before any solve: a field of the wrong width is named, with both shapes
        fast_f = field_in(f, FAST_DTYPE, float(span[0]), z[:1]) if z.dtype == torch.float64 else None
    make = search.hypernet or _default_hypernet(tuple(z.shape[1:]))  # refuses image states without a hypernet
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(search.seed))
    test = order[:held]
    fitting = order[held:]
    return _Run(
        model,
        f,
        initial_state,
        module,
        torch.stack([span[0], span[-1]]),
        x[test],
        x[fitting],
        test,
        None if labels is None else labels[test],
        device,
        _model_dtype(model, x),
        fast_f,
        make,
        search.g_sizes if search.hypernet is None else (None,),
        search,
        start,
    )


def _check_finite_inputs(x: Tensor) -> None:
    """Refuse nan or inf inputs, by their rows in ``x`` (before the split: the user's rows)."""
    bad, rows = nonfinite_rows(x)
    if bad:
        raise ValueError(
            f"tune got non-finite (nan or inf) inputs: rows {rows} of x, {len(bad)} of {len(x)}; no solve can go "
            "through them (the held-out comparison and the fit would fail on them): remove or repair those inputs"
        )


def _check_dtypes(model, x: Tensor) -> None:
    """Refuse (``TypeError``) floating inputs of another dtype than the model's floating parameters."""
    if not isinstance(model, nn.Module) or not x.is_floating_point():
        return
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes and x.dtype not in dtypes:
        dtype = min(dtypes, key=str)
        to = {torch.float64: "double()", torch.float32: "float()", torch.float16: "half()"}.get(dtype, f"to({dtype})")
        raise TypeError(
            f"the model's parameters are {', '.join(sorted(map(str, dtypes)))} but the inputs x are {x.dtype}: "
            f"f cannot be evaluated on them; convert the inputs (x.{to}) or the model (model.to({x.dtype}))"
        )


def _held_out_count(n: int, held_out: Union[float, int, None]) -> int:
    """How many of ``n`` inputs ``held_out`` (a share, a count, or None: a quarter, at most ``HELD_OUT_MAX``)
    holds out (at least one); refuses a split that leaves none to fit on."""
    if held_out is None:
        return min(max(1, int(round(0.25 * n))), HELD_OUT_MAX)
    held = held_out if isinstance(held_out, int) else max(1, int(round(held_out * n)))
    if held >= n:
        smaller = f"below {(n - 0.5) / n:.3g}" if isinstance(held_out, float) else f"at most {n - 1}"
        raise ValueError(
            f"held_out={held_out:g} of {n} inputs holds out {held} and leaves {max(0, n - held)} to fit on: tune needs "
            f"inputs in both shares; give more inputs or a smaller held_out ({smaller} for {n} inputs)"
        )
    return held


@dataclass
class _Plan:
    """Phase 1: per base class, the step counts worth fitting (in the order of the bases); what was
    pruned and why."""

    steps: Dict[type, List[int]]
    pruned: Dict[str, str]


def _plan(run: _Run, budgets: List[int], bar: _Bar) -> _Plan:
    """Run the classical solvers and each base solver on the held-out inputs; a base whose own error
    at a budget is over ``PRUNE_FACTOR`` times the best classical solver's is not fitted there (the
    base closest to it always is: every budget gets a choice)."""
    bases = run.search.bases
    base_of = {cls: f"base of {cls.__name__}" for cls in bases}
    stages = (*_CLASSICAL_BY_STAGES, *(c.tableau.stages for c in bases))
    steps = sorted({n // s for n in budgets for s in stages if n % s == 0})
    solvers = {name: name for name in _CLASSICAL_BY_STAGES.values()}
    solvers |= {base_of[c]: FixedStepSolver(c.tableau) for c in bases}
    with outside_fit_ignored():
        baseline = pareto(run.model, run.x_test, run.ends, solvers=solvers, steps=steps, timing=False)
    bar.update()
    plan: Dict[type, List[int]] = {}
    pruned: Dict[str, str] = {}
    for n in budgets:
        classical = [r.terminal_error for r in baseline if r.nfe == n and r.solver in _CLASSICAL_BY_STAGES.values()]
        best = min(classical, default=math.inf)
        errors = {
            cls: next((r.terminal_error for r in baseline if r.solver == base_of[cls] and r.nfe == n), math.inf)
            for cls in bases
            if n % cls.tableau.stages == 0
        }
        if not errors:
            pruned[f"NFE {n}"] = "no base's stage count divides it"
            continue
        closest = min(errors, key=errors.get)
        for cls, error in errors.items():
            ratio = error / best if best > 0 else math.inf
            if ratio > PRUNE_FACTOR and cls is not closest:
                pruned[f"{cls.__name__} at NFE {n}"] = (
                    f"its base solver's held-out error is {ratio:.3g}x the best classical solver's: g would have "
                    f"to learn the residual to better than 1/{ratio:.3g}"
                )
                continue
            plan.setdefault(cls, []).append(n // cls.tableau.stages)
    if not plan:
        raise ValueError(f"no candidate can be fitted for budgets {budgets}: {pruned}")
    return _Plan({cls: plan[cls] for cls in bases if cls in plan}, pruned)


def _harvest(run: _Run, plan: _Plan, bar: _Bar) -> Trajectories:
    """Phase 2: one harvest of the fitting inputs, as precise as the highest-order base needs."""
    steps = sorted({n for counts in plan.steps.values() for n in counts})
    top = max(plan.steps, key=lambda c: c.tableau.order)
    # across the ranks of a process group when one is initialised (a plain harvest otherwise)
    trajectories = harvest_across_ranks(
        run.model, run.x_fit, run.ends, steps=steps, base=top.tableau, device=run.device
    )
    bar.update()
    return trajectories


@dataclass
class _Candidate:
    """A fitted hypersolver, the step counts it was fitted for, and its fit report."""

    hs: HyperSolver
    steps: List[int]
    report: FitReport
    size: Optional[Tuple[int, ...]] = None


@dataclass
class _Fitted:
    """Phase 3: the candidates by label; those skipped for time, and why."""

    candidates: Dict[str, _Candidate]
    pruned: Dict[str, str]


def _fit_candidates(run: _Run, trajectories: Trajectories, plan: _Plan, bar: _Bar) -> _Fitted:
    """One g per base and option (for a base of several stages, a stage-aware g, a plain one, or both)."""
    jobs = [
        (cls, steps, aware, cls.__name__ + (" (stage-aware g)" if aware else ""))
        for cls, steps in plan.steps.items()
        for aware in (STAGE_AWARE[run.search.stage_aware] if cls.tableau.stages > 1 else (False,))
    ]
    costs = [_fit_cost(run, cls, steps, run.sizes[0]) for cls, steps, *_ in jobs]
    local: Dict[str, _Candidate] = {}
    for cls, steps, aware, label in take_turns(jobs, costs):  # every job without a process group
        if local and run.out_of_time():  # each rank's first candidate is always fitted
            continue
        meshes = trajectories.replace(meshes={n: trajectories.meshes[n] for n in steps})
        local[label] = _fit_one(run, cls, aware, meshes, run.sizes[0])
        bar.update()
    candidates = gather_fitted(local, [label for *_, label in jobs], run.device)  # the same on every rank
    pruned = {label: run.skipped() for *_, label in jobs if label not in candidates}
    return _Fitted(candidates, pruned)


def _iteration_factor(cls: type) -> int:
    return HIGH_ORDER_ITERATIONS if cls.tableau.order >= 4 else 1


def _fit_cost(run: _Run, cls: type, steps: Sequence[int], size: Optional[Tuple[int, ...]]) -> float:
    """An estimate of a residual fit's time, for sharing fits between ranks (about seconds for a small
    field on one CPU thread): a fixed part, and a part per step of each trajectory (g's batch holds every
    step of every mesh) that grows with g's width."""
    width = sum(size) / 128 if size else 1.0
    iterations = run.search.recipe.iterations * _iteration_factor(cls)
    return iterations / 2000 * (8.0 + 0.14 * width * sum(steps))


def _fit_one(run: _Run, cls: type, aware: bool, meshes: Trajectories, size: Optional[Tuple[int, ...]]) -> _Candidate:
    """A fresh g (seeded; the caller's RNG untouched) for ``cls`` (of hidden layers ``size`` for the
    default g), standardised when it scales its own output, fitted with the search's recipe (for a base
    of order 4 or more, ``HIGH_ORDER_ITERATIONS`` times its iterations)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.search.seed)
        g = run.make(cls, aware) if size is None else run.make(cls, aware, size)
    hs = cls(g)
    dtype = run.dtype or parameter_dtype(hs)
    hs = hs.to(FAST_DTYPE)  # the targets are still computed in the trajectories' dtype
    if getattr(g, "scales_output", False) and hasattr(g, "standardize_"):
        g.standardize_(residual_data(hs, meshes))
    recipe = run.search.recipe
    recipe = recipe.replace(iterations=recipe.iterations * _iteration_factor(cls))
    report = fit(hs, meshes, recipe=recipe, progress=False, seed=run.search.seed, device=run.device)
    if dtype is not None:
        hs = hs.to(dtype)
    hs.eval()
    return _Candidate(hs, meshes.steps, report, size)


@dataclass
class _Comparison:
    """Phase 4: every candidate, the classical solvers and the adaptive one on the held-out inputs."""

    table: ParetoResult
    target_error: Optional[float]


def _compare(
    run: _Run, budgets: List[int], fitted: _Fitted, target: Optional[Tuple[str, float]], bar: _Bar
) -> _Comparison:
    """The held-out comparison (``pareto``, timed); hypersolver rows only at the steps they were fitted on."""
    candidates = fitted.candidates
    steps = {n // s for n in budgets for s in _CLASSICAL_BY_STAGES if n % s == 0}
    steps |= {n for c in candidates.values() for n in c.steps}
    adaptive = "dopri5" if target is None else target[0]
    tolerances = (1e-3, 1e-4) if target is None else tuple(sorted({1e-3, 1e-4, target[1]}, reverse=True))
    solvers = {label: c.hs for label, c in candidates.items()} | {n: n for n in _CLASSICAL_BY_STAGES.values()}
    solvers[adaptive] = adaptive
    with outside_fit_ignored():
        table = pareto(
            run.model,
            run.x_test,
            run.ends,
            solvers=solvers,
            steps=sorted(steps),
            tolerances=tolerances,
            labels=run.labels,
            repeats=3,
            distance=run.search.distance,
        )
    table.rows = [r for r in table.rows if r.kind != "hyper" or r.steps in candidates[r.solver].steps]
    bar.update()
    target_error = None if target is None else table.row(target[0], tol=target[1]).terminal_error
    return _Comparison(table, target_error)


@dataclass
class _Chosen:
    """Phase 5: the choice per budget; what was skipped, and why; every budget's timed finalists."""

    choices: Dict[int, Choice]
    pruned: Dict[str, str]
    options: List[Choice]


@dataclass(frozen=True)
class _Ends:
    """The held-out initial states and their references at the end; the fitting trajectories' ends."""

    z_test: Tensor
    ref_test: Tensor
    z0: Tensor
    z1: Tensor


def _choose(
    run: _Run, budgets: List[int], trajectories: Trajectories, fitted: _Fitted, table: ParetoResult, bar: _Bar
) -> _Chosen:
    """Per budget, the finalists: a copy of the candidate with the lowest held-out error, and the same
    base with each wider default g (fitted once per candidate, on the meshes of the budgets where that
    candidate is best), each with its time grid and fitted for the budget; all timed. The most
    accurate is the budget's choice. Across ranks (torchrun, ``workers``) the work is shared in units
    (:func:`_units`: a wider g with the finalists that use it), each made on one rank and sent to all."""
    with preserved(run.module), torch.no_grad():
        z_test = run.initial_state(run.x_test.to(trajectories.states.device))
        tol = table.reference_tol
        ref_test = reference_solve(run.f, z_test, run.ends, table.reference, tol, tol)[-1]
    ends = _Ends(z_test, ref_test, trajectories.states[0].to(z_test), trajectories.states[-1].to(z_test))
    chosen = _Chosen({}, {}, [])
    bests = _best_rows(run, budgets, table, chosen.pruned)
    jobs = [(n, kind) for n, best in bests.items() for kind in _finalist_kinds(run, fitted.candidates[best.solver])]
    units = _units(run, bests, jobs)
    costs = [sum(_job_cost(run, job, bests, fitted) for job in unit) for unit in units]
    local = {}
    for unit in take_turns(units, costs):  # every unit without a process group
        wider, local[unit] = {}, {}
        for job in unit:
            if isinstance(job[0], str):  # a wider g, for the finalists after it in this unit
                wider.update(_wider(run, job, bests, fitted, trajectories))
                continue
            local[unit][job] = _finalist_job(run, job, bests[job[0]], fitted, wider, trajectories, ends)
            bar.update()
    gathered = gather_fitted(local, units, run.device)
    made = {job: result for done in gathered.values() for job, result in done.items()}
    for n in bests:
        results = [made[job] for job in jobs if job[0] == n and job in made]
        for _, why in results:
            chosen.pruned.update(why)
        finalists = _timed(run, [choice for choice, _ in results if choice is not None], ends)
        chosen.options += finalists
        chosen.choices[n] = min(finalists, key=lambda c: c.error)
    return chosen


def _units(run: _Run, bests: Dict[int, ParetoRow], jobs: List[Tuple[int, Any]]) -> List[Tuple]:
    """The finalist jobs grouped into units of work for the ranks: each wider g, ``(label, size)``, with the
    finalists that use it (the budgets its candidate won) after it, so that no rank waits for another's g;
    every other finalist alone."""
    labels = list(dict.fromkeys(best.solver for best in bests.values()))
    units = [
        ((label, size), *[(n, k) for n, k in jobs if k == size and bests[n].solver == label])
        for label in labels
        for size in run.sizes[1:]
    ]
    grouped = {job for unit in units for job in unit[1:]}
    return units + [(job,) for job in jobs if job not in grouped]


def _job_cost(run: _Run, job: Tuple, bests: Dict[int, ParetoRow], fitted: _Fitted) -> float:
    """An estimate of a job's time, for sharing units between ranks (about seconds for a small field on one
    CPU thread): a wider g's residual fit, or a budget's finalist (its grid and budget fit)."""
    if isinstance(job[0], str):  # a wider g: a residual fit on the meshes of the budgets its candidate won
        label, size = job
        cls = type(fitted.candidates[label].hs)
        return _fit_cost(run, cls, [r.steps for r in bests.values() if r.solver == label], size)
    n, kind = job
    per_fit = _budget_iterations(run.search, min(n, BUDGET_NFE)) / 1000 or 0.1
    return per_fit * {None: 7.0, "alone": 6.0}.get(kind, 10.0)


def _wider(
    run: _Run, job: Tuple[str, Tuple[int, ...]], bests: Dict[int, ParetoRow], fitted: _Fitted, trajectories
) -> Dict[Tuple[str, Tuple[int, ...]], _Candidate]:
    """``{(label, size): candidate}``: the wider default g of a budget-winning candidate, fitted on the meshes
    of the budgets it won; empty when out of time."""
    if run.out_of_time():
        return {}
    label, size = job
    narrow = fitted.candidates[label]
    won = sorted({r.steps for r in bests.values() if r.solver == label})
    meshes = trajectories.replace(meshes={k: trajectories.meshes[k] for k in won})
    return {job: _fit_one(run, type(narrow.hs), narrow.hs.reads_stages, meshes, size)}


def _finalist_kinds(run: _Run, narrow: _Candidate) -> List[Any]:
    """A budget's finalists: its best candidate (``None``), each wider g size, and ``'alone'`` (the best
    base's per-step coefficients without g, for a base of several stages)."""
    kinds: List[Any] = [None, *run.sizes[1:]]
    if run.search.coefficients_alone and narrow.hs.tableau.stages > 1:
        kinds.append("alone")
    return kinds


def _finalist_job(
    run: _Run, job: Tuple[int, Any], best: ParetoRow, fitted: _Fitted, wider: Dict, trajectories, ends: _Ends
) -> Tuple[Optional[Choice], Dict[str, str]]:
    """``(finalist or None, what was skipped and why)`` for ``job = (nfe, kind)`` (:func:`_finalist_kinds`)."""
    (n, kind), narrow, pruned = job, fitted.candidates[best.solver], {}
    if kind is None:
        return _finalist(run, (n, best.solver, best.steps), narrow, trajectories, ends, pruned), pruned
    if kind == "alone":
        if not _budget_iterations(run.search, n) or run.out_of_time():
            return None, pruned
        where = (n, best.steps, best.terminal_error)
        return _coefficients_alone(run, where, narrow.hs.tableau, trajectories, ends, pruned), pruned
    if (best.solver, kind) not in wider or run.out_of_time():
        return None, {f"g {_size_name(kind)} at NFE {n}": run.skipped()}
    where = (n, f"{best.solver} [g {_size_name(kind)}]", best.steps)
    return _finalist(run, where, wider[(best.solver, kind)], trajectories, ends, pruned), pruned


def _best_rows(run: _Run, budgets: List[int], table: ParetoResult, pruned: Dict[str, str]) -> Dict[int, ParetoRow]:
    """Per budget, the table's hypersolver row with the lowest finite held-out error; a budget where
    every hypersolver's error is inf or nan gets none, and why in ``pruned``."""
    bests = {}
    for n in budgets:
        rows = [r for r in table if r.kind == "hyper" and r.nfe == n]
        if rows and not any(math.isfinite(r.terminal_error) for r in rows):
            pruned[f"NFE {n}"] = _why_no_choice(run, table, n, rows)
        rows = [r for r in rows if math.isfinite(r.terminal_error)]
        if rows:
            bests[n] = min(rows, key=lambda r: r.terminal_error)
    return bests


def _finalist(
    run: _Run, where: Tuple[int, str, int], candidate: _Candidate, trajectories, ends: _Ends, pruned: Dict
) -> Choice:
    """A budget's finalist (``where``: NFE, label, steps) from a fitted candidate: its time grid, then g
    and the grid fitted together for the budget."""
    choice, skipped = _choice_at(run, where, candidate, ends)
    if skipped:
        pruned.setdefault(f"time grid at NFE {where[0]}", skipped)
    return _fitted_for_budget(run, choice, trajectories, ends)


def _timed(run: _Run, finalists: List[Choice], ends: _Ends) -> List[Choice]:
    """The finalists with their median wall time on the held-out inputs, measured interleaved."""

    def solve(c: Choice) -> Callable[[], object]:
        return lambda: fixed_solve(c.solver, run.f, ends.z_test, c.mesh, return_trajectory=False)

    with preserved(run.module), torch.no_grad(), outside_fit_ignored():
        seconds = median_times({str(k): solve(c) for k, c in enumerate(finalists)}, repeats=5)
        task = Task(distance=run.search.distance)
        distances = [None] * len(finalists)
        if run.search.distance is not None:  # one more solve per finalist, only when a distance is asked for
            distances = [task.sample_distance(solve(c)(), ends.ref_test) for c in finalists]
    return [
        dataclasses.replace(c, wall_ms=1e3 * seconds[str(k)], distance=distances[k]) for k, c in enumerate(finalists)
    ]


def _size_name(size: Optional[Tuple[int, ...]]) -> str:
    """``(128, 128, 128)`` as ``'128x3'``, ``(64, 32)`` as ``'64-32'``; ``'-'`` for a user's g."""
    if not size:
        return "-"
    return f"{size[0]}x{len(size)}" if len(set(size)) == 1 else "-".join(map(str, size))


def _how_fitted(choice: Choice) -> str:
    if not choice.fitted_for_budget:
        return f"{_grid_kind(choice)} grid"
    if isinstance(choice.solver, NonStationarySolver):
        g = "g, " if choice.solver.coefficients.g is not None else ""
        return f"{g}per-step coefficients and grid fitted for the budget"
    return "g and grid fitted for the budget"


def _grid_kind(choice: Choice) -> str:
    return "learned" if choice.learned_grid else "uniform"


def _fitted_for_budget(run: _Run, choice: Choice, trajectories: Trajectories, ends: _Ends) -> Choice:
    """The choice with g, per-step coefficients (a :class:`~.nonstationary.NonStationarySolver` on its
    base, starting as the choice itself) and its grid fitted together for its budget, end to end, when
    the search asks for it and that lowers the held-out error; the choice as it is otherwise."""
    iterations = _budget_iterations(run.search, choice.nfe)
    if not iterations or run.out_of_time():
        return choice
    hs, n = _per_step(choice.solver, choice.steps), choice.steps
    grid = _budget_grid(run, n, ends)
    _fit_budget(run, hs, trajectories, n, iterations, grid)
    mesh = hs.time_grid.to(choice.mesh)
    error = _terminal_error(hs, run.f, ends.z_test, ends.ref_test, mesh)
    if not error < GRID_GAIN * choice.error:  # as for a grid: kept when it lowers the error by at least 1%
        return choice
    return dataclasses.replace(choice, solver=hs, mesh=mesh, error=error, learned_grid=grid, fitted_for_budget=True)


def _per_step(solver: HyperSolver, steps: int) -> HyperSolver:
    """A copy of ``solver`` with per-step coefficients to fit (the same solver until fitted); a copy
    of it as it is when its step is not the plain hypersolver step (a multi-stage solver, say)."""
    if type(solver).step_parts is not HyperSolver.step_parts or solver.tableau.stages == 1:
        return copy.deepcopy(solver)  # one stage: its per-step weight is 1, nothing to learn but the grid
    g = copy.deepcopy(solver.hypernet)
    hs = NonStationarySolver(solver.tableau, steps, g=g, convention=solver.convention)
    hs.residual_scale = solver.residual_scale
    return hs


def _coefficients_alone(
    run: _Run, where: Tuple[int, int, float], base, trajectories: Trajectories, ends: _Ends, pruned: Dict[str, str]
) -> Optional[Choice]:
    """A finalist with no g: ``base``'s per-step coefficients and the grid fitted for the budget (``where``:
    NFE, steps and the budget's best hypersolver error); None, and why in ``pruned``, when the base's own
    held-out error is over ``ALONE_FACTOR`` times that error."""
    nfe, steps, best_error = where
    hs = NonStationarySolver(base, steps)
    if run.dtype is not None:
        hs = hs.to(run.dtype)
    uniform = torch.linspace(float(run.ends[0]), float(run.ends[1]), steps + 1).to(ends.z_test)
    uniform_error = _terminal_error(hs, run.f, ends.z_test, ends.ref_test, uniform)
    if not uniform_error <= ALONE_FACTOR * best_error:  # nan too
        pruned[f"{base.name} with per-step coefficients (no g) at NFE {nfe}"] = (
            f"not fitted: {base.name}'s held-out error there ({uniform_error:.3g}) is over {ALONE_FACTOR:g}x the best "
            f"hypersolver's ({best_error:.3g}); learned coefficients alone would not come near"
        )
        return None
    grid = _budget_grid(run, steps, ends)
    _fit_budget(run, hs, trajectories, steps, _budget_iterations(run.search, nfe), grid)
    mesh = hs.time_grid.to(ends.z_test)
    error = _terminal_error(hs, run.f, ends.z_test, ends.ref_test, mesh)
    label = f"{base.name} with per-step coefficients (no g)"
    return Choice(nfe, label, hs, mesh, steps, error, uniform_error, math.nan, grid, fitted_for_budget=True)


def _fit_budget(run: _Run, hs: HyperSolver, trajectories: Trajectories, steps: int, iterations: int, grid: bool):
    """:func:`~.budget.fit_budget` on the ``steps``-step mesh, in ``FAST_DTYPE`` when the model is float64 and
    has a copy in it (``run.fast_f``) whose grid points cannot collide; ``hs`` ends in the model's dtype."""
    t0, t1 = run.ends
    fast = run.fast_f is not None and not (grid and grid_collision(steps, t0, t1, FAST_DTYPE))
    budget = trajectories.replace(meshes={steps: trajectories.meshes[steps]})
    if fast:
        hs.to(FAST_DTYPE)
        budget = budget.replace(f=run.fast_f)
    try:
        with preserved(run.module):
            fit_budget(hs, budget, iterations=iterations, grid=grid, progress=False, seed=run.search.seed)
    finally:
        if fast:
            hs.to(run.dtype)
    if fast:  # fitted for the user's model, not for its float32 copy
        hs.validity = dataclasses.replace(hs.validity, model=weights_digest(trajectories.f))


def _budget_grid(run: _Run, steps: int, ends: _Ends) -> bool:
    """Whether a budget fit of ``steps`` steps also fits the grid: when the search fits grids and its
    points cannot collide in the states' dtype."""
    return run.search.grid and not grid_collision(steps, run.ends[0], run.ends[1], ends.z0.dtype)


def _budget_iterations(search: Search, nfe: int) -> int:
    """The budget fit's iterations at ``nfe`` evaluations of f: the search's (by default half the
    recipe's) up to ``BUDGET_NFE``, proportionally fewer beyond (each iteration costs ``nfe``)."""
    total = search.recipe.iterations // 2 if search.budget_iterations is None else search.budget_iterations
    return math.ceil(total * min(1.0, BUDGET_NFE / nfe)) if total else 0


def _why_no_choice(run: _Run, table: ParetoResult, n: int, rows) -> str:
    """Why budget ``n`` has no choice: every hypersolver's held-out error (``rows``) is inf or nan."""
    errors = ", ".join(f"{r.solver}: {r.terminal_error:.3g}" for r in rows)
    classical = [r for r in table if r.kind == "fixed" and r.nfe == n and r.solver in _CLASSICAL_BY_STAGES.values()]
    finite = [r for r in classical if math.isfinite(r.terminal_error)]
    best = min(finite, key=lambda r: r.terminal_error, default=None)
    baseline = "so is every classical solver's"
    if best is not None:
        baseline = f"the best classical solver's is {best.terminal_error:.3g} ({best.solver})"
    t0, t1 = (float(t) for t in run.ends)
    return (
        f"every hypersolver's held-out error at NFE {n} is inf or nan ({errors}); {baseline}: {n} evaluations of f "
        f"across [{t0:g}, {t1:g}] make steps too long for this field; tune larger budgets or a shorter interval"
    )


def _check_choices(budgets: List[int], choices: Dict[int, Choice], pruned: Dict[str, str]) -> None:
    """Refuse a search that found no choice at any budget, and warn of the budgets left without one, with why."""
    missing = [n for n in budgets if n not in choices]
    if not missing:
        return
    why = "; ".join(f"NFE {n}: {pruned.get(f'NFE {n}', 'no hypersolver was fitted for it')}" for n in missing)
    if not choices:
        raise ValueError(f"tune found no hypersolver with a finite held-out error at any budget ({why})")
    warnings.warn(f"tune found no choice for {len(missing)} of the budgets ({why})", UserWarning, stacklevel=3)


def _choice_at(run: _Run, where: Tuple[int, str, int], candidate: _Candidate, ends: _Ends):
    """A choice for ``where`` (NFE, label, steps) from a fitted candidate: the uniform mesh, or a learned
    grid when it lowers the held-out error by the ``GRID_GAIN``; and why no grid was fitted ('' when one
    was). Its wall time is measured later, with the budget's other finalists."""
    nfe, label, steps = where
    hs = copy.deepcopy(candidate.hs)
    uniform = torch.linspace(float(run.ends[0]), float(run.ends[1]), steps + 1).to(ends.z_test)
    uniform_error = _terminal_error(hs, run.f, ends.z_test, ends.ref_test, uniform)
    mesh, error, skipped = uniform, uniform_error, ""
    if run.search.grid and steps > 1:
        collision = grid_collision(steps, run.ends[0], run.ends[1], ends.z0.dtype)
        if run.out_of_time() or collision:
            skipped = collision or run.skipped()
        elif not _budget_iterations(run.search, nfe):  # else the budget fit fits the grid
            with preserved(run.module):
                iterations, seed = run.search.grid_iterations, run.search.seed
                grid = fit_time_grid(hs, run.f, ends.z0, ends.z1, uniform, steps, iterations=iterations, seed=seed)
            grid_error = _terminal_error(hs, run.f, ends.z_test, ends.ref_test, grid)
            if grid_error < GRID_GAIN * uniform_error:
                mesh, error = grid, grid_error
    # the mesh travels with the solver (hs.time_grid, saved and loaded), learned or uniform
    hs.validity = dataclasses.replace(hs.validity, **_dt_range(hs.validity, mesh))
    hs.time_grid = mesh
    learned = mesh is not uniform
    choice = Choice(nfe, label, hs, mesh, steps, error, uniform_error, math.nan, learned, g_size=candidate.size)
    return choice, skipped


def _model_dtype(model, x: Tensor) -> Optional[torch.dtype]:
    """The dtype g should have: the model's floating parameters', else the inputs'."""
    dtype = parameter_dtype(model)
    return dtype if dtype is not None else (x.dtype if x.is_floating_point() else None)


def _dt_range(validity, mesh: Tensor) -> Dict[str, float]:
    """The validity record's step-size range widened to cover ``mesh``'s steps."""
    dts = (mesh[1:] - mesh[:-1]).abs()
    return {"dt_min": min(validity.dt_min, float(dts.min())), "dt_max": max(validity.dt_max, float(dts.max()))}


def _terminal_error(solver, f, z0: Tensor, ref: Tensor, mesh: Tensor) -> float:
    """Mean over the inputs of ``||z(t1) - ref||`` for a solve on ``mesh`` (the table's terminal error)."""
    with torch.no_grad(), outside_fit_ignored():
        final = fixed_solve(solver, f, z0, mesh.to(z0), return_trajectory=False)
    error = float((final - ref).flatten(1).norm(dim=1).mean())
    return error if math.isfinite(error) else math.inf


class _Bar:
    """fit's tqdm bar (or nothing), counting the stages of the search."""

    def __init__(self, progress: bool, total: int):
        self.bar = progress_bar(total, progress, "tune")

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def __getattr__(name: str):
    if name in _DEPRECATED:
        advice, value = _DEPRECATED[name]
        warnings.warn(f"torchdyn_hypersolvers.tuning.{name} is deprecated: {advice}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
