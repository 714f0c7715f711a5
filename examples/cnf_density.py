"""Continuous normalizing flows on 2-D densities, sampled fast with a HyperHeun hypersolver.

What it shows (supplement C.3 of Poli et al., NeurIPS 2020, on a CPU budget):

1. An FFJORD-style continuous normalizing flow (Grathwohl et al., 2019) is trained by maximum
   likelihood on a 2-D density written here (pinwheel, rings, checkerboard, or the "connected
   circles" of C.3: two concentric annuli joined by three curves). The vector field is a
   time-conditioned MLP ``[z, t] -> 128 -> 128 -> 128 -> dz/dt`` (tanh). The log-density change
   uses the *exact* trace of the Jacobian -- in 2-D it is cheap -- computed per sample with
   ``torch.func.vmap(torch.func.jacrev(...))``, so the augmented field also composes with the
   package's own ``torch.func.vmap`` over time steps.

   Direction: data ``x`` sits at t=0 and the standard-normal base at t=1. Training integrates
   ``[z, delta]`` forward from ``[x, 0]`` with ``d delta/dt = tr(df/dz)``; then
   ``log p(x) = log N(z(1); 0, I) + delta(1)`` and the loss is the mean negative log-likelihood.

2. Sampling runs backwards: ``z(1) ~ N(0, I)`` is integrated from t=1 to t=0 on the z-only
   vector field (no trace is needed to sample). That backward solve is what the hypersolver
   speeds up: backward trajectories are harvested with dopri5 from base samples
   (``harvest(vector_field, z1, [1, 0], steps=...)``) and a ``HyperHeun(MLPHyperNet(2))`` is
   fitted to Heun's residuals (residual fitting, AdamW, lr 5e-3, weight decay 1e-6, a new batch
   of trajectories every 100 iterations, as in C.3).

3. On held-out base samples, ``pareto(...)`` compares HyperHeun with Heun, Euler, Midpoint, RK4
   (several step counts) and dopri5 (several tolerances) against a tight dopri5 reference. The
   *sample error* is the mean Euclidean distance ``|z_solver(0) - z_dopri5(0)|`` of the final
   samples (pareto's ``terminal_error``).

CPU-sized defaults (the paper's settings in brackets): training tolerances atol = rtol = 1e-4
[1e-5], 300 training iterations of batch 384 with Adam lr 3e-3 and cosine annealing [3000
iterations, constant lr 1e-3], 2000 fitting iterations [30000]. The looser tolerance and the
shorter schedule keep one density to about two minutes on two CPU cores; the flows are less
sharp than the paper's, but the solver comparison is made against the very vector field that
was trained, so it is unaffected. ``--quick`` shrinks everything to seconds (used by the tests).
``--threads`` defaults to 1: these are tiny 2-D tensors, and on a busy two-core machine a second
OpenMP thread made each Jacobian call tens of times slower, not faster.

The classical solvers are the package's ``Heun``, ``Euler``, ``Midpoint`` and ``RK4`` modules (the
tableaus that the names ``'heun'``, ``'euler'``, ``'midpoint'`` and ``'rk4'`` resolve to in
``pareto``), labelled by their class names. torchdyn's own ``RungeKutta4`` would not do here: it
evaluates its stages at the wrong times (``t, t + dt/2, t + dt/2`` for k2..k4), which makes it
first-order on a time-dependent field like this one.

Outputs in ``--out`` (default ``results/cnf_density``): per density a folder with
``samples.png`` (data, dopri5, HyperHeun and Heun from the same noise at a small NFE),
``error_vs_nfe.png``, and pareto's table and figures (``pareto.md/.csv/.json``,
``pareto_*.png``); and ``summary.json`` with the wall times and sample errors per NFE.

Run:  python examples/cnf_density.py [--density pinwheel|rings|checkerboard|connected_circles|all]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.common import Timer, parser, setup, train, write_json  # noqa: E402

# isort: split
import math  # noqa: E402
import os  # noqa: E402
from typing import Dict, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from torchdyn_hypersolvers import (  # noqa: E402
    RK4,
    Euler,
    Heun,
    HyperHeun,
    Midpoint,
    MLPHyperNet,
    Trajectories,
    fit,
    harvest,
    pareto,
)
from torchdyn_hypersolvers.fit import FitReport  # noqa: E402
from torchdyn_hypersolvers.plots import _pyplot, plot_pareto  # noqa: E402

__all__ = [
    "DENSITIES",
    "CLASSICAL",
    "TimeMLP",
    "CNF",
    "sample_density",
    "sample_base",
    "train_cnf",
    "harvest_backward",
    "fit_hyperheun",
    "sample_backward",
    "sample_error_sweep",
    "run_density",
    "main",
]

DENSITIES = ("pinwheel", "rings", "checkerboard", "connected_circles")
CLASSICAL = (Heun, Euler, Midpoint, RK4)
"""The classical solvers compared with HyperHeun: the package's own classes (the tableaus that
``pareto`` also resolves ``'heun'``, ``'euler'``, ``'midpoint'`` and ``'rk4'`` to), all stepping
through the same tableau code. torchdyn's ``RungeKutta4`` evaluates its stages at the wrong times,
so it is only first-order on a time-dependent field such as a CNF's."""
BACKWARD = (1.0, 0.0)
"""Sampling runs from the base (t=1) to the data (t=0)."""

