"""Quickstart: make a trained Neural ODE fast with a fitted HyperEuler, and prove it.

Trains a small Neural ODE classifier on torchdyn's moons (with dopri5), harvests
dopri5 trajectories from it, fits one HyperEuler g (an MLP of two 64-wide layers) for 4,
8 and 16 steps, and prints the Pareto table against Euler, Midpoint, Heun, RK4 and dopri5
on held-out inputs.
The table, the three figures (terminal error vs NFE, MACs, wall-clock) and summary.json go
to the results folder whose path is printed. This is what ``make demo`` runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchdyn.core import NeuralODE  # noqa: E402
from torchdyn.datasets import ToyDataset  # noqa: E402

from examples.common import FinalState, Timer, parser, setup, train, write_json  # noqa: E402
from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit, harvest, pareto, plot_pareto  # noqa: E402

STEPS = [4, 8, 16]


def moons_classifier(device) -> nn.Sequential:
    """A NeuralODE classifier of the 2-D moons: f is an MLP 2-64-64-2."""
    f = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    node = NeuralODE(f, solver="dopri5", atol=1e-4, rtol=1e-4, return_t_eval=False)
    return nn.Sequential(node, FinalState(), nn.Linear(2, 2)).to(device)


def train_moons(n_train: int, iterations: int, device, progress: bool = True):
    """Train the moons classifier with dopri5: ``(model, (X_train, y_train), (X_test, y_test), accuracy)``."""
    X, y = ToyDataset().generate(n_samples=n_train + 512, dataset_type="moons", noise=0.1)
    order = torch.randperm(len(X))  # the generator returns the classes in blocks
    X, y = X[order].to(device), y[order].long().to(device)
    X_train, y_train, X_test, y_test = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    model = moons_classifier(device)

    def loss(_):
        idx = torch.randint(0, n_train, (128,), device=device)
        return nn.functional.cross_entropy(model(X_train[idx]), y_train[idx])

    train(loss, model.parameters(), iterations, lr=1e-2, desc="training the Neural ODE", progress=progress)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(X_test).argmax(1) == y_test).float().mean() * 100)
    return model, (X_train, y_train), (X_test, y_test), accuracy


def main(argv=None):
    args = parser(__doc__, "quickstart").parse_args(argv)
    device = setup(args)
    progress = not args.no_progress
    n_train, iterations, fit_iterations = (512, 60, 150) if args.quick else (2048, 400, 2000)
    with Timer() as t_train:
        model, (X_train, _), (X_test, y_test), accuracy = train_moons(n_train, iterations, device, progress)

    with Timer() as t_harvest:
        trajectories = harvest(model, X_train, torch.linspace(0, 1, 2), steps=STEPS, device=device)
    torch.manual_seed(args.seed)  # g's initialisation: the same whatever training drew before it
    hs = HyperEuler(MLPHyperNet(2, hidden=(64, 64)))  # tune's default g: a 32x2 one learns the residual less well
    report = fit(hs, trajectories, iterations=fit_iterations, progress=progress, seed=args.seed, device=device)

    result = pareto(
        model,
        X_test,
        torch.linspace(0, 1, 2),
        solvers=[hs, "euler", "midpoint", "heun", "rk4", "dopri5"],
        steps=STEPS,
        tolerances=[1e-2, 1e-3, 1e-4],
        labels=y_test,
        repeats=3 if args.quick else 7,
    )
    paths = result.save(args.out, plots=False)
    title = (
        f"Moons Neural ODE classifier (f: MLP 2-64-64-2), {len(X_test)} held-out test inputs\n"
        "terminal error against a tight dopri5 solve"
    )
    for cost in ("nfe", "macs", "wall_ms"):  # the error the printed lines compare: the mean L2 norm
        png = Path(args.out) / f"pareto_{cost}.png"
        paths[f"png_{cost}"] = plot_pareto(result, png, cost=cost, error="terminal_error", title=title)
    summary = {
        "dopri5_test_accuracy": accuracy,
        "train_s": t_train.seconds,
        "harvest_s": t_harvest.seconds,
        "fit_s": report.wall_time,
        "fit": report.summary(),
        "held_out_terminal_error": {
            str(n): {name: result.row(name, steps=n).terminal_error for name in ("HyperEuler", "euler")} for n in STEPS
        },
        "paths": paths,
    }
    write_json(args.out, "summary.json", summary)
    print(result.to_markdown())
    print(
        f"Neural ODE test accuracy (dopri5): {accuracy:.1f}%; harvest {t_harvest.seconds:.1f} s, "
        f"fit {report.wall_time:.1f} s"
    )
    for n in STEPS:
        h, e = result.row("HyperEuler", steps=n).terminal_error, result.row("euler", steps=n).terminal_error
        print(f"{n:>2} steps: terminal error HyperEuler {h:.3g} vs Euler {e:.3g} ({e / h:.0f}x smaller)")
    print(f"results: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
