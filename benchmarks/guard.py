"""Guarded hypersolvers: in and out of the distribution g was fitted on, side by side in one run.

Workload: the van der Pol Neural ODE (mu = 3, float64, an MLP field; ``workloads.vanderpol``) on
[0, 2], and a HyperEuler whose g (an MLP on standardised inputs) is fitted on dopri5 trajectories
from states near the limit cycle, on the meshes of ``STEPS`` steps. Errors are terminal errors
against a dopri5 solve of the same model (rtol = atol = 1e-10), mean over samples of the
Euclidean norm; wall times are medians of interleaved repeats (``common.compare``).

* In distribution (held-out states drawn as the fitting states were): the guarded solver's error
  over the unguarded one's (goal: within 5%) and its wall time over the unguarded one's (goal <= 1.10).
* Out of distribution: the held-out states scaled by 3 about the origin (3x outside the harvested
  range), and the model's weights perturbed by 10% (each weight times 1 + 0.1 N(0, 1)) after g was
  fitted. Base Euler, HyperEuler and the guarded HyperEuler at the same step count (equal NFE up to
  the guard's one extra evaluation per solve and its fallbacks); goals: the unguarded hypersolver
  worse than Euler on at least one, the guarded one's error <= Euler's on both, at <= 2x the
  unguarded wall time.
* A sweep for the figure: error against the distance from the fitted distribution (the scale of
  the initial states, and the size of the weight perturbation).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, List, Optional

import torch

from examples.lorenz import Standardized
from torchdyn_hypersolvers import Euler, HyperEuler, MLPHyperNet, fit, harvest
from torchdyn_hypersolvers.fit import residual_data
from torchdyn_hypersolvers.guard import Guarded

from . import workloads
from .common import compare

STEPS = [16, 24, 32]
SOLVE_STEPS = 24  # the mesh every measurement below uses (a fitted one)
SCALES = [1.0, 1.5, 2.0, 3.0, 4.0]
PERTURBATIONS = [0.0, 0.05, 0.1, 0.2, 0.3]
ID_ERROR_GOAL, ID_WALL_GOAL, OOD_WALL_GOAL = 0.05, 1.10, 2.0
FIGURE = "guard.png"


def _reference(f, x, t_span):
    import torchdiffeq

    with torch.no_grad():
        return torchdiffeq.odeint(lambda t, z: f(t, z), x, t_span, rtol=1e-10, atol=1e-10, method="dopri5")[-1]


def _perturbed(f: torch.nn.Module, size: float, seed: int = 11) -> torch.nn.Module:
    g = copy.deepcopy(f)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(1 + size * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return g


def _errors(solvers: Dict[str, object], f, x, t_span) -> Dict[str, float]:
    ref = _reference(f, x, t_span)
    mesh = torch.linspace(float(t_span[0]), float(t_span[-1]), SOLVE_STEPS + 1, dtype=x.dtype)
    out = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the validity record's out-of-range warnings: intended here
        for name, solver in solvers.items():
            z = solver.solve(f, x, mesh, return_trajectory=False)
            out[name] = float((z - ref).norm(dim=-1).mean())
            if isinstance(solver, Guarded):
                summary = solver.summary()
                out["fallback_fraction"] = summary.fraction
                out["guarded_nfe"] = summary.nfe
    return out


def _walls(solvers: Dict[str, object], f, x, t_span, repeats: int) -> Dict[str, float]:
    mesh = torch.linspace(float(t_span[0]), float(t_span[-1]), SOLVE_STEPS + 1, dtype=x.dtype)

    def run(solver):
        def go():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return solver.solve(f, x, mesh, return_trajectory=False)

        return go

    return compare({name: run(s) for name, s in solvers.items()}, repeats=repeats, warmup=1)


def _fit(quick: bool):
    w = workloads.vanderpol(quick)
    f, x_fit = w["vf"], w["x_fit"]
    trajectories = harvest(f, x_fit, w["t_span"], steps=STEPS, base="euler")
    probe = HyperEuler(MLPHyperNet(2)).double()
    g = Standardized(MLPHyperNet(2, hidden=(64, 64)), residual_data(probe, trajectories)).double()
    torch.manual_seed(0)
    hs = HyperEuler(g).double()
    report = fit(
        hs, trajectories, iterations=40 if quick else 1500, batch_size=64, progress=False, seed=0,
        balance_meshes=False,
    )
    hs.eval()
    return w, hs, report


def run(quick: bool = False) -> Dict[str, object]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool) -> Dict[str, object]:
    w, hs, report = _fit(quick)
    f, x, t_span = w["vf"], w["x"], w["t_span"]
    guarded = Guarded(hs, warn_fraction=None)
    solvers = {"euler": Euler(), "hyper": hs, "guarded": guarded}
    repeats = 3 if quick else 15

    in_dist = _errors(solvers, f, x, t_span)
    in_dist.update({f"{k}_wall_s": v for k, v in _walls(solvers, f, x, t_span, repeats).items()})
    in_dist["error_ratio"] = in_dist["guarded"] / in_dist["hyper"]
    in_dist["wall_ratio"] = in_dist["guarded_wall_s"] / in_dist["hyper_wall_s"]
    big = x.repeat(16, 1)  # the same states, a 16x larger batch: f and g cost more per call
    walls = _walls({"hyper": hs, "guarded": guarded}, f, big, t_span, repeats)
    in_dist["batch_x16_wall_ratio"] = walls["guarded"] / walls["hyper"]
    in_dist["batch_x16_fallback_fraction"] = _errors({"guarded": guarded}, f, big, t_span)["fallback_fraction"]

    cases = {"states_x3": (f, 3.0 * x), "weights_10pct": (_perturbed(f, 0.1), x)}
    ood = {}
    for name, (f_case, x_case) in cases.items():
        row = _errors(solvers, f_case, x_case, t_span)
        row.update({f"{k}_wall_s": v for k, v in _walls(solvers, f_case, x_case, t_span, repeats).items()})
        row["hyper_worse_than_base"] = row["hyper"] > row["euler"]
        row["guarded_not_worse_than_base"] = row["guarded"] <= row["euler"]
        row["wall_ratio"] = row["guarded_wall_s"] / row["hyper_wall_s"]
        ood[name] = row

    sweep = {
        "scales": [dict(scale=s, **_errors(solvers, f, s * x, t_span)) for s in SCALES],
        "perturbations": [dict(size=p, **_errors(solvers, _perturbed(f, p), x, t_span)) for p in PERTURBATIONS],
    }
    result = {
        "workload": "van der Pol Neural ODE (mu = 3), HyperEuler",
        "fitted_meshes": STEPS,
        "solve_steps": SOLVE_STEPS,
        "trajectories_fit": int(w["x_fit"].shape[0]),
        "held_out": int(x.shape[0]),
        "fit_iterations": report.iterations,
        "in_distribution": in_dist,
        "out_of_distribution": ood,
        "sweep": sweep,
        "goals": {
            "in_distribution_error_within_5pct": abs(in_dist["error_ratio"] - 1) <= ID_ERROR_GOAL,
            "in_distribution_wall_le_1.10": in_dist["wall_ratio"] <= ID_WALL_GOAL,
            "ood_hyper_worse_than_base_somewhere": any(r["hyper_worse_than_base"] for r in ood.values()),
            "ood_guarded_not_worse_than_base": all(r["guarded_not_worse_than_base"] for r in ood.values()),
            "ood_wall_le_2x": all(r["wall_ratio"] <= OOD_WALL_GOAL for r in ood.values()),
        },
    }
    result["figure"] = _figure(sweep, quick, held_out=int(x.shape[0]))
    return result


def _figure(sweep, quick: bool, path: Optional[str] = None, held_out: Optional[int] = None):
    """Error against the distance from the fitted distribution; written to ``path`` (default
    ``results/guard.png``; None in quick mode or without matplotlib)."""
    if quick:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.9), dpi=110, sharey=True)
    panels = [
        (
            "scales",
            "scale",
            "(a) new inputs: initial states scaled",
            "scale c of the initial states: z(0) = c x  (1 = as fitted)",
        ),
        (
            "perturbations",
            "size",
            "(b) changed model: weights perturbed after fitting",
            "perturbation s: each weight w -> w (1 + s N(0, 1))  (0 = as fitted)",
        ),
    ]
    styles = {
        "euler": ("Euler (base)", "k--"),
        "hyper": ("HyperEuler", "C3o-"),
        "guarded": ("Guarded(HyperEuler)", "C0s-"),
    }
    for ax, (key, xkey, title, xlabel) in zip(axes, panels):
        rows = sweep[key]
        for name, (legend, style) in styles.items():
            ax.semilogy([r[xkey] for r in rows], [r[name] for r in rows], style, label=legend, ms=4)
        ax.set_xticks([r[xkey] for r in rows])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("terminal error at t = 2\n(mean over states of ||z(2) - z_ref(2)||)", fontsize=8)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.02, 0.05, 0.1, ...: plain labels
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=8)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    inputs = f"{held_out} held-out initial states" if held_out else "held-out initial states"
    fig.suptitle(
        f"Euler, HyperEuler and Guarded(HyperEuler), {SOLVE_STEPS} steps, away from where g was fitted\n"
        f"van der Pol Neural ODE (mu = 3, MLP field) on [0, 2]; {inputs} near its limit cycle",
        fontsize=9,
    )
    fig.tight_layout()
    if path is None:
        os.makedirs("results", exist_ok=True)
        path = os.path.join("results", FIGURE)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def markdown(result: Dict[str, object]) -> str:
    i, ood = result["in_distribution"], result["out_of_distribution"]
    lines: List[str] = [
        "### Guarded hypersolvers (B7)",
        "",
        f"{result['workload']}; g fitted on meshes of {result['fitted_meshes']} steps, solves of "
        f"{result['solve_steps']} steps, {result['held_out']} held-out states; terminal error vs dopri5 (1e-10).",
        "",
        "| case | Euler error | HyperEuler error | Guarded error | fell back | HyperEuler wall | Guarded wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in [("in distribution", i)] + list(ood.items()):
        lines.append(
            f"| {name} | {_fmt(row['euler'])} | {_fmt(row['hyper'])} | {_fmt(row['guarded'])} | "
            f"{row['fallback_fraction']:.1%} | {row['hyper_wall_s'] * 1e3:.2f} ms | "
            f"{row['guarded_wall_s'] * 1e3:.2f} ms |"
        )
    lines += [
        "",
        f"In distribution: guarded / unguarded error {i['error_ratio']:.3f}, wall {i['wall_ratio']:.2f}x "
        f"({i['batch_x16_wall_ratio']:.2f}x on a 16x larger batch). NFE per solve: Euler and HyperEuler "
        f"{result['solve_steps']}, guarded {i['guarded_nfe']} in distribution, "
        + ", ".join(f"{row['guarded_nfe']} {name}" for name, row in ood.items())
        + ".",
        "Out of distribution: "
        + "; ".join(f"{name}: guarded wall {row['wall_ratio']:.2f}x unguarded" for name, row in ood.items())
        + ".",
        "Goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["goals"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    res = run(quick=bool(os.environ.get("QUICK")))
    print(markdown(res))
    print(json.dumps(res["sweep"], indent=1))
