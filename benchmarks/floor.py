"""Issue 13's P1 and P4 (g's accuracy floor) on five workloads, side by side in one run.

For each workload (2-D moons classifier, digits classifier, CNF pinwheel sampled backwards,
a van der Pol Neural ODE with mu = 3, the Lorenz field on [0, 0.5]) and each base solver
(Euler, Midpoint or Heun, RK4):

* harvest dopri5 reference trajectories on the meshes that cover NFE 4, 8, 12, 16, 24, 32
  (Euler n steps, Midpoint / Heun n/2, RK4 n/4), at tolerances that follow the base order
  (tight for second and fourth order; float64 where the model is float64, the tightest
  float32 allows for the trained float32 models), and fit one hypersolver per base on all
  of its meshes;
* P1: ``pareto`` on held-out inputs, all hypersolvers and Euler / Midpoint / Heun / RK4 in one
  sweep: per NFE, the best hypersolver's terminal error over the best classical solver's
  (goal <= 0.5), and the same at equal wall-clock (g's cost included): with the budget set
  to the wall time of the best classical run at that NFE, the best hypersolver run that fits
  in the budget over the best classical run that fits (a hypersolver is on the error-vs-wall
  front at that budget when the ratio is <= 1);
* P4: mean |g - R| / mean |R| per fitted mesh (goal <= 0.05), the reference's noise in the
  targets as ``fit`` estimates it (goal <= 1% of |R|), and HyperRK4 / RK4 terminal error at
  equal steps (goal: never above 1).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from torchdyn_hypersolvers import HyperEuler, HyperHeun, HyperMidpoint, HyperRK4, MLPHyperNet, fit, harvest, pareto
from torchdyn_hypersolvers.fit import residual_data

from . import workloads

NFE = [4, 8, 12, 16, 24, 32]
CLASSICAL_STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
STAGES = {HyperEuler: 1, HyperMidpoint: 2, HyperHeun: 2, HyperRK4: 4}
# dopri5 tolerance of the harvest, by the base's stage count (= order here) and the model's dtype
REFERENCE_TOL = {torch.float64: 1e-10, torch.float32: 1e-7}  # pareto's reference solve
THREADS = 1
P1_GOAL, P4_GOAL, NOISE_GOAL = 0.5, 0.05, 0.01


def meshes(stages: int) -> List[int]:
    """The step counts that cover the NFE grid for a base with ``stages`` evaluations per step."""
    return [n // stages for n in NFE if n % stages == 0]


@dataclass
class Workload:
    name: str
    model: object  # what harvest and pareto take: a module holding a NeuralODE, or a vector field
    x_fit: torch.Tensor
    x_test: torch.Tensor
    t_span: torch.Tensor
    dtype: torch.dtype
    second: type  # the second-order hypersolver: HyperMidpoint or HyperHeun
    hypernet: Optional[Callable[[], nn.Module]]  # a fresh g; None: a standardised MLPHyperNet
    state_dim: int
    iterations: int
    batch_size: int
    noise_sample: int = 8
    time: bool = False  # the standardised MLP g also reads t (for a non-autonomous field)
    stage_aware: bool = False  # the standardised MLP g also reads every stage of the base step and z0
    refine: int = 0  # iterations of trajectory refinement after residual fitting (fit's refine=)


def _workloads(quick: bool) -> List[Workload]:
    m, d, c = workloads.moons_model(quick), workloads.digits_model(quick), workloads.cnf_model(quick)
    v, lz = workloads.vanderpol(quick), workloads.lorenz(quick)
    iterations = 30 if quick else 2000
    n_fit, n_test = (16, 32) if quick else (1024, 512)
    cnf_fit = workloads.cnf_density.sample_base(n_fit, torch.Generator().manual_seed(1))
    cnf_test = workloads.cnf_density.sample_base(n_test, torch.Generator().manual_seed(7))
    mlp = dict(hypernet=None, iterations=iterations, batch_size=64)
    return [
        Workload(
            "2-D moons",
            m["model"],
            m["x_train"][:n_fit],
            m["x"][:n_test],
            torch.linspace(0, 1, 2),
            torch.float32,
            HyperMidpoint,
            state_dim=2,
            **mlp,
        ),
        Workload(
            "digits",
            d["model"],
            d["x_train"][: 8 if quick else 256],
            d["x"][: 16 if quick else 128],
            torch.linspace(0, 1, 2),
            torch.float32,
            HyperMidpoint,
            workloads.digits_hypernet,
            state_dim=16,
            iterations=30 if quick else 600,
            batch_size=16,
            noise_sample=2 if quick else 4,
        ),
        Workload(
            "CNF pinwheel (sampling)",
            c["vf"],
            cnf_fit,
            cnf_test,
            c["t_span"],
            torch.float32,
            HyperHeun,
            state_dim=2,
            time=True,  # the CNF's field depends on t
            stage_aware=True,
            hypernet=None,
            iterations=30 if quick else 4000,  # twice the others': its residuals are the hardest to learn
            batch_size=64,
        ),
        Workload(
            f"van der Pol (mu={workloads.VDP_MU:g}, T={workloads.VDP_T:g})",
            v["vf"],
            v["x_fit"][:n_fit],
            v["x"][:n_test],
            v["t_span"],
            torch.float64,
            HyperMidpoint,
            state_dim=2,
            **mlp,
        ),
        Workload(
            f"Lorenz (T={workloads.LORENZ_T:g})",
            lz["vf"],
            lz["x_fit"][:n_fit],
            lz["x"][:n_test],
            lz["t_span"],
            torch.float64,
            HyperMidpoint,
            state_dim=3,
            **mlp,
        ),
    ]


def _finite(x) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b; None where either is missing (diverged) or b is 0."""
    return a / b if a is not None and b else None


