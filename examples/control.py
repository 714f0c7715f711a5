"""Control: train a neural controller of a pendulum through a fitted HyperEuler.

A torque-limited pendulum is steered to a target angle by a digital controller: every
``DT`` seconds it reads the state and holds its torque for one interval (a zero-order hold,
the control carried in the state: ``torchdyn_hypersolvers.control``). HyperEuler's g reads
the control; it is fitted once, on one-interval dopri5 solves from (state, control) pairs of
a distribution of controls (uniform samples and the pairs visited by random controllers).
The same controller is then trained through dopri5, RK4, Midpoint, Euler and HyperEuler
(one step per control interval for the fixed-step solvers), and every trained controller is
evaluated in closed loop with an accurate dopri5 solve. The table, summary.json and a
figure of the closed-loop trajectories go to the results folder whose path is printed.
"""

import copy
import functools
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from examples.common import Timer, parser, setup, tqdm, write_json  # noqa: E402
from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit, harvest  # noqa: E402
from torchdyn_hypersolvers.control import ControlledSystem, rollout  # noqa: E402

DT = 0.1  # the control interval (s): one solver step per interval
Q_TARGET = math.pi / 2  # the target angle (rad)
U_MAX = 15.0  # the torque limit (holding q* = pi/2 takes 10.6)
BOX = (4.0, 10.0)  # g is fitted for |q| <= 4 rad, |p| <= 10 rad/s (and |u| <= U_MAX)
STAGES = {"euler": 1, "midpoint": 2, "rk4": 4, "HyperEuler": 1}


class Pendulum(nn.Module):
    """``dq = p``, ``dp = -k q - (g / l) sin q - beta p + u`` (torchdyn's m4b pendulum, m = l = 1);
    ``nfe`` counts evaluations."""

    def __init__(self, k: float = 0.5, gravity: float = 9.81, beta: float = 0.01):
        super().__init__()
        self.k, self.gravity, self.beta, self.nfe = k, gravity, beta, 0

    def forward(self, t, x, u):
        self.nfe += 1
        q, p = x[..., :1], x[..., 1:]
        return torch.cat([p, -self.k * q - self.gravity * torch.sin(q) - self.beta * p + u], dim=-1)


class Controller(nn.Module):
    """``u = U_MAX tanh(net(q - q*, p))``: an MLP 2-32-32-1 of the state."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, t, x):
        return U_MAX * torch.tanh(self.net(torch.cat([x[..., :1] - Q_TARGET, x[..., 1:]], dim=-1)))


def control_cost(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Mean over the horizon and the batch of ``(q - q*)^2 + 0.1 p^2 + 1e-3 u^2`` at the control instants."""
    q, p = x[1:, :, :1], x[1:, :, 1:]
    return ((q - Q_TARGET).square() + 0.1 * p.square()).mean() + 1e-3 * u.square().mean()


def initial_states(n: int, generator: torch.Generator) -> torch.Tensor:
    """Angles uniform in [-pi, pi], velocities uniform in [-2, 2]."""
    return torch.rand(n, 2, generator=generator) * torch.tensor([2 * math.pi, 4.0]) - torch.tensor([math.pi, 2.0])


def control_pairs(system, n_uniform: int, n_random_controllers: int, horizon, generator) -> torch.Tensor:
    """The distribution of controls g is fitted on, as states ``[q, p, u]``: uniform samples of
    the box the closed loop visits, and the pairs in it visited by randomly initialised controllers."""
    half = torch.tensor([BOX[0], BOX[1], U_MAX])
    pairs = [(torch.rand(n_uniform, 3, generator=generator) * 2 - 1) * half]
    with torch.no_grad():
        for _ in range(n_random_controllers):
            pi = Controller()
            for p in pi.parameters():
                p.mul_(2.0)  # livelier than a default initialisation
            visited = rollout("rk4", system, pi, initial_states(64, generator), horizon).pairs()
            pairs.append(visited[(visited.abs() <= half).all(1)])  # within the box
    return torch.cat(pairs)


def one_interval_errors(hs, system, pairs: torch.Tensor) -> dict:
    """Mean ``|x(DT) - x_ref(DT)|`` over one control interval from held-out (state, control) pairs."""
    t1 = torch.tensor([0.0, DT])
    with torch.no_grad():
        ref = rollout("dopri5", system, pairs[:, 2:].double(), pairs[:, :2].double(), t1, atol=1e-10, rtol=1e-10)
        runs = {
            "HyperEuler (1 step, 1 NFE)": (hs, 1),
            "Euler (1 step, 1 NFE)": ("euler", 1),
            "HyperEuler (2 steps, 2 NFE)": (hs, 2),
            "Euler (2 steps, 2 NFE)": ("euler", 2),
            "Midpoint (1 step, 2 NFE)": ("midpoint", 1),
            "RK4 (1 step, 4 NFE)": ("rk4", 1),
        }
        errors = {}
        for name, (solver, substeps) in runs.items():
            x = rollout(solver, system, pairs[:, 2:], pairs[:, :2], t1, substeps=substeps).x[-1]
            errors[name] = float((x.double() - ref.x[-1]).norm(dim=-1).mean())
    return errors


