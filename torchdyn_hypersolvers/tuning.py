"""tune: the fastest hypersolver for a model at each budget, with a learned time grid.

``tune`` holds out part of the inputs, harvests the rest once (targets as precise as the
highest-order base needs), fits one g per candidate (base solver x hypernet options), compares
every candidate with the classical solvers and dopri5 on the held-out inputs, keeps the best
hypersolver per budget, and fits a time grid for it when that lowers the held-out error.
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._loop import fixed_solve
from ._mesh import check_t_span
from ._precision import parameter_dtype
from ._progress import progress_bar
from ._reference import reference_solve
from ._time_grid import fit_time_grid, grid_from_logits
from ._user_model import preserved, resolve_model
from .evaluate import ParetoResult, pareto
from .fit import fit, residual_data
from .harvest import harvest
from .hypernets import MLPHyperNet
from .io import save
from .solvers import FixedStepSolver, HyperEuler, HyperMidpoint, HyperRK4, HyperSolver

__all__ = ["Choice", "TuneResult", "tune", "fit_time_grid", "grid_from_logits"]

DEFAULT_BASES = (HyperEuler, HyperMidpoint, HyperRK4)
CLASSICAL = {1: "euler", 2: "midpoint", 4: "rk4"}
PRUNE_FACTOR = 100.0
"""A (base, budget) is not fitted when the base solver's held-out error there is more than this
many times the best classical solver's: g would have to learn the residual to better than 1%."""
MATCH_LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32)
GRID_GAIN = 0.99
"""A learned grid is kept when its held-out error is below this fraction of the uniform grid's."""
OUTSIDE_FIT = ".*outside where its g was fitted.*"


@dataclass
class Choice:
    """The hypersolver kept for one budget.

    ``error``: its held-out mean terminal error (L2 norm per input) on ``mesh``;
    ``uniform_error``: the same on the uniform mesh of ``steps`` steps (equal when no learned
    grid beat it); ``wall_ms``: the median wall time of one solve of the held-out inputs."""

    nfe: int
    label: str
    solver: HyperSolver
    mesh: Tensor
    steps: int
    error: float
    uniform_error: float
    wall_ms: float
    learned_grid: bool


@dataclass
class TuneResult:
    """What :func:`tune` found: a choice per budget and the held-out comparison behind it.

    ``held_out`` are the inputs compared on (``x[held_out_index]``); ``table`` the comparison
    (every candidate, the classical solvers and dopri5); ``pruned`` what was not fitted and why;
    ``candidates`` every fitted hypersolver by label; ``target_error`` the error of ``match``."""

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

    def solver_for(self, nfe: int) -> Tuple[HyperSolver, Tensor]:
        """``(hypersolver, t_span)`` chosen for ``nfe`` evaluations of f."""
        if nfe not in self.choices:
            raise KeyError(f"no choice for nfe={nfe!r}; tuned budgets: {sorted(self.choices)}")
        choice = self.choices[nfe]
        return choice.solver, choice.mesh

    def cheapest(self, error: Optional[float] = None) -> Tuple[HyperSolver, Tensor]:
        """The choice with the fewest NFE whose held-out error is at most ``error`` (default:
        the error of the solver given as ``match``)."""
        goal = self.target_error if error is None else error
        if goal is None:
            raise ValueError("cheapest needs an error (or a tune(..., match=...) result)")
        for nfe in sorted(self.choices):
            if self.choices[nfe].error <= goal:
                return self.solver_for(nfe)
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
            grid = "learned" if c.learned_grid else "uniform"
            lines.append(
                f"| {nfe} | {c.label} ({grid} grid) | {c.steps} | {c.error:.3g} | {c.uniform_error:.3g} | {name} "
                f"| {err:.3g} | {c.wall_ms:.2f} |"
            )
        adaptive = [r for r in self.table if r.kind == "adaptive"]
        if adaptive:
            lines += ["", "| adaptive | tol | NFE | held-out error | wall (ms) |", "|---|---|---|---|---|"]
            lines += [
                f"| {r.solver} | {r.tol:g} | {r.nfe} | {r.terminal_error:.3g} | {r.wall_ms:.2f} |" for r in adaptive
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

    def save(self, folder) -> None:
        """One loadable file per choice (``nfe<N>.pt``: :func:`~.io.load` it; the grid comes back as
        ``hs.time_grid``), the table (``tune.md``) and the numbers (``tune.json``)."""
        os.makedirs(folder, exist_ok=True)
        for nfe, choice in self.choices.items():
            save(choice.solver, os.path.join(folder, f"nfe{nfe}.pt"), report=self.fit_reports.get(choice.label))
        with open(os.path.join(folder, "tune.md"), "w") as fh:
            fh.write(self.to_markdown())
        numbers = {
            str(n): {k: v for k, v in dataclasses.asdict(c).items() if k not in ("solver", "mesh")}
            | {"mesh": c.mesh.tolist()}
            for n, c in self.choices.items()
        }
        with open(os.path.join(folder, "tune.json"), "w") as fh:
            json.dump({"choices": numbers, "pruned": self.pruned, "target_error": self.target_error}, fh, indent=2)


def _default_hypernet(state_shape: Tuple[int, ...]) -> Callable[[type, bool], nn.Module]:
    if len(state_shape) != 1:
        raise ValueError(
            f"tune's default g is an MLP for states (B, D), got states of shape (B, *{tuple(state_shape)}); "
            "pass hypernet=lambda cls, stage_aware: <a fresh g for hypersolver class cls>, e.g. ConvHyperNet(channels)"
        )
    (dim,) = state_shape

    def make(cls: type, stage_aware: bool) -> nn.Module:
        stages = cls.tableau.stages if stage_aware else 1
        return MLPHyperNet(dim, hidden=(64, 64), time=True, stages=stages, scaled=True)

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
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in values):
        raise ValueError(f"nfe must be a non-empty sequence of positive ints, got {nfe!r}")
    return sorted(set(values))


