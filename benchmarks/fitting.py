"""B5 fitting cost: harvest + fit wall time for each workload, and harvest memory."""

from __future__ import annotations

from .workloads import cnf, digits, moons

GOALS_S = {"2-D moons": 30.0, "digits": 120.0}


def run(quick: bool = False):
    rows = []
    for name, w in (("2-D moons", moons(quick)), ("digits", digits(quick)), ("CNF pinwheel", cnf(quick))):
        rows.append({"workload": name, **w["fit"], "goal_s": GOALS_S.get(name)})
    return {"rows": rows}


def markdown(result) -> str:
    lines = [
        "### B5 fitting cost (harvest with dopri5 + residual fit, CPU)",
        "",
        "| workload | trajectories | meshes | iterations | harvest (s) | fit (s) | total (s) | goal (s) "
        "| trajectories (MB) | peak RSS growth in harvest (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        goal = "" if r["goal_s"] is None else f"< {r['goal_s']:.0f}"
        rss = "" if r["harvest_peak_rss_growth_mb"] is None else f"{r['harvest_peak_rss_growth_mb']:.0f}"
        lines.append(
            f"| {r['workload']} | {r['trajectories']} | {r['meshes']} | {r['iterations']} | {r['harvest_s']:.2f} "
            f"| {r['fit_s']:.1f} | {r['total_s']:.1f} | {goal} | {r['trajectory_mb']:.2f} | {rss} |"
        )
    return "\n".join(lines) + "\n"
