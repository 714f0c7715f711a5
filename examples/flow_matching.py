"""Flow matching: sample torchcfm models with tuned hypersolvers, and see what each sampler costs.

Two models are trained on CPU as torchcfm's tutorials train them: an I-CFM flow from 8 gaussians
to two moons (``ConditionalFlowMatcher``, ``MLP(dim=2, w=64, time_varying=True)``) and a
class-conditional flow to sklearn's bundled 8x8 digits (an MLP over the 64 pixels, the label
riding in the state through ``flow_matching.Conditional``). ``tune`` picks a hypersolver per
budget of f evaluations (g and the time grid fitted together for the budget); on fresh noise
each sampler is compared with Euler, Midpoint and RK4 at equal NFE, with torchcfm's own
sampler, torchdyn's dopri5 at atol = rtol = 1e-4 (and 1e-3), and with torchdiffeq's dopri5 (what
Meta's flow_matching samples with) at both: terminal error and W2 to the samples of a tight
dopri5 solve, NFE and median wall time (interleaved repeats, one torch thread).

Figures (sample clouds, digit grids, error and W2 against wall time), ``summary.json`` and the
tables go to the results folder whose path is printed.
"""

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from examples.common import Timer, parser, setup, train, write_json  # noqa: E402
from torchdyn_hypersolvers import HyperEuler, HyperMidpoint, tune  # noqa: E402
from torchdyn_hypersolvers._costs import median_times  # noqa: E402
from torchdyn_hypersolvers.flow_matching import Conditional, odeint  # noqa: E402
from torchdyn_hypersolvers.metrics import wasserstein2  # noqa: E402

try:
    import torchdiffeq
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    from torchcfm.models.models import MLP
    from torchcfm.utils import sample_8gaussians, sample_moons, torch_wrapper
    from torchdyn.core import NeuralODE
except ImportError as err:  # pragma: no cover
    message = f'this tutorial needs torchcfm and POT: pip install "torchdyn-hypersolvers[flow]" ({err})'
    raise SystemExit(message) from None

SPAN = torch.tensor([0.0, 1.0])
CLASSICAL = {"euler": 1, "midpoint": 2, "rk4": 4}
FULL = dict(moons_iters=6000, digit_iters=4000, n_tune=4096, held_out=256, n_test=2000, nfe=(2, 4, 8),
            iterations=1500, grid_iterations=200, budget_iterations=2000, repeats=7, stage_aware=True)
QUICK = dict(moons_iters=150, digit_iters=100, n_tune=256, held_out=64, n_test=256, nfe=(4,),
             iterations=40, grid_iterations=5, budget_iterations=20, repeats=2, stage_aware=False)
ADAPTIVE = ("dopri5 0.0001", "dopri5 0.001", "torchdiffeq dopri5 0.0001", "torchdiffeq dopri5 0.001")
"""The adaptive samplers each tuned budget is held against: torchdyn's (torchcfm's) and torchdiffeq's."""


class Counted(nn.Module):
    """A vector field that counts its evaluations (``calls``)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls = f, 0

    def forward(self, t, x, *args, **kwargs):  # torchdyn's NeuralODE passes args=
        self.calls += 1
        return self.f(t, x)


class DigitVelocity(nn.Module):
    """A class-conditional velocity ``v(t, x, y)`` on 64 pixels: torchcfm's MLP over ``[x, one_hot(y), t]``."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.mlp = MLP(dim=64 + 10, out_dim=64, w=width, time_varying=True)

    def forward(self, t, x, y):
        t = t.reshape(-1, 1).expand(x.shape[0], 1) if t.numel() == 1 else t.reshape(-1, 1)
        return self.mlp(torch.cat([x, nn.functional.one_hot(y, 10).to(x), t], dim=1))


def train_moons(cfg, progress):
    """torchcfm's I-CFM tutorial: 8 gaussians -> moons, sigma 0.1, batch 256, Adam 1e-3."""
    net, fm = MLP(dim=2, w=64, time_varying=True), ConditionalFlowMatcher(sigma=0.1)

    def loss(_):
        t, xt, ut = fm.sample_location_and_conditional_flow(sample_8gaussians(256), sample_moons(256))
        return (net(torch.cat([xt, t[:, None]], dim=-1)) - ut).pow(2).mean()

    train(loss, net.parameters(), cfg["moons_iters"], lr=1e-3, desc="I-CFM moons", progress=progress)
    return torch_wrapper(net).requires_grad_(False)