def main(argv=None):
    args = parser(__doc__, "control", threads=1).parse_args(argv)
    device = setup(args)
    progress = not args.no_progress
    quick = args.quick
    horizon_s = 1.5 if quick else 3.0
    n_uniform, n_random, fit_iterations = (1024, 1, 400) if quick else (8192, 8, 3000)
    batch, iterations, n_eval = (16, 20, 32) if quick else (64, 200, 256)
    gen = torch.Generator().manual_seed(args.seed)
    horizon = torch.arange(0, round(horizon_s / DT) + 1) * DT
    dynamics = Pendulum()
    system = ControlledSystem(dynamics, control_dim=1)

    # 1. fit HyperEuler's g across a distribution of (state, control) pairs
    hs = HyperEuler(MLPHyperNet(3, hidden=(32, 32), control_dim=1))
    with Timer() as t_harvest:
        pairs = control_pairs(system, n_uniform, n_random, horizon, gen)
        trajectories = harvest(system, pairs.to(device), torch.tensor([0.0, DT]), steps=[1, 2], base=hs)
    report = fit(hs, trajectories, iterations=fit_iterations, batch_size=512, progress=progress, seed=args.seed,
                 device=device)
    held_out = control_pairs(system, n_uniform // 4, 2, horizon, gen).to(device)
    errors = one_interval_errors(hs, system, held_out)

    # 2. train the same controller through each solver
    x_train, x_eval = initial_states(batch, gen).to(device), initial_states(n_eval, gen).to(device)
    init = Controller().to(device)
    solvers = {"dopri5": "dopri5", "rk4": "rk4", "midpoint": "midpoint", "euler": "euler", "HyperEuler": hs}
    controllers = {name: copy.deepcopy(init) for name in solvers}

    def training_loss(solver, pi):
        ro = rollout(solver, system, pi, x_train, horizon, atol=1e-5, rtol=1e-5)
        return control_cost(ro.x, ro.u)

    losses = {name: functools.partial(training_loss, solver, controllers[name]) for name, solver in solvers.items()}
    times, final_loss = train_interleaved(losses, controllers, iterations, progress)
    results = {}
    for name, solver in solvers.items():
        pi = controllers[name]
        with torch.no_grad():
            dynamics.nfe = 0
            rollout(solver, system, pi, x_train, horizon, atol=1e-5, rtol=1e-5)
            nfe = dynamics.nfe
            accurate = rollout("dopri5", system, pi, x_eval, horizon, atol=1e-8, rtol=1e-8)
        results[name] = {"train_s": sum(times[name]), "median_iteration_ms": 1e3 * statistics.median(times[name]),
                         "nfe_per_rollout": nfe, "final_training_loss": final_loss[name],
                         "closed_loop_cost": float(control_cost(accurate.x, accurate.u))}
    ref_cost, ref_time = results["dopri5"]["closed_loop_cost"], results["dopri5"]["train_s"]
    for r in results.values():
        r["speedup_vs_dopri5"] = ref_time / r["train_s"]
        r["median_iteration_speedup_vs_dopri5"] = results["dopri5"]["median_iteration_ms"] / r["median_iteration_ms"]
        r["cost_vs_dopri5"] = r["closed_loop_cost"] / ref_cost
    with torch.no_grad():  # the pairs the dopri5-trained controller visits: held out too
        visited = rollout("dopri5", system, controllers["dopri5"], x_eval, horizon, atol=1e-8, rtol=1e-8).pairs()
    errors_visited = one_interval_errors(hs, system, visited)

    # 3. the table, the figure, the summary
    lines = ["| trained through | NFE per rollout | training (s) | speed-up vs dopri5 | median iteration (ms) "
             "| speed-up (median) | closed-loop cost | vs dopri5's |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['nfe_per_rollout']} | {r['train_s']:.1f} | {r['speedup_vs_dopri5']:.1f}x | "
                     f"{r['median_iteration_ms']:.1f} | {r['median_iteration_speedup_vs_dopri5']:.1f}x | "
                     f"{r['closed_loop_cost']:.4f} | {r['cost_vs_dopri5']:.3f} |")
    lines += ["", "| one control interval | error (held-out pairs) | error (pairs of the trained loop) |",
              "|---|---|---|"]
    for name in errors:
        lines.append(f"| {name} | {errors[name]:.2e} | {errors_visited[name]:.2e} |")
    table = "\n".join(lines)
    (Path(args.out) / "table.md").write_text(table + "\n")
    figure = plot_closed_loop(controllers, system, x_eval[:4], horizon, Path(args.out) / "closed_loop.png")
    he, rk4 = results["HyperEuler"], results["rk4"]
    summary = {
        "dt": DT, "horizon_s": horizon_s, "iterations": iterations, "batch": batch, "quick": quick,
        "harvest_s": t_harvest.seconds, "fit_s": report.wall_time, "fit": report.summary(),
        "controllers": results,
        "one_interval_error": errors,
        "one_interval_error_visited": errors_visited,
        "hypereuler_vs_midpoint_error_at_2_nfe":
            errors["HyperEuler (2 steps, 2 NFE)"] / errors["Midpoint (1 step, 2 NFE)"],
        "hypereuler_nfe_vs_rk4": he["nfe_per_rollout"] / rk4["nfe_per_rollout"],
        "hypereuler_cost_vs_rk4": he["closed_loop_cost"] / rk4["closed_loop_cost"],
        "paths": {"table": str(Path(args.out) / "table.md"), "figure": figure},
    }
    write_json(args.out, "summary.json", summary)
    print(table)
    print(f"HyperEuler: training {he['speedup_vs_dopri5']:.1f}x faster than through dopri5 (median iteration "
          f"{he['median_iteration_speedup_vs_dopri5']:.1f}x), closed-loop cost "
          f"{he['cost_vs_dopri5']:.3f}x dopri5's and {summary['hypereuler_cost_vs_rk4']:.3f}x RK4's at "
          f"{summary['hypereuler_nfe_vs_rk4']:.2f}x RK4's NFE")
    print(f"results: {Path(args.out).resolve()}")


def train_interleaved(losses, controllers, iterations: int, progress: bool, block: int = 10):
    """Adam (cosine annealing from 1e-2 to 1e-3) on each solver's loss, in rounds of ``block``
    iterations of each solver in turn, so that other jobs on the machine slow every solver alike
    (and one solver's run of iterations is not interrupted at every step). Each one's own seconds
    (the rollout, its backward pass and the optimiser step) are kept per iteration, with its last loss."""
    opts = {name: torch.optim.Adam(controllers[name].parameters(), lr=1e-2) for name in losses}
    scheds = {name: torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=1e-3)
              for name, opt in opts.items()}
    times, last = {name: [] for name in losses}, {}
    bar = tqdm(total=iterations * len(losses), desc="training the controllers", leave=False) if (
        progress and tqdm is not None) else None
    for first in range(0, iterations, block):
        for name, loss_fn in losses.items():
            for _ in range(min(block, iterations - first)):
                start = time.perf_counter()
                loss = loss_fn()
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
                scheds[name].step()
                last[name] = loss.item()  # waits for an accelerator: the time is the step's
                times[name].append(time.perf_counter() - start)
                if bar is not None:
                    bar.update()
                    bar.set_postfix(solver=name, loss=f"{last[name]:.3g}", refresh=False)
    if bar is not None:
        bar.close()
    return times, last


def plot_closed_loop(controllers, system, x0, horizon, path) -> str:
    """q(t) and u(t) of each trained controller from a few initial states, solved with dopri5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_u) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = dict(zip(controllers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    with torch.no_grad():
        for name, pi in controllers.items():
            ro = rollout("dopri5", system, pi, x0, horizon, atol=1e-8, rtol=1e-8)
            ro = type(ro)(ro.t.cpu(), ro.x.cpu(), ro.u.cpu())
            t = ro.t.numpy()
            for i in range(x0.shape[0]):
                label = name if i == 0 else None
                ax_q.plot(t, ro.x[:, i, 0].numpy(), color=colors[name], lw=1.2, alpha=0.8, label=label)
                ax_u.step(t[:-1], ro.u[:, i, 0].numpy(), where="post", color=colors[name], lw=1.0, alpha=0.8)
    ax_q.axhline(Q_TARGET, color="k", ls=":", lw=1)
    ax_q.set(xlabel="t (s)", ylabel="angle q (rad)", title="closed loop (dopri5), by training solver")
    ax_u.set(xlabel="t (s)", ylabel="torque u (held per interval)")
    ax_q.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    main()
