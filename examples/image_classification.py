"""Image classification with a Neural ODE, made fast with HyperEuler (supplement C.2).

Trains the supplement's convolutional Neural ODE classifier with dopri5 (BatchNorm,
an input-augmenting conv, a conv f with Softplus, then pooling and a linear head),
harvests dopri5 trajectories from it, and fits a HyperEuler whose g is written like
the paper's (a small PReLU CNN on the concatenation [z, f(z), dt]) by the
supplement's recipe: AdamW, lr 1e-2 -> 5e-4 cosine, warm-up on one batch, then a new
batch every 10 iterations. It reports terminal MAPE and test-accuracy decrement
against the reference per NFE (the Pareto table and figures), and the paper's
per-mesh-point absolute-error picture for HyperEuler and Euler.

Data: scikit-learn's bundled 8x8 digits by default (offline; the architecture is scaled
to 16 channels). ``--dataset mnist --data-dir DIR`` and ``--dataset cifar10 --data-dir
DIR`` use torchvision's readers on local files with the supplement's full-size
architectures; nothing is ever downloaded, and a missing data set stops the run at once
with a message saying where the files were looked for.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from torchdyn.core import NeuralODE  # noqa: E402
from torchdyn.nn import Augmenter  # noqa: E402

from examples.common import FinalState, Timer, parser, setup, train, write_json  # noqa: E402
from torchdyn_hypersolvers import (  # noqa: E402
    Euler,
    HyperEuler,
    fit,
    harvest,
    pareto,
)
from torchdyn_hypersolvers.metrics import absolute_error  # noqa: E402
from torchdyn_hypersolvers.plots import plot_mesh_error  # noqa: E402

# per data set: input and state channels, f's and g's hidden channels, pooling, head input.
# g costs about 80% of f per call, as in the supplement's MNIST pair (f 32-46-46-32, g 65-32-32-32).
ARCHITECTURES = {
    "digits": dict(c_in=1, c=16, hidden=24, g_hidden=16, pool=nn.AvgPool2d(8), head_in=16, augment="augmenter"),
    "mnist": dict(c_in=1, c=32, hidden=46, g_hidden=32, pool=nn.AvgPool2d(28), head_in=32, augment="augmenter"),
    "cifar10": dict(c_in=3, c=20, hidden=50, g_hidden=32, pool=nn.AdaptiveAvgPool2d(2), head_in=80, augment="conv"),
}
MISSING = (
    "{name} was not found under {root!r}: this example never downloads data. Put torchvision's {name} "
    "files there (e.g. {example}) or run without --dataset to use scikit-learn's bundled digits."
)


class DataSetMissing(SystemExit):
    """Raised (exit status 2) when a local data set is absent."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def load_digits(device):
    """scikit-learn's 8x8 digits as (train, test) tensors, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X))
    X, y = X[order].to(device), y[order].to(device)
    n = int(0.8 * len(X))
    return (X[:n], y[:n]), (X[n:], y[n:])


def load_torchvision(name: str, root: str, device, limit: int):
    """MNIST or CIFAR10 from local files only, as (train, test) tensors."""
    import torchvision
    from torchvision import transforms

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    example = {"mnist": f"{root}/MNIST/raw/train-images-idx3-ubyte", "cifar10": f"{root}/cifar-10-batches-py"}[name]
    try:
        sets = [cls(root, train=split, download=False, transform=transforms.ToTensor()) for split in (True, False)]
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataSetMissing(MISSING.format(name=name.upper(), root=root, example=example)) from err
    out = []
    for data in sets:
        X, y = next(iter(DataLoader(data, batch_size=min(limit, len(data)), shuffle=True)))
        out.append((X.to(device), y.to(device)))
    return out


def build(dataset: str, device):
    """The supplement's classifier and HyperEuler g for ``dataset``: ``(model, g)``."""
    a = ARCHITECTURES[dataset]
    c, h, gh = a["c"], a["hidden"], a["g_hidden"]
    f = nn.Sequential(
        nn.Conv2d(c, h, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(h, h, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(h, c, 3, padding=1),
    )
    node = NeuralODE(f, solver="dopri5", atol=1e-4, rtol=1e-4, return_t_eval=False)
    augment = (
        Augmenter(augment_func=nn.Conv2d(a["c_in"], c - a["c_in"], 3, padding=1))
        if a["augment"] == "augmenter"
        else nn.Conv2d(a["c_in"], c, 3, padding=1)
    )
    model = nn.Sequential(
        nn.BatchNorm2d(a["c_in"]), augment, node, FinalState(), a["pool"], nn.Flatten(), nn.Linear(a["head_in"], 10)
    )
    # g as written in the supplement: a PReLU CNN on cat([z, f(z), dt]) ('concat' convention)
    g = nn.Sequential(
        nn.Conv2d(c + c + 1, gh, 3, padding=1),
        nn.PReLU(),
        nn.Conv2d(gh, gh, 3, padding=1),
        nn.PReLU(),
        nn.Conv2d(gh, c, 3, padding=1),
    )
    nn.init.zeros_(g[-1].weight)
    nn.init.zeros_(g[-1].bias)  # start as plain Euler
    return model.to(device), g.to(device)


def train_classifier(model, X, y, epochs: int, batch_size: int = 32, progress: bool = True):
    """The supplement's recipe: Adam, cosine annealing to 1e-4, batch size 32."""
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    batches = iter(())

    def loss(_):
        nonlocal batches
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        return nn.functional.cross_entropy(model(xb), yb)

    model.train()
    losses = train(
        loss,
        model.parameters(),
        epochs * len(loader),
        lr=3e-3,
        lr_min=1e-4,
        desc="training with dopri5",
        progress=progress,
    )
    model.eval()
    return losses


def fit_hypereuler(model, g, X_train, steps, iterations, device, progress=True, seed=0, max_trajectories=None):
    """Harvest dopri5 (atol = rtol = 1e-4, as in C.2) trajectories and fit HyperEuler."""
    with Timer() as t:
        loader = DataLoader(X_train, batch_size=256)
        trajectories = harvest(
            model,
            loader,
            torch.linspace(0, 1, 2),
            steps=steps,
            atol=1e-4,
            rtol=1e-4,
            max_trajectories=max_trajectories,
            device=device,
        )
    hs = HyperEuler(g)
    report = fit(hs, trajectories, iterations=iterations, batch_size=32, progress=progress, seed=seed, device=device)
    return hs, report, t.seconds


def main(argv=None):
    p = parser(__doc__, "image_classification")
    p.add_argument("--dataset", choices=sorted(ARCHITECTURES), default="digits")
    p.add_argument("--data-dir", default="data", help="local folder with torchvision's files (mnist, cifar10)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--fit-iterations", type=int, default=None)
    args = p.parse_args(argv)
    device = setup(args)
    progress = not args.no_progress
    limit = 512 if args.quick else 60000
    if args.dataset == "digits":
        (X_train, y_train), (X_test, y_test) = load_digits(device)
    else:
        (X_train, y_train), (X_test, y_test) = load_torchvision(args.dataset, args.data_dir, device, limit)
    if args.quick:  # seconds: a slice of the data, one pass, a few fitting iterations
        X_train, y_train, X_test, y_test = X_train[:256], y_train[:256], X_test[:64], y_test[:64]
    epochs = args.epochs or (1 if args.quick else 10)
    fit_iterations = args.fit_iterations or (30 if args.quick else 1500)
    steps = [1, 2] if args.quick else [1, 2, 4, 8]
    reference_tol = 1e-5 if args.quick else 1e-7

    model, g = build(args.dataset, device)
    with Timer() as t_train:
        train_classifier(model, X_train, y_train, epochs, progress=progress)
    with torch.no_grad():
        accuracy = float((model(X_test).argmax(1) == y_test).float().mean() * 100)
    hs, report, harvest_s = fit_hypereuler(
        model,
        g,
        X_train,
        steps,
        fit_iterations,
        device,
        progress,
        args.seed,
        max_trajectories=None if args.quick is False else 256,
    )

    result = pareto(
        model,
        X_test,
        torch.linspace(0, 1, 2),
        solvers=[hs, "euler", "midpoint", "heun", "rk4", "dopri5"],
        steps=steps,
        tolerances=[1e-3] if args.quick else [1e-2, 1e-3, 1e-4],
        labels=y_test,
        reference_tol=reference_tol,
        repeats=1 if args.quick else 5,
    )
    paths = result.save(args.out)

    # the paper's picture: |z_k - z(s_k)| at every mesh point, HyperEuler vs Euler
    n = steps[0]
    with torch.no_grad():
        z0 = model[:2](X_test[:4])
        mesh = torch.linspace(0, 1, n + 1, device=device)
        reference = harvest(model[2], z0, mesh, atol=reference_tol, rtol=reference_tol).states
        for name, solver in (("hypereuler", hs), ("euler", Euler())):
            err = absolute_error(solver.solve(model[2].vf, z0, mesh), reference)
            paths[f"mesh_error_{name}"] = plot_mesh_error(
                err, Path(args.out) / f"mesh_error_{name}.png", title=f"{name}, {n} steps"
            )

    compared = {name: {s: result.row(name, steps=s) for s in steps} for name in ("HyperEuler", "euler")}
    summary = {
        "dataset": args.dataset,
        "dopri5_test_accuracy": accuracy,
        "train_s": t_train.seconds,
        "harvest_s": harvest_s,
        "fit_s": report.wall_time,
        "fit": report.summary(),
        "per_nfe": {  # HyperEuler and Euler: one evaluation of f per step, so NFE = steps
            str(s): {
                name: {"steps": s, "terminal_mape": rows[s].terminal_mape, "accuracy_decrement": rows[s].task_decrement}
                for name, rows in compared.items()
            }
            for s in steps
        },
        "hypereuler_vs_euler_mape": {
            str(s): [compared["HyperEuler"][s].terminal_mape, compared["euler"][s].terminal_mape] for s in steps
        },
        "paths": paths,
    }
    write_json(args.out, "summary.json", summary)
    print(result.to_markdown())
    print(
        f"{args.dataset}: test accuracy with dopri5 {accuracy:.1f}% (trained in {t_train.seconds:.0f} s); "
        f"harvest {harvest_s:.1f} s, fit {report.wall_time:.1f} s"
    )
    print(f"results: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
