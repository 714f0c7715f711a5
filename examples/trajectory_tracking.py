"""Trajectory tracking with a Galerkin Neural ODE and a trajectory-fitted HyperEuler (supplement C.1, Fig. 8).

A depth-variant Neural ODE dz/ds = f(s, z), built from torchdyn's Galerkin layers
(``DepthCat`` + ``GalLinear`` with a ``Fourier`` basis: the weights are functions of the
depth s), is trained so that its solutions track the periodic signal

    beta(s) = sin(2 pi s) + 0.5 sin(6 pi s),   s in [0, 1],

from initial states z(0) ~ U(-0.5, 0.5), with the integral loss
L = int_0^1 (z(s) - beta(s))^2 ds. The integral is a trapezoid quadrature over the
mesh of the training solve (RK4, 40 steps): the same optimum as torchdyn's
``integral_loss`` (which carries the running integral as an extra state) up to an O(h^2)
quadrature error, and autograd backpropagates through the solve directly.

Then a three-layer HyperEuler (hidden 64-64-64) is fitted by *trajectory fitting*,
``fit(..., method='trajectory')``: the hypersolver is unrolled on meshes of 10 to 24 steps
and matched to dopri5 solutions at every mesh point. Its g also sees the depth s (through
cos/sin of its first harmonics), as the paper's g(eps, s, x, z) does: f is depth-variant. The Pareto sweep compares
global truncation error against NFE with Euler, Midpoint and RK4; in the 10-25 NFE band
(HyperEuler and Euler at n steps = n NFE, Midpoint 2n, RK4 4n) HyperEuler is the most
efficient, as in the supplement's Fig. 8. A second figure shows the tracked signal with
dopri5, HyperEuler and Euler at 10 NFE.

Two things this example checks and records in ``summary.json``:

* ``vmap``: the package computes residuals for all steps at once with ``torch.func.vmap``
  (``mesh.map_steps``). torchdyn's ``GalLayer.calculate_weights`` writes the basis into
  ``torch.eye`` in place (``Bin[range(deg), range(deg)] = basis``), which vmap cannot batch,
  so the package falls back to a loop over steps (correct, with a ``RuntimeWarning``). A
  ``GalLinear`` whose weights are computed out of place vectorises and gives the same numbers.
* RK4: torchdyn 1.0.6's ``RungeKutta4`` (the ``'rk4'`` name) evaluates its stages at times
  t, t + dt/2, t + dt/2 instead of t + dt/2, t + dt/2, t + dt, which makes it first order on
  a depth-variant f. This example trains with the package's ``RK4`` inside torchdyn's
  ``NeuralODE`` (``solver=RK4()``, not ``solver='rk4'``) and sweeps with it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.common import Timer, parser, setup, train, write_json  # noqa: E402

# isort: split
import math  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchdyn.core import NeuralODE  # noqa: E402
from torchdyn.nn import DepthCat, Fourier, GalLinear  # noqa: E402

from torchdyn_hypersolvers import (  # noqa: E402
    RK4,
    Euler,
    HyperEuler,
    Midpoint,
    fit,
    harvest,
    pareto,
)
from torchdyn_hypersolvers.harvest import reference_solve  # noqa: E402
from torchdyn_hypersolvers.metrics import global_truncation_error  # noqa: E402
from torchdyn_hypersolvers.validity import OutsideFitWarning  # noqa: E402

BAND = (10, 25)  # the NFE range of the supplement's Fig. 8
FULL = dict(
    width=32,  # hidden units of f
    deg=5,  # Fourier degree of the Galerkin weights
    train_iterations=200,
    train_steps=40,  # RK4 steps of the training solve (and quadrature nodes - 1)
    train_batch=64,
    n_fit=512,  # initial states harvested for fitting g
    n_test=256,  # held-out initial states for the sweep
    fit_iterations=300,
    fit_steps=[10, 12, 16, 20, 24],  # HyperEuler NFE in the band
    sweep_steps=[3, 4, 5, 6, 8, 10, 12, 16, 20, 24],  # gives Midpoint 2n and RK4 4n in the band too
    tol=1e-7,
    repeats=5,
)
QUICK = dict(
    FULL,
    train_iterations=30,
    train_steps=20,
    train_batch=32,
    n_fit=64,
    n_test=64,
    fit_iterations=30,
    fit_steps=[10, 20],
    sweep_steps=[3, 5, 10, 20],
    tol=1e-6,
    repeats=1,
)
SPREAD = 0.5  # z(0) ~ U(-SPREAD, SPREAD)


def beta(s: torch.Tensor) -> torch.Tensor:
    """The periodic signal to track."""
    return torch.sin(2 * math.pi * s) + 0.5 * torch.sin(6 * math.pi * s)


def galerkin_field(width: int, deg: int, layer=GalLinear) -> nn.Sequential:
    """f(s, z) for a scalar state: Galerkin linear - tanh - Galerkin linear, each layer's weights
    a Fourier expansion in s (``DepthCat`` appends s, which torchdyn's DEFunc sets each call).
    torchdyn's Galerkin layers build their basis in float32, so the model is float32."""
    return nn.Sequential(
        DepthCat(1),
        layer(1, width, expfunc=Fourier(deg)),
        nn.Tanh(),
        DepthCat(1),
        layer(width, 1, expfunc=Fourier(deg)),
    )


class OutOfPlaceGalLinear(GalLinear):
    """torchdyn's ``GalLinear`` with its weights computed out of place (same parameters, same
    numbers): ``sum_i coeffs[:, :, i] @ basis_i`` instead of writing the basis into ``torch.eye``
    in place. Used here only to show that this is what vmap needs."""

    def calculate_weights(self, t):
        n_range = torch.linspace(0, self.deg, self.deg).to(self.coeffs)
        s = t * self.dilation.to(self.coeffs) + self.shift.to(self.coeffs)
        basis = torch.stack([torch.as_tensor(b).to(self.coeffs).expand(self.deg) for b in self.expfunc(n_range, s)], -1)
        return (self.coeffs * basis).sum((1, 2))


class DepthHyperNet(nn.Module):
    """g(dt, s, z, f(s, z)) for a depth-variant f: an MLP (hidden 64-64-64, SiLU) on
    [z, f(s, z), dt, cos(2 pi k s), sin(2 pi k s) for k = 1..harmonics].

    The paper's g takes the depth s (g(eps, s, x, z), supplement A.1). Here f changes with s, so
    Euler's residual does too; the package's ``MLPHyperNet`` sees only (z, f, dt) and, on this
    model, removes a much smaller share of it. The last layer starts at zero: an unfitted
    HyperEuler is Euler."""

    hypernet_convention = "dt_t_z_dz"

    def __init__(self, state_dim: int, hidden=(64, 64, 64), harmonics: int = 4):
        super().__init__()
        self.register_buffer("k", 2 * math.pi * torch.arange(1, harmonics + 1, dtype=torch.float32))
        widths = [2 * state_dim + 1 + 2 * harmonics, *hidden]
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.SiLU()]
        layers.append(nn.Linear(widths[-1], state_dim))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.net = nn.Sequential(*layers)

    def forward(self, dt, t, z, dz):
        batch = z.shape[0]
        phase = torch.as_tensor(t).to(z) * self.k.to(z)
        depth = torch.cat([phase.cos(), phase.sin()]).expand(batch, -1)
        return self.net(torch.cat([z, dz, torch.as_tensor(dt).to(z).expand(batch, 1), depth], 1))


