"""tune() against dopri5: the fastest tuned hypersolver at dopri5's accuracy, on five workloads.

For each workload, ``tune`` searches HyperEuler, HyperMidpoint and HyperRK4 (a stage-aware g
for the two multi-stage bases) over a ladder of budgets and fits a time grid per budget; then, on the inputs
``tune`` held out, for tolerances 1e-3 and 1e-4: dopri5's accuracy (test accuracy for the
digits classifier, mean terminal error otherwise: the sample error for the CNF), the tuned
choice with the fewest evaluations of f that is at least as accurate, and the wall time of
both, measured interleaved (medians): the choice against torchdyn's and torchdiffeq's dopri5.
Digits searches HyperEuler, HyperMidpoint and HyperRK4 (plain g) with the tutorial's
convolutional g over budgets 2 to 8 (its tune stays under 10 minutes).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Dict, Optional

import torch
import torchdiffeq
from torchdyn.numerics import odeint as torchdyn_odeint

from torchdyn_hypersolvers import ConvHyperNet, HyperEuler, HyperMidpoint, HyperRK4, tune
from torchdyn_hypersolvers._user_model import resolve_model
from torchdyn_hypersolvers.harvest import reference_solve
from torchdyn_hypersolvers.validity import OutsideFitWarning

from . import workloads
from .common import compare

LADDER = (2, 3, 4, 6, 8, 12, 16, 24, 32)
TOLERANCES = (1e-3, 1e-4)
THREADS = 1
WORKERS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
"""tune's forked workers (``tune(..., workers=)``), one torch thread each: the cores this machine gives."""