# sizes: full (CPU-sized, see the docstring) and --quick (seconds)
CONFIGS = {
    "full": dict(
        iterations=300,
        batch_size=384,
        lr=3e-3,
        lr_min=1e-4,
        tol=1e-4,
        harvest=1024,
        harvest_tol=1e-6,
        fit_iterations=2000,
        fit_batch=256,
        swap_every=100,
        hidden=(64, 64),
        steps=(2, 4, 8, 16),
        figure_steps=2,
        n_eval=2048,
        reference_tol=1e-7,
        tolerances=(1e-2, 1e-3, 1e-4),
        repeats=5,
    ),
    "quick": dict(
        iterations=8,
        batch_size=128,
        lr=3e-3,
        lr_min=None,
        tol=1e-3,
        harvest=256,
        harvest_tol=1e-6,
        fit_iterations=300,
        fit_batch=256,
        swap_every=100,
        hidden=(32, 32),
        steps=(2, 4),
        figure_steps=2,
        n_eval=512,
        reference_tol=1e-6,
        tolerances=(1e-2, 1e-3),
        repeats=1,
    ),
}


# ---------------------------------------------------------------------------------------------
# data: the four 2-D densities (after FFJORD's toy data), written here so nothing is downloaded
# ---------------------------------------------------------------------------------------------


def _rand(n: int, generator: Optional[torch.Generator], *shape) -> Tensor:
    return torch.rand(n, *shape, generator=generator)


def _randn(n: int, generator: Optional[torch.Generator], *shape) -> Tensor:
    return torch.randn(n, *shape, generator=generator)