def initial_states(n: int, device) -> torch.Tensor:
    return SPREAD * (2 * torch.rand(n, 1, device=device) - 1)


def train_tracker(node: NeuralODE, cfg: dict, device, progress: bool):
    """Minimise the trapezoid quadrature of int_0^1 (z(s) - beta(s))^2 ds over the RK4 mesh."""
    s = torch.linspace(0, 1, cfg["train_steps"] + 1, device=device)
    target = beta(s)[:, None, None]

    def loss_fn(_):
        trajectory = node(initial_states(cfg["train_batch"], device), s)
        return torch.trapezoid((trajectory - target).square().mean((1, 2)), s)

    return train(
        loss_fn, node.parameters(), cfg["train_iterations"], lr=1e-2, lr_min=1e-4, desc="training f", progress=progress
    )


def vmap_check(node: NeuralODE, f: nn.Module, cfg: dict, z: torch.Tensor) -> dict:
    """Does ``torch.func.vmap`` batch f over time steps, as the package's ``map_steps`` tries first?

    Tried on torchdyn's ``GalLinear`` and on :class:`OutOfPlaceGalLinear` with the same weights;
    both are compared with a plain loop over steps."""
    t = torch.linspace(0, 1, 11, device=z.device)[:-1]
    zs = z.expand(len(t), *z.shape)
    fixed = galerkin_field(cfg["width"], cfg["deg"], OutOfPlaceGalLinear).to(z.device)
    fixed.load_state_dict(f.state_dict())
    fixed_node = NeuralODE(fixed, solver=RK4())
    out = {}
    with torch.no_grad():
        loop = torch.stack([node.vf(t[k], zs[k]) for k in range(len(t))])
        for name, vf in (("torchdyn_GalLinear", node.vf), ("out_of_place_GalLinear", fixed_node.vf)):
            try:
                batched = torch.func.vmap(vf)(t, zs)
                out[name] = {"vectorised": True, "max_abs_diff_vs_loop": float((batched - loop).abs().max())}
            except RuntimeError as err:
                out[name] = {"vectorised": False, "error": str(err).splitlines()[0][:300]}
        # leave the stock layers' cached weights as a plain call would
        node.vf(t[0], zs[0])
    return out