def tune(
    model,
    x: Tensor,
    t_span,
    nfe: Optional[Sequence[int]] = None,
    match: Optional[str] = None,
    bases: Sequence[type] = DEFAULT_BASES,
    hypernet: Optional[Callable[[type, bool], nn.Module]] = None,
    stage_aware: bool = True,
    held_out: float = 0.25,
    iterations: int = 2000,
    grid: bool = True,
    grid_iterations: int = 200,
    labels: Optional[Tensor] = None,
    max_seconds: Optional[float] = None,
    device=None,
    seed: int = 0,
    progress: bool = True,
) -> TuneResult:
    """Find, per budget of f evaluations, the most accurate hypersolver for ``model``.

    Args:
        model: what :func:`~.harvest.harvest` takes: a NeuralODE, a module holding one, or ``f(t, z)``.
        x: the inputs (a tensor); a share ``held_out`` of them (drawn with ``seed``) is kept for
            the comparison and never fitted on (``TuneResult.held_out``).
        t_span: its endpoints give the interval (a decreasing one integrates backwards).
        nfe: the budgets (evaluations of f per solve); default ``(4, 8, 16, 24)``, or with ``match``
            a ladder from 2 to 32.
        match: an adaptive solver and tolerance, ``'dopri5:1e-4'``: its held-out error becomes
            ``TuneResult.target_error`` (what :meth:`TuneResult.cheapest` aims at by default).
        bases: the hypersolver classes to try (each fitted on the step counts its stage count
            divides the budgets into).
        hypernet: ``hypernet(cls, stage_aware) -> g``, a fresh g for a hypersolver class (default: a
            time-aware, standardised :class:`~.hypernets.MLPHyperNet` of two 64-wide layers, for
            states ``(B, D)``; image states need one).
        stage_aware: also try, for bases of two or more stages, a g that reads every stage.
        iterations: residual-fitting iterations per candidate.
        grid, grid_iterations: fit a time grid for each budget's choice (kept only when it lowers
            the held-out error).
        labels: the task labels of the held-out inputs' model head (the table's task decrement).
        max_seconds: stop fitting new candidates and grids after this much wall time (the first
            candidate is always fitted; those skipped are listed in ``TuneResult.pruned``).
        device: where to harvest and fit (default: where the model computes).
        progress: a tqdm bar over the stages of the search.
    """
    start = time.perf_counter()
    if not isinstance(x, Tensor):
        raise TypeError(f"tune needs the inputs as a tensor, got {type(x).__name__}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    if len(x) < 4:
        raise ValueError(f"tune needs at least 4 inputs to hold some out, got {len(x)}")
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"labels must have one entry per input: got {len(labels)} labels for {len(x)} inputs")
    budgets = _check_budgets(nfe if nfe is not None else (MATCH_LADDER if match else (4, 8, 16, 24)))
    target = _parse_match(match) if match is not None else None
    bases = list(bases)
    for cls in bases:
        if not (isinstance(cls, type) and issubclass(cls, HyperSolver) and cls.tableau is not None):
            raise ValueError(f"bases must be hypersolver classes with a base tableau (HyperEuler, ...), got {cls!r}")
    span = check_t_span(t_span)
    ends = torch.stack([span[0], span[-1]])
    f, initial_state, module = resolve_model(model)
    with preserved(module), torch.no_grad():
        state_shape = tuple(initial_state(x[:2]).shape[1:])
    make = hypernet or _default_hypernet(state_shape)  # refuses image states without a hypernet, before any work
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_test = max(1, int(round(held_out * len(x))))
    x_test, x_fit = x[order[:n_test]], x[order[n_test:]]
    if labels is not None:
        labels = labels[order[:n_test]]
    pruned: Dict[str, str] = {}

    def over_time() -> bool:
        return max_seconds is not None and time.perf_counter() - start > max_seconds

    bar = _Bar(progress, 3 + 2 * len(bases) + (len(budgets) if grid else 0))
    # 1. The classical solvers on the held-out inputs: which (base, budget) pairs can win.
    base_of = {cls: f"base of {cls.__name__}" for cls in bases}
    classical_steps = sorted(
        {n // s for n in budgets for s in (*CLASSICAL, *(c.tableau.stages for c in bases)) if n % s == 0}
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=OUTSIDE_FIT)
        solvers = {name: name for name in CLASSICAL.values()} | {base_of[c]: FixedStepSolver(c.tableau) for c in bases}
        baseline = pareto(model, x_test, ends, solvers=solvers, steps=classical_steps, timing=False)
    bar.update()
    plan: Dict[type, List[int]] = {}
    for n in budgets:
        best = min(
            (r.terminal_error for r in baseline if r.nfe == n and r.solver in CLASSICAL.values()), default=math.inf
        )
        errors = {}
        for cls in bases:
            if n % cls.tableau.stages == 0:
                rows = [r for r in baseline if r.solver == base_of[cls] and r.nfe == n]
                errors[cls] = rows[0].terminal_error if rows else math.inf
        if not errors:
            pruned[f"NFE {n}"] = "no base's stage count divides it"
            continue
        closest = min(errors, key=errors.get)
        for cls, error in errors.items():
            ratio = error / best if best > 0 else math.inf
            if ratio > PRUNE_FACTOR and cls is not closest:  # the closest base is kept: every budget gets a choice
                pruned[f"{cls.__name__} at NFE {n}"] = (
                    f"its base solver's held-out error is {ratio:.3g}x the best classical solver's: g would have "
                    f"to learn the residual to better than 1/{ratio:.3g}"
                )
                continue
            plan.setdefault(cls, []).append(n // cls.tableau.stages)
    plan = {cls: plan[cls] for cls in bases if cls in plan}  # the order of bases
    if not plan:
        raise ValueError(f"no candidate can be fitted for budgets {budgets}: {pruned}")
    # 2. One harvest, as precise as the highest-order base needs.
    steps_union = sorted({n for steps in plan.values() for n in steps})
    top = max(plan, key=lambda c: c.tableau.order)
    trajectories = harvest(model, x_fit, ends, steps=steps_union, base=top.tableau, device=device)
    bar.update()
    # 3. Fit the candidates.
    candidates: Dict[str, Tuple[HyperSolver, List[int]]] = {}
    reports = {}
    model_dtype = _model_dtype(model, x)
    for cls, steps in plan.items():
        options = [False] + ([True] if stage_aware and cls.tableau.stages > 1 else [])
        for aware in options:
            label = cls.__name__ + (" (stage-aware g)" if aware else "")
            if candidates and over_time():  # the first candidate is always fitted
                pruned[label] = f"not fitted: the {max_seconds:g} s budget was spent"
                continue
            with torch.random.fork_rng(devices=[]):  # g's initialisation is seeded; the caller's RNG is untouched
                torch.manual_seed(seed)
                g = make(cls, aware)
            hs = cls(g)
            meshes = trajectories.replace(meshes={n: trajectories.meshes[n] for n in steps})
            if model_dtype is not None:
                hs = hs.to(model_dtype)
            if hasattr(g, "standardize_") and getattr(g, "config", {}).get("scaled", False):
                g.standardize_(residual_data(hs, meshes))
            reports[label] = fit(hs, meshes, iterations=iterations, progress=False, seed=seed, device=device)
            hs.eval()
            candidates[label] = (hs, steps)
            bar.update()
    # 4. Everyone on the held-out inputs.
    all_steps = sorted(
        {n // s for n in budgets for s in CLASSICAL if n % s == 0}
        | {n for _, steps in candidates.values() for n in steps}
    )
    adaptive = ["dopri5"] if target is None else [target[0]]
    tolerances = (1e-3, 1e-4) if target is None else tuple(sorted({1e-3, 1e-4, target[1]}, reverse=True))
    solvers = {label: hs for label, (hs, _) in candidates.items()} | {n: n for n in CLASSICAL.values()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=OUTSIDE_FIT)
        table = pareto(
            model,
            x_test,
            ends,
            solvers=solvers | {a: a for a in adaptive},
            steps=all_steps,
            tolerances=tolerances,
            labels=labels,
            repeats=3,
        )
    table.rows = [r for r in table.rows if r.kind != "hyper" or r.steps in candidates[r.solver][1]]
    bar.update()
    target_error = None
    if target is not None:
        target_error = table.row(target[0], tol=target[1]).terminal_error
    # 5. Per budget, the best candidate; then its time grid.
    with preserved(module), torch.no_grad():
        z_test = initial_state(x_test.to(trajectories.states.device))
        ref_test = reference_solve(f, z_test, ends, table.reference, table.reference_tol, table.reference_tol)[-1]
    choices: Dict[int, Choice] = {}
    for n in budgets:
        rows = [r for r in table if r.kind == "hyper" and r.nfe == n and math.isfinite(r.terminal_error)]
        if not rows:
            continue
        best = min(rows, key=lambda r: r.terminal_error)
        hs = copy.deepcopy(candidates[best.solver][0])
        uniform = torch.linspace(float(ends[0]), float(ends[1]), best.steps + 1).to(z_test)
        uniform_error = _terminal_error(hs, f, z_test, ref_test, uniform)
        mesh, error, learned = uniform, uniform_error, False
        if grid and best.steps > 1:
            if over_time():
                pruned[f"time grid at NFE {n}"] = f"not fitted: the {max_seconds:g} s budget was spent"
            else:
                z0 = trajectories.states[0].to(z_test)
                z1 = trajectories.states[-1].to(z_test)
                with preserved(module):
                    candidate = fit_time_grid(hs, f, z0, z1, uniform, best.steps, iterations=grid_iterations, seed=seed)
                grid_error = _terminal_error(hs, f, z_test, ref_test, candidate)
                if grid_error < GRID_GAIN * uniform_error:
                    mesh, error, learned = candidate, grid_error, True
            bar.update()
        # the mesh travels with the solver (hs.time_grid, saved and loaded), learned or uniform
        hs.validity = dataclasses.replace(hs.validity, **_dt_range(hs.validity, mesh))
        hs.time_grid = mesh
        choices[n] = Choice(n, best.solver, hs, mesh, best.steps, error, uniform_error, best.wall_ms, learned)
    bar.close()
    return TuneResult(
        choices,
        table,
        pruned,
        x_test,
        order[:n_test],
        target_error,
        match,
        time.perf_counter() - start,
        {label: hs for label, (hs, _) in candidates.items()},
        reports,
    )


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
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=OUTSIDE_FIT)
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