def _fit_base(w: Workload, cls: type, quick: bool):
    """Harvest for ``cls``'s meshes at its tolerance, fit, and report cost and floor per mesh."""
    stages = STAGES[cls]
    steps = meshes(stages)
    start = time.perf_counter()
    trajectories = harvest(w.model, w.x_fit, w.t_span, steps=steps, base=cls.tableau)  # precise targets
    harvest_s = time.perf_counter() - start
    tol = trajectories.atol
    if w.hypernet is None:  # an MLP g on standardised inputs and outputs
        reads = STAGES[cls] if w.stage_aware else 1
        g = MLPHyperNet(w.state_dim, hidden=(64, 64), time=w.time, stages=reads, scaled=True).to(w.dtype)
        g.standardize_(residual_data(cls(g), trajectories))
    else:
        g = w.hypernet()
    torch.manual_seed(0)
    hs = cls(g).to(w.dtype)
    report = fit(
        hs,
        trajectories,
        iterations=w.iterations,
        batch_size=min(w.batch_size, len(trajectories)),
        progress=False,
        seed=0,
        noise_sample=w.noise_sample,
        refine=w.refine,
        balance_meshes=False if w.hypernet is None else None,  # the scaled MLP already scales g's output
    )
    hs.eval()
    floor = []
    for n in steps:
        g_err, r_mean = report.residual_error[n], report.base_residual_error[n]
        noise = report.target_noise.get(n)
        floor.append(
            {
                "steps": n,
                "nfe": n * stages,
                "g_error": g_err,
                "residual_mean": r_mean,
                "floor": _ratio(g_err, r_mean),
                "target_noise": _finite(noise),
            }
        )
    record = {
        "hypersolver": cls.__name__,
        "stages": stages,
        "meshes": steps,
        "tolerance": tol,
        "dtype": str(trajectories.states.dtype).replace("torch.", ""),
        "trajectories": len(trajectories),
        "iterations": report.iterations,
        "harvest_s": harvest_s,
        "fit_s": report.wall_time,
        "floor": floor,
        "floor_goal_met": all(r["floor"] is not None and r["floor"] <= P4_GOAL for r in floor),
        "noise_goal_met": all(r["target_noise"] is not None and r["target_noise"] <= NOISE_GOAL for r in floor),
    }
    return hs, record


def _best(candidates):
    """(label, error, wall) of the smallest error; errors of None (diverged) lose; None if empty."""
    finite = [c for c in candidates if c[1] is not None]
    return min(finite, key=lambda c: c[1]) if finite else None


