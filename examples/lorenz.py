"""The Lorenz system with hypersolvers: torchdyn's hypersolver tutorial problem, done with this package.

dz/dt = (sigma (y - x), x (rho - w) - y, x y - beta w) with sigma = 10, rho = 28,
beta = 8/3 on t in [0, 5], from 512 initial states z(0) = 15 + N(0, I) (the same draw as
torchdyn's tutorial: ``torch.randn(512, 3) + 15``); 256 more from the same distribution are
held out for evaluation. Everything is float64: the chaos amplifies float32 round-off
about e^(0.9 * 5) ~ 90-fold over the interval.

1. ``harvest`` the trajectories with dopri5 at atol = rtol = 1e-9 on uniform meshes (one
   solve on the union of all the meshes below).
2. ``fit`` (residual fitting, 300 iterations: a minute or so each on a CPU, where torchdyn's
   tutorial runs a long hand-written residual-fitting loop) two hypersolvers:
   * HyperEuler, torchdyn's tutorial choice, on meshes of 1000, 2000 and 4000 steps
     (4000 is about the tutorial's mesh, ``torch.linspace(0, 5, 4000)``);
   * HyperMidpoint on meshes of 500, 1000 and 2000 steps: the same NFE, since Midpoint costs
     two f evaluations per step. It is the better choice here. Over t in [0, 5] Euler's
     global error stays at the attractor's scale (~10) at every step count up to 4000, so
     HyperEuler has to undo a large, chaotically amplified error; Midpoint's error is already
     moderate, a g that is right to a few percent divides it by about that factor, and at
     2000-4000 NFE HyperMidpoint ends an order of magnitude or more below HyperEuler. Its
     fit also covers half as many steps per NFE, so it is cheaper.
   g is the package's ``MLPHyperNet`` (64-64) wrapped to see standardised inputs
   (z, f(z), dt) and to predict standardised residuals: Lorenz states are O(10), f is
   O(100) and the residuals (z(t+dt) - z(t) - dt psi) / dt^(p+1) are O(10^2-10^3).
3. ``pareto`` on the held-out states against Euler, Midpoint, RK4 (fixed steps) and dopri5
   at tolerances 1e-3, 1e-4, 1e-5 (adaptive; those rows carry the terminal error only, the
   fixed-step rows also the mean global truncation error over the mesh).

Step counts: any solver's error grows like e^(0.9 t) here, so a comparison only means
something while the solutions have not decorrelated from the reference. The sweep uses 250
to 4000 steps (dt = 0.02 to 1.25e-3, the finest being torchdyn's tutorial mesh): Midpoint,
RK4 and the hypersolvers stay on the reference long enough to be told apart there, and
Euler shows what HyperEuler starts from. The figure shows one held-out trajectory in the
x-z plane and the error E(t) of every solver at 2000 NFE.

What to expect: both hypersolvers beat their base solvers by large factors, and HyperEuler
beats Midpoint at equal NFE at 1000-2000 NFE. RK4 at the same NFE is more accurate than
both: the Lorenz field is smooth and four stages of it cost almost nothing, while g (an
MLP) costs far more than f, so in wall-clock time the fixed-step classics win outright.
Hypersolvers pay off when f is an expensive network, as in the other tutorials.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.common import Timer, parser, setup, train, write_json  # noqa: E402, F401

# isort: split
import math  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from torchdyn_hypersolvers import (  # noqa: E402
    RK4,
    Euler,
    HyperEuler,
    HyperMidpoint,
    Midpoint,
    MLPHyperNet,
    Trajectories,
    fit,
    harvest,
    pareto,
)
from torchdyn_hypersolvers.fit import residual_data  # noqa: E402
from torchdyn_hypersolvers.harvest import reference_solve  # noqa: E402
from torchdyn_hypersolvers.metrics import global_truncation_error  # noqa: E402
from torchdyn_hypersolvers.validity import OutsideFitWarning  # noqa: E402

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0
T_END = 5.0
FULL = dict(
    n_fit=512,
    n_test=256,
    euler_steps=[1000, 2000, 4000],
    midpoint_steps=[500, 1000, 2000],
    sweep_steps=[250, 500, 1000, 2000, 4000],
    iterations=300,
    batch_size=8,  # trajectories per iteration, each with all the steps of all meshes
    tol=1e-9,
    tolerances=[1e-3, 1e-4, 1e-5],
    figure_nfe=2000,
    repeats=3,
)
QUICK = dict(
    FULL,
    n_fit=64,
    n_test=32,
    euler_steps=[1000, 2000],
    midpoint_steps=[500, 1000],
    sweep_steps=[500, 1000],
    iterations=40,
    tol=1e-7,
    tolerances=[1e-3],
    figure_nfe=1000,
    repeats=1,
)


class Lorenz(nn.Module):
    """The Lorenz vector field (autonomous: t is ignored)."""

    def forward(self, t, z):
        x, y, w = z[..., :1], z[..., 1:2], z[..., 2:]
        return torch.cat([SIGMA * (y - x), x * (RHO - w) - y, x * y - BETA * w], -1)


class Standardized(nn.Module):
    """A hypernet on standardised inputs and outputs: ``r_std * g(dt / dt_ref, t, (z - z_mean) / z_std,
    dz / dz_std)``. The statistics come from the residual data of the harvested trajectories; g's
    last layer starts at zero, so the hypersolver starts as its base solver."""

    hypernet_convention = "dt_t_z_dz"

    def __init__(self, g: nn.Module, data):
        super().__init__()
        self.g = g
        z, dz, target = (x.flatten(0, 1) for x in (data.z, data.dz, data.target))
        self.register_buffer("z_mean", z.mean(0))
        self.register_buffer("z_std", z.std(0))
        self.register_buffer("dz_std", dz.std(0))
        self.register_buffer("dt_ref", data.dt.abs().mean())
        self.register_buffer("r_std", target.std(0))

    def forward(self, dt, t, z, dz):
        return self.r_std * self.g(dt / self.dt_ref, t, (z - self.z_mean) / self.z_std, dz / self.dz_std)


def initial_states(n: int, device) -> torch.Tensor:
    """torchdyn's tutorial draw: 15 + N(0, I) in float64."""
    return 15 + torch.randn(n, 3, dtype=torch.float64, device=device)


