"""B4 Pareto dominance: the hypersolver's error at NFE n against the best classical
solver at the same n (Euler n steps, Midpoint / Heun n/2, RK4 n/4), n = 4..24."""

from __future__ import annotations

import torch

from torchdyn_hypersolvers import pareto

from .workloads import cnf, digits, moons

NFE = [4, 8, 12, 16, 20, 24]
CLASSICAL_STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def _dominance(name, model, x, t_span, hs, hs_stages):
    hs_name = type(hs).__name__
    stages = {hs_name: hs_stages, **CLASSICAL_STAGES}
    steps = sorted({n // s for n in NFE for s in stages.values()})
    result = pareto(
        model, x, t_span, solvers={hs_name: hs, **{s: s for s in CLASSICAL_STAGES}}, steps=steps, timing=False
    )

    def error(solver, nfe):
        return result.row(solver, steps=nfe // stages[solver]).terminal_error

    rows = []
    for n in NFE:
        best_name, best = min(((s, error(s, n)) for s in CLASSICAL_STAGES), key=lambda p: p[1])
        hyper = error(hs_name, n)
        rows.append({"nfe": n, "hyper": hyper, "best_classical": best_name, "best": best, "ratio": hyper / best})
    return {"workload": name, "hypersolver": hs_name, "rows": rows, "goal_met": all(r["ratio"] <= 0.5 for r in rows)}


def run(quick: bool = False):
    m, d, c = moons(quick), digits(quick), cnf(quick)
    return {
        "workloads": [
            _dominance("2-D moons", m["model"], m["x"], torch.linspace(0, 1, 2), m["hs"], 1),
            _dominance("digits", d["model"], d["x"], torch.linspace(0, 1, 2), d["hs"], 1),
            _dominance("CNF pinwheel (sampling)", c["vf"], c["x"], c["t_span"], c["hs"], 2),
        ]
    }


def markdown(result) -> str:
    lines = [
        "### B4 Pareto dominance: terminal error at NFE n, hypersolver / best classical (goal <= 0.5 at every n)",
        "",
        "| workload | " + " | ".join(f"NFE {n}" for n in NFE) + " | goal met |",
        "|---|" + "---|" * (len(NFE) + 1),
    ]
    for w in result["workloads"]:
        cells = [f"{r['ratio']:.2f} ({r['best_classical']})" for r in w["rows"]]
        lines.append(f"| {w['workload']} ({w['hypersolver']}) | " + " | ".join(cells) + f" | {w['goal_met']} |")
    return "\n".join(lines) + "\n"