def _evaluate(w: Workload, hypersolvers: Dict[str, nn.Module], quick: bool):
    stages = {label: STAGES[type(hs)] for label, hs in hypersolvers.items()}
    all_stages = {**stages, **CLASSICAL_STAGES}
    steps = sorted({n // s for n in NFE for s in all_stages.values() if n % s == 0})
    result = pareto(
        w.model,
        w.x_test,
        w.t_span,
        solvers={**hypersolvers, **{s: s for s in CLASSICAL_STAGES}},
        steps=steps,
        reference_tol=REFERENCE_TOL[w.dtype],
        repeats=1 if quick else 5,
    )

    def runs(labels, nfe=None):
        """(label, terminal error, wall ms, nfe) of ``labels``'s runs on the NFE grid (at ``nfe`` only if given)."""
        out = []
        for label in labels:
            for n in NFE if nfe is None else [nfe]:
                if n % all_stages[label] == 0:
                    row = result.row(label, steps=n // all_stages[label])
                    out.append((label, _finite(row.terminal_error), row.wall_ms, n))
        return out

    p1, wall = [], []
    for n in NFE:
        hyper, classical = _best(runs(stages, n)), _best(runs(CLASSICAL_STAGES, n))
        p1.append(
            {
                "nfe": n,
                "hypersolver": hyper and hyper[0],
                "hyper_error": hyper and hyper[1],
                "classical": classical and classical[0],
                "classical_error": classical and classical[1],
                "ratio": _ratio(hyper and hyper[1], classical and classical[1]),
            }
        )
        budget = classical[2] if classical else None
        fits = [] if budget is None else [r for r in runs(all_stages) if r[2] <= budget]
        h_in = _best([r for r in fits if r[0] in stages])
        c_in = _best([r for r in fits if r[0] in CLASSICAL_STAGES])
        wall.append(
            {
                "nfe": n,
                "budget_ms": budget,
                "hyper_runs_within": sum(r[0] in stages for r in fits),
                "hypersolver": h_in and f"{h_in[0]}@{h_in[3]}",
                "hyper_error": h_in and h_in[1],
                "hyper_ms": h_in and h_in[2],
                "classical": c_in and f"{c_in[0]}@{c_in[3]}",
                "classical_error": c_in and c_in[1],
                "classical_ms": c_in and c_in[2],
                "ratio": _ratio(h_in and h_in[1], c_in and c_in[1]),
            }
        )
    rk4 = []
    rk4_label = next((label for label, s in stages.items() if s == 4), None)
    if rk4_label is not None:
        for n in meshes(4):
            h, c = result.row(rk4_label, steps=n).terminal_error, result.row("rk4", steps=n).terminal_error
            rk4.append(
                {
                    "steps": n,
                    "nfe": 4 * n,
                    "hyper_error": _finite(h),
                    "rk4_error": _finite(c),
                    "ratio": _ratio(_finite(h), _finite(c)),
                }
            )
    return {
        "p1": p1,
        "p1_goal_met": all(r["ratio"] is not None and r["ratio"] <= P1_GOAL for r in p1),
        "wall": wall,
        "wall_front_met": all(r["ratio"] is not None and r["ratio"] <= 1 for r in wall),
        "hyperrk4_vs_rk4": rk4,
        "hyperrk4_never_worse": all(r["ratio"] is not None and r["ratio"] <= 1 for r in rk4),
    }


def run(quick: bool = False):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # small models on a shared CPU: one thread is faster and steadier
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool):
    out = []
    for w in _workloads(quick):
        start = time.perf_counter()
        hypersolvers, fits = {}, []
        for cls in (HyperEuler, w.second, HyperRK4):
            hs, record = _fit_base(w, cls, quick)
            hypersolvers[cls.__name__] = hs
            fits.append(record)
        fit_total = time.perf_counter() - start
        evaluation = _evaluate(w, hypersolvers, quick)
        out.append(
            {
                "workload": w.name,
                "dtype": str(w.dtype).replace("torch.", ""),
                "fit_trajectories": len(w.x_fit),
                "test_inputs": len(w.x_test),
                "reference_tol": REFERENCE_TOL[w.dtype],
                "fits": fits,
                "harvest_and_fit_s": fit_total,
                **evaluation,
                "floor_goal_met": all(f["floor_goal_met"] for f in fits),
                "noise_goal_met": all(f["noise_goal_met"] for f in fits),
            }
        )
    return {
        "nfe": NFE,
        "torch_threads": THREADS,
        "goals": {"p1": P1_GOAL, "p4": P4_GOAL, "noise": NOISE_GOAL},
        "workloads": out,
    }


def _num(x, fmt=".2f") -> str:
    return "diverged" if x is None else format(x, fmt)


def _short(label: Optional[str]) -> str:
    return "-" if label is None else label.replace("Hyper", "H")


def _wall_cell(r) -> str:
    if r["budget_ms"] is None:
        return "no classical run"
    budget = f"{r['budget_ms']:.2f} ms"
    if r["hyper_runs_within"] == 0:
        return f"none within {budget} (vs {r['classical']})"
    return f"{_num(r['ratio'])} ({_short(r['hypersolver'])} vs {r['classical']}, {budget})"


def markdown(result) -> str:
    nfe = result["nfe"]
    head = "| workload | " + " | ".join(f"NFE {n}" for n in nfe)
    rule = "|---|" + "---|" * len(nfe)
    lines = [
        "### F1 accuracy floor, P1: terminal error at NFE n, best hypersolver / best classical (goal <= 0.5)",
        "",
        "Held-out inputs; each cell: ratio (winning hypersolver vs best of Euler/Midpoint/Heun/RK4); "
        "H = Hyper. Errors are the mean terminal L2 error against dopri5 (atol = rtol = 1e-10 in float64, "
        f"1e-7 in float32). This suite runs with {result['torch_threads']} torch thread(s).",
        "",
        head + " | goal met |",
        rule + "---|",
    ]
    for w in result["workloads"]:
        cells = [f"{_num(r['ratio'])} ({_short(r['hypersolver'])} vs {r['classical'] or '-'})" for r in w["p1"]]
        lines.append(f"| {w['workload']} | " + " | ".join(cells) + f" | {w['p1_goal_met']} |")
    lines += ["", "Terminal errors behind the ratios (best hypersolver / best classical):", "", head + " |", rule]
    for w in result["workloads"]:
        cells = [f"{_num(r['hyper_error'], '.3g')} / {_num(r['classical_error'], '.3g')}" for r in w["p1"]]
        lines.append(f"| {w['workload']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### F2 the same at equal wall-clock (g's cost included)",
        "",
        "Budget: the wall time of the best classical run at NFE n; each cell: best hypersolver run within the "
        "budget / best classical run within it (`solver@NFE`); <= 1: a hypersolver is on the error-vs-wall "
        "front at that budget.",
        "",
        head + " | on the front at every budget |",
        rule + "---|",
    ]
    for w in result["workloads"]:
        cells = [_wall_cell(r) for r in w["wall"]]
        lines.append(f"| {w['workload']} | " + " | ".join(cells) + f" | {w['wall_front_met']} |")
    lines += [
        "",
        "### F3 P4: mean |g - R| / mean |R| per fitted mesh (goal <= 0.05), and target noise (goal <= 1%)",
        "",
        "Columns are the NFE a mesh serves (steps = NFE / stages); each cell: |g - R| / |R| (target noise as a "
        "fraction of |R|).",
        "",
        "| workload | hypersolver | harvest tol | "
        + " | ".join(f"NFE {n}" for n in nfe)
        + " | floor met | noise met |",
        "|---|---|---|" + "---|" * (len(nfe) + 2),
    ]
    for w in result["workloads"]:
        for f in w["fits"]:
            by_nfe = {r["nfe"]: r for r in f["floor"]}
            cells = [
                f"{_num(by_nfe[n]['floor'], '.3f')} ({_num(by_nfe[n]['target_noise'], '.1%')})" if n in by_nfe else ""
                for n in nfe
            ]
            lines.append(
                f"| {w['workload']} | {f['hypersolver']} | {f['tolerance']:g} {f['dtype']} | "
                + " | ".join(cells)
                + f" | {f['floor_goal_met']} | {f['noise_goal_met']} |"
            )
    rk4_nfe = [4 * n for n in meshes(4)]
    lines += [
        "",
        "### F4 HyperRK4 / RK4 terminal error at equal steps (goal: never above 1)",
        "",
        "| workload | " + " | ".join(f"{n // 4} steps" for n in rk4_nfe) + " | never worse |",
        "|---|" + "---|" * (len(rk4_nfe) + 1),
    ]
    for w in result["workloads"]:
        cells = [_num(r["ratio"], ".3g") for r in w["hyperrk4_vs_rk4"]]
        lines.append(f"| {w['workload']} | " + " | ".join(cells) + f" | {w['hyperrk4_never_worse']} |")
    lines += [
        "",
        "### F5 harvest + fit cost per workload (CPU)",
        "",
        "| workload | dtype | trajectories | " + " | ".join(["Euler", "Midpoint/Heun", "RK4"]) + " | total (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in result["workloads"]:
        cells = [
            f"{f['harvest_s']:.1f} + {f['fit_s']:.1f} s ({f['iterations']} it, tol {f['tolerance']:g})"
            for f in w["fits"]
        ]
        lines.append(
            f"| {w['workload']} | {w['dtype']} | {w['fit_trajectories']} | "
            + " | ".join(cells)
            + f" | {w['harvest_and_fit_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"