def select_meshes(trajectories: Trajectories, steps) -> Trajectories:
    """The same harvest restricted to the meshes with ``steps`` steps (what ``fit`` iterates over)."""
    tr = trajectories
    return tr.replace(meshes={n: tr.meshes[n] for n in steps})


def fit_hypersolver(cls, trajectories, cfg, device, progress, seed):
    """Residual-fit a hypersolver with a standardised g on ``trajectories``."""
    probe = cls(MLPHyperNet(3, hidden=(64, 64))).to(device, torch.float64)
    hs = cls(Standardized(MLPHyperNet(3, hidden=(64, 64)), residual_data(probe, trajectories)))
    hs = hs.to(device, torch.float64)
    report = fit(
        hs,
        trajectories,
        iterations=cfg["iterations"],
        batch_size=cfg["batch_size"],
        progress=progress,
        seed=seed,
        device=device,
    )
    return hs, report


def finite(x):
    """JSON-friendly: a float, or None where a solver diverged."""
    return float(x) if x is not None and math.isfinite(x) else None


def plot_trajectory(f, solvers, z0, nfe: int, tol: float, path: Path, shown=("HyperEuler", "Euler")) -> str:
    """Left: one held-out trajectory in the x-z plane, dopri5 against the ``shown`` solvers at
    ``nfe`` evaluations of f. Right: the global error E(t) of every solver over the held-out
    states ``z0``, log scale (dashed: not in the left panel)."""
    from torchdyn_hypersolvers.plots import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    with torch.no_grad():
        fine = torch.linspace(0, T_END, 4001, dtype=torch.float64, device=z0.device)
        reference = reference_solve(f, z0, fine, "dopri5", tol, tol)
        left.plot(reference[:, 0, 0].cpu(), reference[:, 0, 2].cpu(), color="0.55", lw=3.5, label="dopri5 (reference)")
        colors = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")
        for (name, solver, per_step), color in zip(solvers, colors):
            steps = nfe // per_step
            mesh = torch.linspace(0, T_END, steps + 1, dtype=torch.float64, device=z0.device)
            sol = solver.solve(f, z0, mesh)
            ref = reference_solve(f, z0, mesh, "dopri5", tol, tol)
            label = f"{name}, {steps} steps"
            if name in shown:
                left.plot(sol[:, 0, 0].cpu(), sol[:, 0, 2].cpu(), color=color, lw=1.1, label=label)
            style = "-" if name in shown else "--"
            right.plot(mesh.cpu(), global_truncation_error(sol, ref).cpu(), style, color=color, label=label)
    left.set_xlabel("x")
    left.set_ylabel("w (z-coordinate)")
    left.set_title(f"a held-out trajectory, {nfe} NFE")
    left.legend(fontsize=8)
    right.set_yscale("log")
    right.set_xlabel("t")
    right.set_ylabel("global error E(t), held-out mean")
    right.set_title(f"global truncation error, {nfe} NFE")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    p = parser(__doc__, "lorenz", threads=1)
    p.add_argument("--iterations", type=int, default=None, help="fitting iterations per hypersolver")
    args = p.parse_args(argv)
    device = setup(args)
    cfg = dict(QUICK if args.quick else FULL)
    if args.iterations:
        cfg["iterations"] = args.iterations
    summary = run(args, cfg, device, not args.no_progress)
    print(f"results: {Path(args.out).resolve()}")
    return summary