class _Counter(torch.nn.Module):
    """Counts evaluations of a vector field."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls = f, 0

    def forward(self, t, z):
        self.calls += 1
        return self.f(t, z)


def _digits_hypernet(cls, stage_aware: bool):
    return ConvHyperNet(16, hidden=16, stages=cls.tableau.stages if stage_aware else 1)


def _workloads(quick: bool):
    m, d, c = workloads.moons_model(quick), workloads.digits_model(quick), workloads.cnf_model(quick)
    v, lz = workloads.vanderpol(quick), workloads.lorenz(quick)
    n = workloads.TUNE_INPUTS[quick]
    cnf_x = workloads.cnf_density.sample_base(n, torch.Generator().manual_seed(1))
    it = 20 if quick else 2000
    # thousands of inputs (the fit learns the model's states, not a few trajectories), 256 of them held out
    workers = 1 if quick else WORKERS
    common = dict(iterations=it, grid_iterations=5 if quick else 200, held_out=16 if quick else 256, workers=workers)
    return [
        ("2-D moons", m["model"], m["x_tune"], torch.linspace(0, 1, 2), None, common),
        (
            "digits",
            d["model"],
            d["x_train"][: 64 if quick else 512],
            torch.linspace(0, 1, 2),
            d["y_train"][: 64 if quick else 512],
            dict(
                hypernet=_digits_hypernet,
                bases=(HyperEuler, HyperMidpoint, HyperRK4),
                stage_aware=False,
                nfe=(2, 3, 4, 6, 8),
                iterations=10 if quick else 300,
                grid_iterations=5 if quick else 50,
                workers=workers,
            ),
        ),
        ("CNF pinwheel (sampling)", c["vf"], cnf_x, c["t_span"], None, common),
        (f"van der Pol (mu={workloads.VDP_MU:g})", v["vf"], v["x_tune"], v["t_span"], None, common),
        (f"Lorenz (T={workloads.LORENZ_T:g})", lz["vf"], lz["x_tune"], lz["t_span"], None, common),
    ]


def _one(name, model, x, t_span, labels, options, quick: bool) -> Dict[str, object]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=OutsideFitWarning)
        options = {"nfe": LADDER[:4] if quick else LADDER, **options}
        result = tune(model, x, t_span, progress=False, **options)
    tune_s = time.perf_counter() - start
    f, initial_state, _ = resolve_model(model)
    ends = torch.stack([torch.as_tensor(t_span)[0], torch.as_tensor(t_span)[-1]])
    with torch.no_grad():
        z0 = initial_state(result.held_out)
        ends = ends.to(z0)
        tol = result.table.reference_tol
        reference = reference_solve(f, z0, ends, result.table.reference, tol, tol)[-1]
        head = _head(model)
        y = None if labels is None else labels[result.held_out_index]

        def quality(final):
            """(error, accuracy): lower error / higher accuracy is better."""
            error = float((final - reference).flatten(1).norm(dim=1).mean())
            if head is None or y is None:
                return error, None
            accuracy = float((head(torch.stack([z0, final])).argmax(1) == y).float().mean())
            return error, accuracy

        choices = {}
        for nfe, choice in sorted(result.choices.items()):
            final = choice.solver.solve(f, z0, choice.mesh, return_trajectory=False)
            choices[nfe] = (choice, *quality(final))
        options = []  # every finalist (each g size per budget), fastest first: tune's measured wall time
        for option in sorted(result.options, key=lambda c: (c.wall_ms, c.nfe)):
            final = option.solver.solve(f, z0, option.mesh, return_trajectory=False)
            options.append((option, *quality(final)))
        rows = []
        for tol in TOLERANCES:
            counter = _Counter(f)
            dyn_final = torchdyn_odeint(counter, z0, ends, solver="dopri5", atol=tol, rtol=tol)[1][-1]
            nfe_dopri5 = counter.calls
            target_error, target_accuracy = quality(dyn_final)
            pick = None  # the fastest finalist (tune's measured wall time) at least as accurate
            for option, error, accuracy in options:
                good = accuracy >= target_accuracy if target_accuracy is not None else error <= target_error
                if good:
                    pick = (option, error, accuracy)
                    break
            row = {
                "tol": tol,
                "dopri5_nfe": nfe_dopri5,
                "dopri5_error": target_error,
                "dopri5_accuracy": target_accuracy,
                "nfe": None if pick is None else pick[0].nfe,
            }
            if pick is not None:
                choice, error, accuracy = pick
                candidates = {
                    "tuned": lambda c=choice: c.solver.solve(f, z0, c.mesh, return_trajectory=False),
                    "torchdyn": lambda t=tol: torchdyn_odeint(f, z0, ends, solver="dopri5", atol=t, rtol=t),
                    "torchdiffeq": lambda t=tol: torchdiffeq.odeint(f, z0, ends, method="dopri5", atol=t, rtol=t),
                }
                compiled = _compiled(choice, f, z0, "eager" if quick else True)
                if compiled is not None:
                    candidates["compiled"] = compiled
                times = compare(candidates, repeats=3 if quick else 15)
                row.update(
                    choice=_labelled(choice),
                    grid="learned" if choice.learned_grid else "uniform",
                    error=error,
                    accuracy=accuracy,
                    tuned_ms=1e3 * times["tuned"],
                    torchdyn_ms=1e3 * times["torchdyn"],
                    torchdiffeq_ms=1e3 * times["torchdiffeq"],
                    speedup_vs_torchdyn=times["torchdyn"] / times["tuned"],
                    speedup_vs_torchdiffeq=times["torchdiffeq"] / times["tuned"],
                )
                if compiled is not None:  # the same solver through solve(..., compile=True)
                    row.update(
                        compiled_ms=1e3 * times["compiled"],
                        compiled_vs_torchdyn=times["torchdyn"] / times["compiled"],
                        compiled_vs_torchdiffeq=times["torchdiffeq"] / times["compiled"],
                    )
            rows.append(row)
    grid_ratio = {
        nfe: c.error / c.uniform_error if c.uniform_error > 0 else None for nfe, c in sorted(result.choices.items())
    }
    best_classical = {}
    for nfe in result.choices:
        fixed = [r for r in result.table if r.kind == "fixed" and r.nfe == nfe and math.isfinite(r.terminal_error)]
        best_classical[nfe] = min((r.terminal_error for r in fixed), default=None)
    front = _front(result)
    return {
        "workload": name,
        "vs_classical": {
            nfe: c.error / best_classical[nfe] if best_classical.get(nfe) else None
            for nfe, c in sorted(result.choices.items())
        },
        "front": front,
        "options": [
            {"nfe": o.nfe, "label": o.label, "wall_ms": o.wall_ms, "error": e, "accuracy": a} for o, e, a in options
        ],
        "tune_s": tune_s,
        "held_out": len(result.held_out),
        "choices": {n: f"{c.label} ({'learned' if c.learned_grid else 'uniform'})" for n, c in result.choices.items()},
        "choice_errors": {nfe: c.error for nfe, c in result.choices.items()},
        "quality_by_nfe": {nfe: {"error": e, "accuracy": a} for nfe, (_, e, a) in choices.items()},
        "grid_ratio": grid_ratio,
        "pruned": len(result.pruned),
        "rows": rows,
    }


def _size(size) -> str:
    return f"{size[0]}x{len(size)}" if len(set(size)) == 1 else "-".join(map(str, size))


def _labelled(choice) -> str:
    """A finalist's label with its g's size (a wider g's label has it already) and how it was fitted."""
    label = choice.label
    if choice.g_size is not None and "[g " not in label:
        label += f" [g {_size(choice.g_size)}]"
    return label + (", fitted for the budget" if choice.fitted_for_budget else "")


def _front(result) -> list:
    """The held-out error-vs-wall-time front over every timed candidate: tune's finalists (each g size
    per budget), the classical solvers and dopri5 (their wall times from tune's comparison)."""
    points = [(c.wall_ms, c.error, _labelled(c), c.nfe) for c in result.options]
    points += [(r.wall_ms, r.terminal_error, r.solver + (f" {r.tol:g}" if r.kind == "adaptive" else ""), r.nfe)
               for r in result.table if r.kind in ("fixed", "adaptive") and math.isfinite(r.terminal_error)]
    front, best = [], math.inf
    for wall, error, label, nfe in sorted(points):
        if error < best:
            front.append({"wall_ms": wall, "error": error, "solver": label, "nfe": nfe})
            best = error
    return front


def _head(model) -> Optional[torch.nn.Module]:
    """The layers after the NeuralODE of an nn.Sequential classifier (the digits model), else None."""
    if isinstance(model, torch.nn.Sequential):
        names = [type(m).__name__ for m in model]
        if "NeuralODE" in names:
            return model[names.index("NeuralODE") + 1 :]
    return None


def run(quick: bool = False):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        workloads = [_one(*w, quick=quick) for w in _workloads(quick)]
        return {"threads": THREADS, "workers": 1 if quick else WORKERS, "workloads": workloads}
    finally:
        torch.set_num_threads(threads)


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _compiled(choice, f, z0, backend):
    """The choice's solve through ``solve(..., compile=backend)``, compiled here (None, with why, when
    torch.compile fails on this machine)."""
    def solve():
        return choice.solver.solve(f, z0, choice.mesh, return_trajectory=False, compile=backend)

    try:
        solve()
    except Exception as err:  # noqa: BLE001 - a compiler missing or failing here: the column says "-"
        print(f"compile=True failed for {choice.label} ({type(err).__name__}: {err}); timed eager only")
        return None
    return solve


def markdown(result) -> str:
    lines = [
        "### tune() against dopri5 at equal accuracy (held-out inputs)",
        "",
        f"{result['threads']} torch thread(s); tune in {result.get('workers', 1)} forked worker(s) "
        f"(`tune(..., workers={result.get('workers', 1)})`), one thread each. "
        "Accuracy: test accuracy of the classifier's head for digits, "
        "mean terminal error otherwise. Speed-up: dopri5's median wall time / the tuned choice's; "
        "compiled: the same choice solved with `solve(..., compile=True)` (dopri5 as it is).",
        "",
        "| workload | tol | dopri5 NFE | dopri5 accuracy | tuned choice | NFE | its accuracy | tuned (ms) "
        "| vs torchdyn dopri5 | vs torchdiffeq dopri5 | compiled (ms) | compiled vs torchdyn / torchdiffeq "
        "| tune (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in result["workloads"]:
        for r in w["rows"]:
            quality = _fmt(r["dopri5_accuracy"], ".1%") if r["dopri5_accuracy"] is not None else _fmt(r["dopri5_error"])
            if r["nfe"] is None:
                lines.append(
                    f"| {w['workload']} | {r['tol']:g} | {r['dopri5_nfe']} | {quality} | none as accurate | - | - | - "
                    f"| - | - | - | - | {w['tune_s']:.0f} |"
                )
                continue
            mine = _fmt(r["accuracy"], ".1%") if r["accuracy"] is not None else _fmt(r["error"])
            lines.append(
                f"| {w['workload']} | {r['tol']:g} | {r['dopri5_nfe']} | {quality} | {r['choice']} ({r['grid']} grid) "
                f"| {r['nfe']} | {mine} | {r['tuned_ms']:.2f} | {r['speedup_vs_torchdyn']:.1f}x "
                f"| {r['speedup_vs_torchdiffeq']:.1f}x | {_compiled_cells(r)} | {w['tune_s']:.0f} |"
            )
    lines += _by_nfe(
        result,
        "grid_ratio",
        "Learned grid (fitted alone or with g for the budget) / uniform grid held-out error of each budget's "
        "choice (1.00: the uniform grid was kept):",
    )
    lines += _by_nfe(
        result,
        "vs_classical",
        "Each budget's choice against the best classical solver (Euler, Midpoint, RK4) at the same NFE "
        "(held-out error ratio; lower is better):",
    )
    lines += ["", "Held-out error against measured wall time: the front over every timed candidate "
              "(tune's finalists, the classical solvers, dopri5; no candidate is both faster and more accurate):", ""]
    for w in result["workloads"]:
        points = ", ".join(f"{p['solver']} NFE {p['nfe']}: {_fmt(p['error'])} in {p['wall_ms']:.2f} ms"
                           for p in w["front"])
        lines.append(f"- {w['workload']}: {points}")
    return "\n".join(lines) + "\n"


def _compiled_cells(row) -> str:
    if "compiled_ms" not in row:
        return "- | -"
    return f"{row['compiled_ms']:.2f} | {row['compiled_vs_torchdyn']:.1f}x / {row['compiled_vs_torchdiffeq']:.1f}x"


def _by_nfe(result, key: str, title: str) -> list:
    """A table of one ratio per workload and budget."""
    head = "| workload | " + " | ".join(f"NFE {n}" for n in LADDER) + " |"
    lines = ["", title, "", head, "|---|" + "---|" * len(LADDER)]
    for w in result["workloads"]:
        ratios = {int(k): v for k, v in w[key].items()}
        lines.append(f"| {w['workload']} | " + " | ".join(_fmt(ratios.get(n), ".2f") for n in LADDER) + " |")
    return lines