def train_digits(cfg, progress):
    """A class-conditional I-CFM (sigma 0) from N(0, I) to the 8x8 digits scaled to [-1, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).reshape(-1, 64) / 8.0 - 1.0
    labels = torch.tensor(data.target)
    velocity, fm = DigitVelocity(), ConditionalFlowMatcher(sigma=0.0)

    def loss(_):
        pick = torch.randint(0, images.shape[0], (128,))
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn(128, 64), images[pick])
        return (velocity(t, xt, labels[pick]) - ut).pow(2).mean()

    train(loss, velocity.parameters(), cfg["digit_iters"], lr=1e-3, lr_min=1e-4, desc="digits", progress=progress)
    return Conditional(velocity.requires_grad_(False), shape=(64,), num_classes=10)


def tuned(f, x, cfg, progress, **extra):
    """``tune`` per budget, g and the grid fitted together for it."""
    result = tune(
        f, x, SPAN, nfe=cfg["nfe"], iterations=cfg["iterations"], grid_iterations=cfg["grid_iterations"],
        budget_iterations=cfg["budget_iterations"], stage_aware=cfg["stage_aware"], held_out=cfg["held_out"],
        progress=progress,
        **({} if cfg is FULL else {"bases": (HyperEuler, HyperMidpoint)}), **extra,
    )
    return result, {n: result.solver_for(n)[0] for n in result.choices}


def samplers(f, x, solvers, nfe):
    """The solves to compare, ``{label: solve}``: the tuned choices, the classical solvers at
    each budget their stage count divides, torchcfm's sampler (torchdyn's dopri5 at 1e-4) and 1e-3,
    and torchdiffeq's dopri5 at both."""
    runs = {f"tuned@{n}": lambda hs=hs: odeint(f, x, SPAN, hs)[-1] for n, hs in solvers.items()}
    for name, stages in CLASSICAL.items():
        for n in nfe:
            if n % stages == 0:
                mesh = torch.linspace(0, 1, n // stages + 1)
                runs[f"{name}@{n}"] = lambda m=mesh, s=name: odeint(f, x, m, s)[-1]
    for tol in (1e-4, 1e-3):  # torchcfm's tutorials: NeuralODE(..., solver="dopri5", sensitivity="adjoint")
        node = NeuralODE(f, solver="dopri5", sensitivity="adjoint", atol=tol, rtol=tol)
        runs[f"dopri5 {tol:g}"] = lambda nd=node: nd(x, SPAN)[1][-1]
        runs[f"torchdiffeq dopri5 {tol:g}"] = lambda tol=tol: torchdiffeq.odeint(
            f, x, SPAN, method="dopri5", rtol=tol, atol=tol
        )[-1]
    return runs


def measure(f, x, solvers, nfe, repeats, data=None):
    """Per sampler: NFE, terminal error and W2 to a tight dopri5 solve's samples (and W2 to ``data``),
    and the median wall time of interleaved repeats."""
    counter = Counted(f)
    with torch.no_grad():
        reference = odeint(f, x, SPAN, "dopri5", rtol=1e-7, atol=1e-7)[-1]
        rows, finals = {}, {}
        for label, run in samplers(counter, x, solvers, nfe).items():
            counter.calls = 0
            finals[label] = run()
            error = (finals[label] - reference).norm(dim=1)
            rows[label] = {"nfe": counter.calls, "terminal_error": float(error.mean()),
                           "w2_to_reference": wasserstein2(finals[label], reference)}
            if data is not None:
                rows[label]["w2_to_data"] = wasserstein2(finals[label], data)
        times = median_times(samplers(f, x, solvers, nfe), repeats=repeats)
    for label, seconds in times.items():
        rows[label]["wall_ms"] = 1e3 * seconds
    return rows, finals, reference


def speedup(rows, metric, adaptive="dopri5 0.0001"):
    """The fastest tuned choice whose ``metric`` is at most the ``adaptive`` sampler's, and its
    speed-up; None when no tuned budget reaches it."""
    target = rows[adaptive]
    reached = [k for k in rows if k.startswith("tuned@") and rows[k][metric] <= target[metric]]
    if not reached:
        return None
    label = min(reached, key=lambda k: rows[k]["wall_ms"])
    return {"choice": label, metric: rows[label][metric], "adaptive": target[metric],
            "speedup": target["wall_ms"] / rows[label]["wall_ms"]}


def table(rows, extra=False):
    head = "| sampler | NFE | terminal error | W2 to reference |" + (" W2 to data |" if extra else "") + " wall (ms) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, r in rows.items():
        cells = [label, str(r["nfe"]), f"{r['terminal_error']:.3g}", f"{r['w2_to_reference']:.3g}"]
        cells += [f"{r['w2_to_data']:.3g}"] if extra else []
        lines.append("| " + " | ".join(cells + [f"{r['wall_ms']:.3g}"]) + " |")
    return "\n".join(lines) + "\n"


def figures(out, moons, digits, nfe):
    """Sample clouds and digit grids (Euler and the tuned choice at each budget next to dopri5 at
    1e-4), and error and W2 against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = {}
    cols = [n for n in (2, 4, 8) if n in nfe] or list(nfe)
    titles = {"moons": "I-CFM flow, 8 gaussians -> moons (torchcfm)", "digits": "Class-conditional flow, 8x8 digits"}
    for name, (rows, finals, show) in {"moons": moons, "digits": digits}.items():
        height = 5.8 if name == "moons" else 3.0
        fig, axes = plt.subplots(2, len(cols) + 1, figsize=(2.6 * (len(cols) + 1), height), squeeze=False)
        fig.suptitle(titles[name], fontsize=10)
        for i, kind in enumerate(("euler", "tuned")):
            for j, n in enumerate(cols):
                label = f"{kind}@{n}"
                show(axes[i, j], finals.get(label), f"{'Euler' if kind == 'euler' else 'tuned'}, NFE {n}")
            ref = "dopri5 0.0001"
            show(axes[i, -1], finals[ref], f"dopri5 1e-4, NFE {rows[ref]['nfe']}")
        fig.tight_layout()
        paths[name] = os.path.join(out, f"flow_{name}.png")
        fig.savefig(paths[name], dpi=90)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("terminal_error", "w2_to_reference"), ("terminal error", "W2 to reference")):
        for kind, marker in (("tuned", "o"), ("euler", "s"), ("midpoint", "^"), ("rk4", "D"), ("dopri5", "*")):
            pts = sorted((r["wall_ms"], r[metric], k) for k, r in moons[0].items() if k.startswith(kind))
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("wall time per batch (ms)")
        ax.set_ylabel(title)
        ax.set_title(f"8 gaussians -> moons: {title}")
        ax.legend()
    fig.tight_layout()
    paths["pareto"] = os.path.join(out, "flow_pareto.png")
    fig.savefig(paths["pareto"], dpi=90)
    plt.close(fig)
    return paths


def cloud(ax, samples, title):
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if samples is not None:
        ax.scatter(samples[:1000, 0], samples[:1000, 1], s=1.5, alpha=0.6)
        ax.set_xlim(-5, 6)
        ax.set_ylim(-4, 4)


def grid(ax, samples, title):
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    if samples is not None:  # the first 40 samples: labels 0..9 in turn, 4 rows
        tiles = samples[:40, :64].clamp(-1, 1).reshape(4, 10, 8, 8).permute(0, 2, 1, 3).reshape(32, 80)
        ax.imshow(tiles, cmap="gray_r")


def main():
    args = parser(__doc__, "flow_matching", threads=1).parse_args()
    setup(args)
    cfg, progress = (QUICK if args.quick else FULL), not args.no_progress
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"machine: {machine}; torch threads: {torch.get_num_threads()}")
    summary = {"machine": machine, "threads": torch.get_num_threads(), "quick": args.quick, "seconds": {}}
    with Timer() as t:
        f = train_moons(cfg, progress)
    summary["seconds"]["train_moons"] = t.seconds
    with Timer() as t:
        moons_tune, moons_solvers = tuned(f, sample_8gaussians(cfg["n_tune"]), cfg, progress)
    summary["seconds"]["tune_moons"] = t.seconds
    x, data = sample_8gaussians(cfg["n_test"]), sample_moons(cfg["n_test"])
    moons = measure(f, x, moons_solvers, cfg["nfe"], cfg["repeats"], data)

    with Timer() as t:
        cond = train_digits(cfg, progress)
    summary["seconds"]["train_digits"] = t.seconds
    labels = torch.arange(cfg["n_tune"]) % 10
    with Timer() as t:
        digit_tune, digit_solvers = tuned(cond, cond.initial_state(torch.randn(cfg["n_tune"], 64), labels), cfg,
                                          progress, hypernet=cond.make_hypernet)
    summary["seconds"]["tune_digits"] = t.seconds
    z = cond.initial_state(torch.randn(cfg["n_test"], 64), torch.arange(cfg["n_test"]) % 10)
    digits = measure(cond, z, digit_solvers, cfg["nfe"], cfg["repeats"])

    for name, (rows, _, _), tuned_result in (("moons", moons, moons_tune), ("digits", digits, digit_tune)):
        print(f"\n{name}: tune's choices\n\n{tuned_result.to_markdown()}")
        print(f"{name}: samplers on {cfg['n_test']} fresh samples\n\n{table(rows, extra=name == 'moons')}")
        summary[name] = rows
        summary[f"{name}_choices"] = {n: c.label for n, c in tuned_result.choices.items()}
        for metric in ("terminal_error", "w2_to_reference", "w2_to_data")[: 3 if name == "moons" else 2]:
            summary[f"{name}_speedup_{metric}"] = {}
            for adaptive in ADAPTIVE:
                found = speedup(rows, metric, adaptive)
                summary[f"{name}_speedup_{metric}"][adaptive] = found
                text = "no tuned budget reaches it" if found is None else (
                    f"{found['choice']} ({found[metric]:.3g} vs {found['adaptive']:.3g}): "
                    f"{found['speedup']:.1f}x faster")
                print(f"{name}: equal {metric.replace('_', ' ')} to {adaptive}: {text}")
    summary["paths"] = figures(args.out, (moons[0], moons[1], cloud), (digits[0], digits[1], grid), cfg["nfe"])
    write_json(args.out, "summary.json", summary)
    print(f"\nresults: {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