def run(args, cfg, device, progress):
    out = Path(args.out)
    f = Lorenz().to(device)
    x_fit, x_test = initial_states(cfg["n_fit"], device), initial_states(cfg["n_test"], device)

    span = torch.tensor([0.0, T_END], dtype=torch.float64, device=device)
    with Timer() as t_harvest:  # one dopri5 solve on the union of all the meshes
        trajectories = harvest(
            f, x_fit, span, steps=cfg["euler_steps"] + cfg["midpoint_steps"], atol=cfg["tol"], rtol=cfg["tol"]
        )
    he, he_report = fit_hypersolver(
        HyperEuler, select_meshes(trajectories, cfg["euler_steps"]), cfg, device, progress, args.seed
    )
    hm, hm_report = fit_hypersolver(
        HyperMidpoint, select_meshes(trajectories, cfg["midpoint_steps"]), cfg, device, progress, args.seed
    )

    baselines = {"euler": Euler(), "midpoint": Midpoint(), "rk4": RK4()}
    with warnings.catch_warnings():
        # each hypersolver also runs at the sweep's other step counts: an extrapolation in dt, on purpose
        warnings.filterwarnings("ignore", category=OutsideFitWarning)
        result = pareto(
            f,
            x_test,
            span,
            solvers={"HyperEuler": he, "HyperMidpoint": hm, **baselines, "dopri5": "dopri5"},
            steps=cfg["sweep_steps"],
            tolerances=cfg["tolerances"],
            reference_tol=cfg["tol"],
            repeats=cfg["repeats"],
        )
        paths = result.save(out)
        paths["trajectory"] = plot_trajectory(
            f,
            [
                ("HyperEuler", he, 1),
                ("HyperMidpoint", hm, 2),
                ("Euler", baselines["euler"], 1),
                ("Midpoint", baselines["midpoint"], 2),
                ("RK4", baselines["rk4"], 4),
            ],
            x_test[:32],
            cfg["figure_nfe"],
            cfg["tol"],
            out / "trajectory.png",
        )

    by_nfe = {}
    for r in result:
        if r.kind != "adaptive":
            by_nfe.setdefault(str(r.nfe), {})[r.solver] = finite(r.global_error)
    by_nfe = {nfe: errs for nfe, errs in by_nfe.items() if len(errs) > 1}
    terminal = {
        (r.solver if r.kind != "adaptive" else f"dopri5 tol {r.tol:g}"): {
            "steps": r.steps,
            "nfe": r.nfe,
            "terminal_error": finite(r.terminal_error),
            "global_error": finite(r.global_error),
        }
        for r in result
        if r.kind == "adaptive" or r.nfe == cfg["figure_nfe"]
    }
    summary = {
        "system": f"Lorenz sigma={SIGMA:g} rho={RHO:g} beta={BETA:.4g}, t in [0, {T_END:g}]",
        "initial_states": "15 + randn(3), float64",
        "n_fit": cfg["n_fit"],
        "n_test": cfg["n_test"],
        "harvest_s": t_harvest.seconds,
        "fit_s": {"HyperEuler": he_report.wall_time, "HyperMidpoint": hm_report.wall_time},
        "fit": {"HyperEuler": he_report.summary(), "HyperMidpoint": hm_report.summary()},
        "fit_loss_first_last": {
            "HyperEuler": [he_report.loss_history[0], he_report.loss_history[-1]],
            "HyperMidpoint": [hm_report.loss_history[0], hm_report.loss_history[-1]],
        },
        "global_error_by_nfe": by_nfe,
        f"at_{cfg['figure_nfe']}_nfe_and_dopri5": terminal,
        "paths": paths,
    }
    write_json(str(out), "summary.json", summary)

    print(result.to_markdown())
    print(he_report.summary())
    print(hm_report.summary())
    print("mean global truncation error on held-out states, by NFE (fixed-step solvers):")
    for nfe in sorted(by_nfe, key=int):
        errs = sorted(by_nfe[nfe].items(), key=lambda kv: math.inf if kv[1] is None else kv[1])
        print(f"  NFE {nfe}: " + ", ".join(f"{k} {'diverged' if v is None else f'{v:.3g}'}" for k, v in errs))
    for r in result:
        if r.kind == "adaptive":
            print(f"  dopri5 tol {r.tol:g}: NFE {r.nfe}, terminal error {r.terminal_error:.3g}")
    return summary


if __name__ == "__main__":
    main()
