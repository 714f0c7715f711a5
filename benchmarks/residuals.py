"""Residual computation on a 50-step mesh: the package's vectorised call vs the seed's
per-step loop (supplement B.1), side by side."""

from __future__ import annotations

import torch

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, harvest
from torchdyn_hypersolvers.fit import predicted_residuals, residual_targets

from .common import compare
from .workloads import moons


def seed_loop_residuals(hs, f, traj, t_span):
    """The seed's base and predicted residuals: one f (and g) call per step."""
    p, ds = hs.order, t_span[1] - t_span[0]
    base = torch.cat([hs.base_solver.step(f, traj[i], s, ds)[1][None] for i, s in enumerate(t_span[:-1])])
    targets = (traj[1:] - base) / ds ** (p + 1)
    dz = torch.cat([f(s, traj[i])[None] for i, s in enumerate(t_span[:-1])])
    predicted = torch.cat([hs.correction(ds, s, traj[i], dz[i])[None] for i, s in enumerate(t_span[:-1])])
    return targets, predicted


def vectorised_residuals(hs, f, traj, t_span):
    targets, dz = residual_targets(hs, f, traj, t_span)
    return targets, predicted_residuals(hs, f, traj, t_span, dz=dz)


def flat_lower_bound(hs, f, traj, t_span):
    """One flattened call of f and of g over all steps: the floor for any vectorisation
    (valid here only because the benchmark's f is autonomous and the mesh uniform)."""
    z, dt = traj[:-1].flatten(0, 1), t_span[1] - t_span[0]
    dz = f(t_span[0], z)
    targets = (traj[1:].flatten(0, 1) - z - dt * dz) / dt**2
    return targets, hs.g(dt, t_span[0], z, dz)


def run(quick: bool = False):
    w = moons(quick)
    f, X = w["node"].vf, w["x"]
    rows = []
    for batch in [16] if quick else [16, 64, 512]:
        t_span = torch.linspace(0, 1, 51)
        with torch.no_grad():
            traj = harvest(w["node"], X[:batch], t_span).states
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
    return {"residuals": rows}


def markdown(result) -> str:
    lines = [
        "### Residuals on a 50-step mesh (2-D model): seed's per-step loop vs vectorised",
        "",
        "| batch | seed loop (ms) | vectorised (ms) | speed-up (goal >= 10x) | one flat call (ms, the floor) |",
        "|---|---|---|---|---|",
    ]
    for r in result["residuals"]:
        lines.append(
            f"| {r['batch']} | {r['seed_loop_ms']:.2f} | {r['vectorised_ms']:.2f} | {r['speedup']:.1f}x "
            f"| {r['flat_lower_bound_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"