def plot_global_error(result, path: Path) -> str:
    """Fig. 8: mean global truncation error against NFE (``plot_pareto`` on an axis), the
    10-25 NFE band shaded."""
    from torchdyn_hypersolvers.plots import _pyplot, plot_pareto

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.axvspan(*BAND, color="0.9", zorder=0, label=f"{BAND[0]}-{BAND[1]} NFE")
    plot_pareto(result, cost="nfe", error="global_error", ax=ax, front=False)
    ax.set_title("trajectory tracking: held-out initial states")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_tracking(node, hs, z0, nfe: int, tol: float, path: Path) -> str:
    """The tracked signal: dopri5, HyperEuler and Euler (both at ``nfe`` steps) against beta."""
    from torchdyn_hypersolvers.plots import _pyplot

    plt = _pyplot()
    fine = torch.linspace(0, 1, 201, device=z0.device)
    mesh = torch.linspace(0, 1, nfe + 1, device=z0.device)
    with torch.no_grad():
        reference = reference_solve(node.vf, z0, fine, "dopri5", tol, tol)
        on_mesh = reference_solve(node.vf, z0, mesh, "dopri5", tol, tol)
        panels = [("dopri5 (reference)", fine, reference, None)]
        for name, solver in ((f"HyperEuler, {nfe} NFE", hs), (f"Euler, {nfe} NFE", Euler())):
            sol = solver.solve(node.vf, z0, mesh)
            panels.append((name, mesh, sol, float(global_truncation_error(sol, on_mesh).mean())))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, (name, s, z, err) in zip(axes, panels):
        ax.plot(fine.cpu(), beta(fine).cpu(), "k--", lw=2, label="beta(s)")
        for i in range(z.shape[1]):
            ax.plot(s.cpu(), z[:, i, 0].cpu(), marker="." if err is not None else None, lw=1.2, alpha=0.85)
        ax.set_title(name if err is None else f"{name}: global error {err:.3g}")
        ax.set_xlabel("s")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("z(s)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    p = parser(__doc__, "trajectory_tracking", threads=1)
    args = p.parse_args(argv)
    device = setup(args)
    progress = not args.no_progress
    cfg = QUICK if args.quick else FULL
    summary = run(args, cfg, device, progress)
    print(f"results: {Path(args.out).resolve()}")
    return summary


def run(args, cfg, device, progress):
    out = Path(args.out)
    f = galerkin_field(cfg["width"], cfg["deg"]).to(device)
    for m in f.modules():
        if isinstance(m, GalLinear):
            # torchdyn zero-initialises the coefficients: start from small random ones instead
            nn.init.normal_(m.coeffs, std=0.3 / math.sqrt(m.in_features))
            # the basis is cos/sin(n s * dilation) for n in linspace(0, deg, deg): this dilation makes
            # it the harmonics 0, 1, ..., deg - 1 of the unit period, those of beta included (learnable)
            with torch.no_grad():
                m.dilation.fill_(2 * math.pi * (m.deg - 1) / m.deg)
    # the package's RK4 inside torchdyn's NeuralODE: torchdyn's own 'rk4' is first order on a depth-variant f
    node = NeuralODE(f, solver=RK4(), return_t_eval=False).to(device)
    with Timer() as t_train:
        losses = train_tracker(node, cfg, device, progress)
    node.eval()
    x_fit, x_test = initial_states(cfg["n_fit"], device), initial_states(cfg["n_test"], device)

    span = torch.linspace(0, 1, 2, device=device)
    with Timer() as t_harvest:
        trajectories = harvest(node, x_fit, span, steps=cfg["fit_steps"], atol=cfg["tol"], rtol=cfg["tol"])
    vmap = vmap_check(node, f, cfg, x_fit[:8])

    hs = HyperEuler(DepthHyperNet(1, hidden=(64, 64, 64))).to(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        report = fit(
            hs,
            trajectories,
            method="trajectory",
            iterations=cfg["fit_iterations"],
            batch_size=64,
            progress=progress,
            seed=args.seed,
            device=device,
        )
    fallback = [str(w.message) for w in caught if "could not vectorise" in str(w.message)]
    vmap["package_fit"] = "loop fallback (RuntimeWarning)" if fallback else "vectorised (or warned earlier)"

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=OutsideFitWarning)  # 3-8 steps: extrapolation
        result = pareto(
            node,
            x_test,
            span,
            # the package's solvers: exact stage times on a depth-variant f
            solvers={"HyperEuler": hs, "euler": Euler(), "midpoint": Midpoint(), "rk4": RK4()},
            steps=cfg["sweep_steps"],
            reference_tol=cfg["tol"],
            repeats=cfg["repeats"],
        )
    paths = result.save(out)
    paths["global_error_vs_nfe"] = plot_global_error(result, out / "global_error_vs_nfe.png")
    paths["tracking"] = plot_tracking(node, hs, x_test[:5], 10, cfg["tol"], out / "tracking.png")

    band = {}
    for r in result:
        if BAND[0] <= r.nfe <= BAND[1]:
            band.setdefault(str(r.nfe), {})[r.solver] = r.global_error
    shared = {nfe: errs for nfe, errs in band.items() if len(errs) > 1}
    wins = [nfe for nfe, errs in shared.items() if min(errs, key=errs.get) == "HyperEuler"]
    with torch.no_grad():
        fine = torch.linspace(0, 1, 201, device=device)
        z = reference_solve(node.vf, x_test, fine, "dopri5", cfg["tol"], cfg["tol"])
        tracking_loss = float(torch.trapezoid((z - beta(fine)[:, None, None]).square().mean((1, 2)), fine))
    summary = {
        "signal": "beta(s) = sin(2 pi s) + 0.5 sin(6 pi s), z(0) ~ U(-0.5, 0.5)",
        "train_s": t_train.seconds,
        "train_loss_first_last": [losses[0], losses[-1]],
        "held_out_tracking_loss_dopri5": tracking_loss,
        "harvest_s": t_harvest.seconds,
        "fit_s": report.wall_time,
        "fit": report.summary(),
        "fit_loss_first_last": [report.loss_history[0], report.loss_history[-1]],
        "vmap": vmap,
        "global_error_in_band": band,
        "hypereuler_best_at_nfe": wins,
        "rows": [
            {"solver": r.solver, "steps": r.steps, "nfe": r.nfe, "global_error": r.global_error, "wall_ms": r.wall_ms}
            for r in result
        ],
        "paths": paths,
    }
    write_json(str(out), "summary.json", summary)

    print(result.to_markdown())
    print(
        f"tracking loss (dopri5, held out) {tracking_loss:.3g}; trained in {t_train.seconds:.0f} s, {report.summary()}"
    )
    print(
        "vmap over steps: torchdyn GalLinear "
        f"{'vectorised' if vmap['torchdyn_GalLinear']['vectorised'] else 'falls back to a loop'}, "
        f"out-of-place GalLinear {'vectorised' if vmap['out_of_place_GalLinear']['vectorised'] else 'fails'}"
    )
    print(f"global truncation error in the {BAND[0]}-{BAND[1]} NFE band:")
    for nfe in sorted(shared, key=int):
        errs = shared[nfe]
        print(f"  NFE {nfe}: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(errs.items(), key=lambda kv: kv[1])))
    return summary


if __name__ == "__main__":
    main()
