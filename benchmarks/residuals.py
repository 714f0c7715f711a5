"""Residual computation on a 50-step mesh: the package's vectorised call vs the seed's
per-step loop (supplement B.1), side by side; and harvest + fit wall time on the 2-D task."""

from __future__ import annotations

import time

import torch

from torchdyn_hypersolvers import Euler, HyperEuler, MLPHyperNet, fit, harvest

from .common import compare
from .workloads import moons_node


def seed_loop_residuals(hs, f, traj, t_span):
    """The seed's base_residuals + hypersolver_residuals: one f (and g) call per step."""
    p, ds = hs.order, t_span[1] - t_span[0]
    base = torch.cat([hs.base_solver.step(f, traj[i], s, ds)[1][None] for i, s in enumerate(t_span[:-1])])
    targets = (traj[1:] - base) / ds ** (p + 1)
    dz = torch.cat([f(s, traj[i])[None] for i, s in enumerate(t_span[:-1])])
    predicted = torch.cat([hs.correction(ds, s, traj[i], dz[i])[None] for i, s in enumerate(t_span[:-1])])
    return targets, predicted


def vectorised_residuals(hs, f, traj, t_span):
    targets, dz = hs.residual_targets(f, traj, t_span)
    return targets, hs.hypersolver_residuals(f, traj, t_span, dz=dz)


def flat_lower_bound(hs, f, traj, t_span):
    """One flattened call of f and of g over all steps: the floor for any vectorisation
    (valid here only because the benchmark's f is autonomous and the mesh uniform)."""
    z, dt = traj[:-1].flatten(0, 1), t_span[1] - t_span[0]
    dz = f(t_span[0], z)
    targets = (traj[1:].flatten(0, 1) - z - dt * dz) / dt**2
    return targets, hs.g(dt, t_span[0], z, dz)


def run(quick: bool = False):
    model, X = moons_node(iterations=30 if quick else 150)
    f = model.vf
    rows = []
    for batch in [16] if quick else [16, 64, 512]:
        t_span = torch.linspace(0, 1, 51)
        with torch.no_grad():
            traj = harvest(model, X[:batch], t_span).states
            hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32)))
            a, b = seed_loop_residuals(hs, f, traj, t_span), vectorised_residuals(hs, f, traj, t_span)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # float32 round-off amplified by 1/dt**2
            times = compare(
                {
                    "seed loop": lambda: seed_loop_residuals(hs, f, traj, t_span),
                    "vectorised": lambda: vectorised_residuals(hs, f, traj, t_span),
                    "flat": lambda: flat_lower_bound(hs, f, traj, t_span),
                },
                repeats=3 if quick else 15,
            )
        rows.append(
            {
                "batch": batch,
                "steps": 50,
                "seed_loop_ms": 1e3 * times["seed loop"],
                "vectorised_ms": 1e3 * times["vectorised"],
                "flat_lower_bound_ms": 1e3 * times["flat"],
                "speedup": times["seed loop"] / times["vectorised"],
            }
        )

    iterations = 50 if quick else 3000
    start = time.perf_counter()
    train = harvest(model, X[:1024], torch.linspace(0, 1, 2), steps=[10])
    harvest_s = time.perf_counter() - start
    hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32)))
    report = fit(hs, train, iterations=iterations, seed=0, progress=False)
    held_out = harvest(model, X[1024:1536], torch.linspace(0, 1, 2), steps=[10])
    t_span, ref = held_out.mesh(10)
    with torch.no_grad():
        err_h = (hs.solve(f, ref[0], t_span, return_trajectory=False) - ref[-1]).norm(dim=1).mean()
        err_e = (Euler().solve(f, ref[0], t_span, return_trajectory=False) - ref[-1]).norm(dim=1).mean()
    fitting = {
        "trajectories": 1024,
        "steps": 10,
        "iterations": iterations,
        "harvest_s": harvest_s,
        "fit_s": report.wall_time,
        "total_s": harvest_s + report.wall_time,
        "held_out_terminal_error_hypereuler": float(err_h),
        "held_out_terminal_error_euler": float(err_e),
        "error_ratio": float(err_e / err_h),
    }
    return {"residuals": rows, "fit_2d": fitting}


def markdown(result) -> str:
    lines = [
        "### Residuals on a 50-step mesh (2-D model): seed's per-step loop vs vectorised",
        "",
        "| batch | seed loop (ms) | vectorised (ms) | speed-up | one flat call of f and g (ms, the floor) |",
        "|---|---|---|---|---|",
    ]
    for r in result["residuals"]:
        lines.append(
            f"| {r['batch']} | {r['seed_loop_ms']:.2f} | {r['vectorised_ms']:.2f} | {r['speedup']:.1f}x "
            f"| {r['flat_lower_bound_ms']:.2f} |"
        )
    fit_2d = result["fit_2d"]
    lines += [
        "",
        "### Harvest + fit on the 2-D task (HyperEuler, 10 steps)",
        "",
        "| trajectories | iterations | harvest (s) | fit (s) | total (s) | held-out error Euler / HyperEuler |",
        "|---|---|---|---|---|---|",
        f"| {fit_2d['trajectories']} | {fit_2d['iterations']} | {fit_2d['harvest_s']:.2f} | {fit_2d['fit_s']:.2f} "
        f"| {fit_2d['total_s']:.2f} | {fit_2d['error_ratio']:.1f}x |",
        "",
    ]
    return "\n".join(lines)