def _pinwheel(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """Five curved arms: Gaussian blobs whose angle grows with the radius."""
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = torch.randint(arms, (n,), generator=generator)
    features = _randn(n, generator, 2) * torch.tensor([radial_std, tangential_std])
    features[:, 0] += 1.0
    angles = labels * (2 * math.pi / arms) + rate * features[:, 0].exp()
    cos, sin = angles.cos(), angles.sin()
    x = features[:, 0] * cos - features[:, 1] * sin
    y = features[:, 0] * sin + features[:, 1] * cos
    return 2.0 * torch.stack([x, y], 1)


def _rings(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """Four concentric circles of radii 0.75, 1.5, 2.25, 3 with a little Gaussian noise."""
    ring = torch.randint(4, (n,), generator=generator)
    radius = 0.75 * (ring + 1).to(torch.get_default_dtype())
    angle = 2 * math.pi * _rand(n, generator)
    points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
    return points + 0.08 * _randn(n, generator, 2)


def _checkerboard(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """Uniform on the black squares of a 4 x 4 board on [-4, 4]^2."""
    x1 = _rand(n, generator) * 4 - 2
    x2 = _rand(n, generator) - torch.randint(2, (n,), generator=generator) * 2
    x2 = x2 + torch.floor(x1) % 2
    return 2.0 * torch.stack([x1, x2], 1)


def _connected_circles(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """C.3's harder "circles": annuli of radii 1.25 and 3 joined by three curved spokes."""
    part = _rand(n, generator)
    angle = 2 * math.pi * _rand(n, generator)
    inner, outer = 1.25, 3.0
    radius = torch.where(part < 0.35, torch.full_like(angle, inner), torch.full_like(angle, outer))
    # the three connecting curves: radius runs from the inner to the outer annulus while the
    # angle turns by 60 degrees, starting at 90, 210 and 330 degrees
    spoke = part >= 0.75
    s = _rand(n, generator)
    start = torch.randint(3, (n,), generator=generator) * (2 * math.pi / 3) + math.pi / 2
    radius = torch.where(spoke, inner + (outer - inner) * s, radius)
    angle = torch.where(spoke, start + (math.pi / 3) * s, angle)
    points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
    return points + 0.08 * _randn(n, generator, 2)


_GENERATORS = {
    "pinwheel": _pinwheel,
    "rings": _rings,
    "checkerboard": _checkerboard,
    "connected_circles": _connected_circles,
}


def sample_density(name: str, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` samples ``(n, 2)`` of one of :data:`DENSITIES` (on the CPU)."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown density {name!r}; choose from {DENSITIES}")
    return _GENERATORS[name](n, generator)


def sample_base(n: int, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """``n`` samples ``(n, 2)`` of the standard-normal base distribution (the state at t=1)."""
    return torch.randn(n, 2, generator=generator).to(device or "cpu")


# ---------------------------------------------------------------------------------------------
# the model: a z-only vector field and the CNF that adds the exact trace
# ---------------------------------------------------------------------------------------------


class TimeMLP(nn.Module):
    """The z-only vector field ``f(t, z)``: an MLP on ``[z, t]`` (hidden 128-128-128, tanh).

    This is what sampling integrates (backwards) and what the hypersolver is fitted on.
    """

    def __init__(self, dim: int = 2, hidden: Sequence[int] = (128, 128, 128)):
        super().__init__()
        widths = [dim + 1, *hidden]
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.Tanh()]
        layers.append(nn.Linear(widths[-1], dim))
        self.net = nn.Sequential(*layers)

    def single(self, t: Tensor, z: Tensor) -> Tensor:
        """``f`` at one state ``z`` of shape ``(D,)`` (what ``jacrev`` differentiates)."""
        return self.net(torch.cat([z, t.reshape(1).to(z)]))

    def forward(self, t, z: Tensor) -> Tensor:
        t = t if isinstance(t, Tensor) else torch.tensor(float(t))
        return self.net(torch.cat([z, t.to(z).reshape(1, 1).expand(z.shape[0], 1)], 1))


class CNF(nn.Module):
    """The continuous normalizing flow: the augmented field ``[f(t, z), tr(df/dz)]`` on ``[z, delta]``.

    The trace is exact: the per-sample Jacobian ``df/dz`` (2 x 2) comes from
    ``vmap(jacrev(f.single))`` over the batch, and ``f`` itself is its auxiliary output, so
    one call gives both. ``nfe`` counts calls of the augmented field.
    """

    def __init__(self, vector_field: TimeMLP):
        super().__init__()
        self.vf = vector_field
        self.nfe = 0

    def forward(self, t, state: Tensor) -> Tensor:
        self.nfe += 1
        t = t if isinstance(t, Tensor) else torch.tensor(float(t))
        z = state[:, :-1]

        def value_and_aux(zi):
            out = self.vf.single(t, zi)
            return out, out

        jac, dz = torch.func.vmap(torch.func.jacrev(value_and_aux, has_aux=True))(z)
        trace = jac.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
        return torch.cat([dz, trace], 1)

    def log_prob(self, x: Tensor, atol: float = 1e-4, rtol: float = 1e-4) -> Tensor:
        """``log p(x)`` per sample: integrate ``[x, 0]`` from t=0 to t=1 with dopri5;
        ``log p(x) = log N(z(1)) + delta(1)``."""
        import torchdiffeq

        state0 = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        t = torch.tensor([0.0, 1.0], device=x.device, dtype=x.dtype)
        state1 = torchdiffeq.odeint(self, state0, t, method="dopri5", atol=atol, rtol=rtol)[-1]
        z1, delta = state1[:, :-1], state1[:, -1]
        log_base = -0.5 * z1.square().sum(1) - 0.5 * z1.shape[1] * math.log(2 * math.pi)
        return log_base + delta


def train_cnf(
    density: str,
    iterations: int = 300,
    device="cpu",
    progress: bool = True,
    batch_size: int = 384,
    lr: float = 3e-3,
    lr_min: Optional[float] = 1e-4,
    tol: float = 1e-4,
    seed: int = 0,
) -> Tuple[TimeMLP, CNF]:
    """Train a CNF by maximum likelihood on ``density`` with dopri5 (atol = rtol = ``tol``),
    backpropagating through the solver. Returns ``(vector_field, cnf)``: the z-only field
    (to sample and to fit a hypersolver on) and the CNF around it; ``cnf.history`` holds the
    NLL per iteration and ``cnf.nfe_last`` the augmented-field evaluations of the last solve."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    vf = TimeMLP().to(device)
    cnf = CNF(vf).to(device)
    nfe = []

    def loss_fn(_):
        x = sample_density(density, batch_size, generator).to(device)
        start = cnf.nfe
        loss = -cnf.log_prob(x, tol, tol).mean()
        nfe.append(cnf.nfe - start)
        return loss

    cnf.train()
    cnf.history = train(
        loss_fn, cnf.parameters(), iterations, lr=lr, lr_min=lr_min, desc=f"training CNF ({density})", progress=progress
    )
    cnf.nfe_last = nfe[-1] if nfe else 0
    cnf.eval()
    return vf, cnf


# ---------------------------------------------------------------------------------------------
# sampling and the hypersolver
# ---------------------------------------------------------------------------------------------


def harvest_backward(
    vector_field: nn.Module,
    z1: Tensor,
    steps: Sequence[int] = (2, 4, 8, 16),
    atol: float = 1e-6,
    rtol: float = 1e-6,
) -> Trajectories:
    """Backward trajectories (base at t=1 -> data at t=0) of the z-only field, solved with
    dopri5 and kept on the uniform meshes with ``steps`` steps."""
    t_span = torch.tensor(BACKWARD, device=z1.device)
    return harvest(vector_field, z1, t_span, steps=list(steps), reference="dopri5", atol=atol, rtol=rtol)


def fit_hyperheun(
    vector_field: nn.Module,
    trajectories: Optional[Trajectories] = None,
    n_trajectories: int = 1024,
    steps: Sequence[int] = (2, 4, 8, 16),
    iterations: int = 2000,
    hidden: Sequence[int] = (64, 64),
    lr: float = 5e-3,
    weight_decay: float = 1e-6,
    swap_every: int = 100,
    batch_size: int = 256,
    device="cpu",
    progress: bool = True,
    seed: int = 0,
) -> Tuple[HyperHeun, FitReport]:
    """Fit ``HyperHeun(MLPHyperNet(2, hidden))`` on backward trajectories by residual fitting
    (C.3's AdamW lr 5e-3, weight decay 1e-6, a new batch every ``swap_every`` iterations).
    Harvests ``n_trajectories`` from base samples first when ``trajectories`` is None."""
    device = torch.device(device)
    if trajectories is None:
        z1 = sample_base(n_trajectories, torch.Generator().manual_seed(seed + 1), device)
        trajectories = harvest_backward(vector_field, z1, steps)
    torch.manual_seed(seed)
    hs = HyperHeun(MLPHyperNet(2, hidden=hidden)).to(device)
    report = fit(
        hs,
        trajectories,
        method="residual",
        iterations=iterations,
        batch_size=min(batch_size, len(trajectories)),
        lr=lr,
        weight_decay=weight_decay,
        swap_every=swap_every,
        progress=progress,
        seed=seed,
        device=device,
    )
    hs.eval()
    return hs, report


def sample_backward(vector_field: nn.Module, z1: Tensor, solver, steps: Optional[int] = None, tol: float = 1e-5):
    """Samples ``z(0)`` from base samples ``z1``: ``solver`` is ``'dopri5'`` (torchdiffeq, atol =
    rtol = ``tol``) or a fixed-step (hyper)solver module run for ``steps`` uniform steps."""
    with torch.no_grad():
        if solver == "dopri5":
            import torchdiffeq

            t = torch.tensor(BACKWARD, device=z1.device, dtype=z1.dtype)
            return torchdiffeq.odeint(vector_field, z1, t, method="dopri5", atol=tol, rtol=tol)[-1]
        t_span = torch.linspace(BACKWARD[0], BACKWARD[1], steps + 1, device=z1.device, dtype=z1.dtype)
        return solver.solve(vector_field, z1, t_span, return_trajectory=False)


def sample_error_sweep(
    vector_field: nn.Module,
    hs: HyperHeun,
    z1: Tensor,
    steps: Sequence[int] = (2, 4, 8, 16),
    tolerances: Sequence[float] = (1e-2, 1e-3, 1e-4),
    reference_tol: float = 1e-7,
    repeats: int = 5,
):
    """``pareto`` on the backward sampling ODE: HyperHeun, Heun, Euler, Midpoint, RK4 at
    ``steps`` and dopri5 at ``tolerances``, against dopri5 at ``reference_tol``. The rows are
    labelled ``'HyperHeun'``, the classical solvers' class names and ``'dopri5'``."""
    return pareto(
        vector_field,
        z1,
        torch.tensor(BACKWARD, device=z1.device),
        solvers={"HyperHeun": hs, **{solver.__name__: solver() for solver in CLASSICAL}, "dopri5": "dopri5"},
        steps=steps,
        tolerances=tolerances,
        reference="dopri5",
        reference_tol=reference_tol,
        repeats=repeats,
    )


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def plot_samples(panels: Dict[str, Tensor], path: str, lim: float = 4.5) -> str:
    """One scatter per panel (title -> samples ``(N, 2)``), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, points) in zip(axes, panels.items()):
        points = points.detach().cpu()
        ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.4, color="tab:blue", rasterized=True)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_nfe(result, path: str, title: str = "") -> str:
    """Sample error (mean |z_solver(0) - z_dopri5(0)|, pareto's ``terminal_error``) against NFE,
    one line per solver: :func:`~torchdyn_hypersolvers.plots.plot_pareto` on an axis, with NFE ticks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    plot_pareto(result, cost="nfe", error="terminal_error", ax=ax, front=False)
    ax.set_xticks(sorted({r.nfe for r in result}))
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_ylabel("sample error: mean |z(0) - z_dopri5(0)|")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the tutorial
# ---------------------------------------------------------------------------------------------


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


def run_density(density: str, cfg: dict, out: str, device, seed: int = 0, progress: bool = True) -> dict:
    """Train, harvest, fit, evaluate and plot one density; the numbers for ``summary.json``."""
    os.makedirs(out, exist_ok=True)
    with Timer() as total:
        with Timer() as t_train:
            vf, cnf = train_cnf(
                density,
                cfg["iterations"],
                device,
                progress,
                batch_size=cfg["batch_size"],
                lr=cfg["lr"],
                lr_min=cfg["lr_min"],
                tol=cfg["tol"],
                seed=seed,
            )
        for p in vf.parameters():
            p.requires_grad_(False)
        held_out = torch.Generator().manual_seed(seed + 10_000)  # never seen by training or fitting
        x_test = sample_density(density, cfg["n_eval"], held_out).to(device)
        with torch.no_grad():
            test_nll = -cnf.log_prob(x_test, cfg["tol"], cfg["tol"]).mean().item()

        with Timer() as t_harvest:
            z1_fit = sample_base(cfg["harvest"], torch.Generator().manual_seed(seed + 1), device)
            trajectories = harvest_backward(vf, z1_fit, cfg["steps"], cfg["harvest_tol"], cfg["harvest_tol"])
        with Timer() as t_fit:
            hs, report = fit_hyperheun(
                vf,
                trajectories,
                iterations=cfg["fit_iterations"],
                hidden=cfg["hidden"],
                swap_every=cfg["swap_every"],
                batch_size=cfg["fit_batch"],
                device=device,
                progress=progress,
                seed=seed,
            )

        z1_eval = sample_base(cfg["n_eval"], held_out, device)
        with Timer() as t_eval:
            result = sample_error_sweep(
                vf, hs, z1_eval, cfg["steps"], cfg["tolerances"], cfg["reference_tol"], cfg["repeats"]
            )
        pareto_paths = result.save(out)

        k = cfg["figure_steps"]
        panels = {
            "data (held out)": x_test,
            "dopri5 (tol 1e-5)": sample_backward(vf, z1_eval, "dopri5"),
            f"HyperHeun, {k} steps (NFE {2 * k})": sample_backward(vf, z1_eval, hs, k),
            f"Heun, {k} steps (NFE {2 * k})": sample_backward(vf, z1_eval, hs.base_solver, k),
        }
        figures = {
            "samples": plot_samples(panels, os.path.join(out, "samples.png")),
            "error_vs_nfe": plot_error_vs_nfe(
                result, os.path.join(out, "error_vs_nfe.png"), title=f"{density}: sampling t = 1 -> 0"
            ),
            **{key: path for key, path in pareto_paths.items() if key.startswith("png")},
        }

    sample_error: Dict[str, Dict[str, Optional[float]]] = {}
    for r in result:
        if r.kind != "adaptive":
            sample_error.setdefault(r.solver, {})[str(r.nfe)] = _finite(r.terminal_error)
    fitted = {}
    for n in cfg["steps"]:
        hh, he = result.row("HyperHeun", steps=n), result.row("Heun", steps=n)
        fitted[str(hh.nfe)] = {
            "steps": n,
            "HyperHeun": _finite(hh.terminal_error),
            "Heun": _finite(he.terminal_error),
            "ratio": _finite(hh.terminal_error / he.terminal_error) if he.terminal_error > 0 else None,
        }
    return {
        "train_seconds": t_train.seconds,
        "harvest_seconds": t_harvest.seconds,
        "fit_seconds": t_fit.seconds,
        "eval_seconds": t_eval.seconds,
        "total_seconds": total.seconds,
        "train_iterations": cfg["iterations"],
        "train_final_nll": _finite(sum(cnf.history[-10:]) / len(cnf.history[-10:])),
        "test_nll": _finite(test_nll),
        "train_nfe_last": cnf.nfe_last,
        "fit_iterations": report.iterations,
        "fit_final_loss": _finite(report.loss_history[-1]),
        "fit_residual_error": {str(n): _finite(v) for n, v in report.residual_error.items()},
        "fit_base_residual_error": {str(n): _finite(v) for n, v in report.base_residual_error.items()},
        "steps": list(cfg["steps"]),
        "sample_error": sample_error,
        "sample_error_fitted": fitted,
        "dopri5": [
            {"tol": r.tol, "nfe": r.nfe, "sample_error": _finite(r.terminal_error)}
            for r in result
            if r.kind == "adaptive"
        ],
        "figures": figures,
        "tables": {key: path for key, path in pareto_paths.items() if not key.startswith("png")},
        "pareto_markdown": result.to_markdown(),
    }


def _summary_line(name: str, res: dict) -> str:
    parts = [
        f"NFE {nfe}: HyperHeun {v['HyperHeun']:.3g} vs Heun {v['Heun']:.3g}"
        for nfe, v in res["sample_error_fitted"].items()
    ]
    return (
        f"{name}: train {res['train_seconds']:.1f} s (test NLL {res['test_nll']:.3f} nats), "
        f"fit {res['fit_seconds']:.1f} s; sample error " + "; ".join(parts)
    )


def main(argv=None):
    p = parser(__doc__, "cnf_density", threads=1)
    p.add_argument("--density", default="pinwheel", choices=[*DENSITIES, "all"], help="which density (or all four)")
    p.add_argument("--iterations", type=int, help="CNF training iterations (overrides the default)")
    p.add_argument("--fit-iterations", type=int, help="hypersolver fitting iterations (overrides the default)")
    args = p.parse_args(argv)
    device = setup(args)
    cfg = dict(CONFIGS["quick" if args.quick else "full"])
    if args.iterations is not None:
        cfg["iterations"] = args.iterations
    if args.fit_iterations is not None:
        cfg["fit_iterations"] = args.fit_iterations
    densities = DENSITIES if args.density == "all" else (args.density,)
    progress = not args.no_progress

    summary = {
        "mode": "quick" if args.quick else "full",
        "device": str(device),
        "seed": args.seed,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "error": "mean Euclidean distance |z_solver(0) - z_dopri5(0)| of samples from held-out base noise, "
        f"against dopri5 at atol = rtol = {cfg['reference_tol']:g}",
        "densities": {},
    }
    with Timer() as total:
        for name in densities:
            res = run_density(name, cfg, os.path.join(args.out, name), device, args.seed, progress)
            summary["densities"][name] = res
            print(res.pop("pareto_markdown"))
            print(_summary_line(name, res))
    summary["total_seconds"] = total.seconds
    path = write_json(args.out, "summary.json", summary)
    print(f"results in {os.path.abspath(args.out)} (summary: {path}); total {total.seconds:.1f} s")
    return summary


if __name__ == "__main__":
    main()
