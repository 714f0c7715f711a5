"""The workloads the benchmarks measure: the tutorials' models, trained and fitted once
per process (offline, CPU-sized; ``quick`` shrinks everything to seconds)."""

from __future__ import annotations

import contextlib
import copy
import functools
import resource
import time
import warnings

import numpy as np
import torch
from torchdyn.datasets import ToyDataset

from examples import cnf_density, image_classification, quickstart
from examples import lorenz as lorenz_example
from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit, harvest
from torchdyn_hypersolvers.validity import OutsideFitWarning

warnings.filterwarnings("ignore", category=OutsideFitWarning)

TUNE_INPUTS = {False: 4096, True: 64}
"""How many inputs the tune benchmark gives each 2-D / 3-D workload (by ``quick``): 256 are held out."""
MOONS_STEPS = [4, 8, 12, 16, 20, 24]
DIGITS_STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 20, 24]
CNF_STEPS = [2, 4, 6, 8, 10, 12]  # HyperHeun: NFE 4..24


@contextlib.contextmanager
def _seeded(seed: int):
    """torch's and numpy's generators seeded within the block and put back after: torchdyn's toy
    datasets draw from numpy's global generator, so seeding torch alone left the moons data (and every
    moons number) different in each run."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _harvest_and_fit(model, inputs, t_span, steps, hs, iterations, **fit_kwargs):
    """Harvest + fit, timed, with the peak resident memory seen during harvesting."""
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    trajectories = harvest(model, inputs, t_span, steps=steps)
    harvest_s = time.perf_counter() - start
    rss_after = _peak_rss_mb()
    report = fit(hs, trajectories, iterations=iterations, progress=False, seed=0, **fit_kwargs)
    return hs, {
        "trajectories": len(trajectories),
        "meshes": steps,
        "iterations": iterations,
        "harvest_s": harvest_s,
        "fit_s": report.wall_time,
        "total_s": harvest_s + report.wall_time,
        "trajectory_mb": trajectories.states.numel() * trajectories.states.element_size() / 2**20,
        "harvest_peak_rss_growth_mb": rss_after - rss_before,
    }


@functools.cache
def moons_model(quick: bool):
    """The quickstart's moons classifier, trained with dopri5 (no hypersolver)."""
    with _seeded(0):
        model, (X_train, _), (X_test, y_test), accuracy = quickstart.train_moons(
            512 if quick else 2048, 40 if quick else 400, "cpu", progress=False
        )
    with _seeded(1):  # more inputs like the training data, for tune
        x_tune, _ = ToyDataset().generate(n_samples=TUNE_INPUTS[quick], dataset_type="moons", noise=0.1)
    return {"model": model, "x_train": X_train, "x": X_test, "y": y_test, "accuracy": accuracy, "x_tune": x_tune}


@functools.cache
def moons(quick: bool):
    """The quickstart's classifier with a HyperEuler fitted for 4..24 steps."""
    m = moons_model(quick)
    model, X_train, X_test, y_test = m["model"], m["x_train"], m["x"], m["y"]
    hs, cost = _harvest_and_fit(
        model,
        X_train,
        torch.linspace(0, 1, 2),
        MOONS_STEPS,
        HyperEuler(MLPHyperNet(2, hidden=(32, 32))),
        50 if quick else 3000,
    )
    return {
        "model": model,
        "node": model[0],
        "x": X_test,
        "y": y_test,
        "hs": hs,
        "fit": cost,
        "accuracy": m["accuracy"],
    }


@functools.cache
def digits_model(quick: bool):
    """The image tutorial's digits classifier, trained with dopri5, and a fresh (zero-initialised) g."""
    torch.manual_seed(0)
    (X_train, y_train), (X_test, y_test) = image_classification.load_digits("cpu")
    if quick:
        X_train, y_train, X_test, y_test = X_train[:128], y_train[:128], X_test[:64], y_test[:64]
    model, g = image_classification.build("digits", "cpu")
    image_classification.train_classifier(model, X_train, y_train, epochs=1 if quick else 10, progress=False)
    return {"model": model, "g": g, "x_train": X_train, "y_train": y_train, "x": X_test, "y": y_test}


def digits_hypernet() -> torch.nn.Module:
    """Another g of the tutorial's architecture (the supplement's PReLU CNN), zero-initialised."""
    return image_classification.build("digits", "cpu")[1]


@functools.cache
def digits(quick: bool):
    """The image tutorial's digits classifier with its paper-style HyperEuler."""
    d = digits_model(quick)
    model, g, X_train = d["model"], copy.deepcopy(d["g"]), d["x_train"]
    hs, cost = _harvest_and_fit(
        model, X_train, torch.linspace(0, 1, 2), DIGITS_STEPS, HyperEuler(g), 30 if quick else 1500, batch_size=32
    )
    return {"model": model, "node": model[2], "x": d["x"], "y": d["y"], "hs": hs, "fit": cost}


@functools.cache
def cnf_model(quick: bool):
    """The CNF tutorial's pinwheel flow: the z-only field that sampling integrates backwards."""
    vf, _ = cnf_density.train_cnf("pinwheel", iterations=10 if quick else 300, progress=False)
    return {"vf": vf, "t_span": torch.tensor(cnf_density.BACKWARD)}


@functools.cache
def cnf(quick: bool):
    """The CNF tutorial's pinwheel flow, sampled backwards, with a HyperHeun."""
    vf = cnf_model(quick)["vf"]
    z1 = cnf_density.sample_base(256 if quick else 1024, torch.Generator().manual_seed(1))
    start = time.perf_counter()
    trajectories = cnf_density.harvest_backward(vf, z1, CNF_STEPS)
    harvest_s = time.perf_counter() - start
    hs, report = cnf_density.fit_hyperheun(
        vf, trajectories, steps=CNF_STEPS, iterations=30 if quick else 2000, progress=False
    )
    cost = {
        "trajectories": len(trajectories),
        "meshes": CNF_STEPS,
        "iterations": report.iterations,
        "harvest_s": harvest_s,
        "fit_s": report.wall_time,
        "total_s": harvest_s + report.wall_time,
        "trajectory_mb": trajectories.states.numel() * trajectories.states.element_size() / 2**20,
        "harvest_peak_rss_growth_mb": None,
    }
    held_out = cnf_density.sample_base(512, torch.Generator().manual_seed(7))
    return {"vf": vf, "x": held_out, "t_span": torch.tensor(cnf_density.BACKWARD), "hs": hs, "fit": cost}


VDP_MU = 3.0
VDP_T = 2.0
VDP_BOX = (2.5, 6.0)  # |x| <= 2.5, |y| <= 6: the limit cycle (mu = 3) with a margin
VDP_SCALE = (3.0, 30.0)  # the true field's scale per coordinate: f = scale * net(z / box)


class VanDerPolNODE(torch.nn.Module):
    """A Neural ODE vector field fitted to van der Pol's, ``f(z) = scale * net(z / box)`` with
    ``net`` an MLP 2-64-64-2 (tanh), float64. Autonomous: t is ignored."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
        )
        self.register_buffer("box", torch.tensor(VDP_BOX))
        self.register_buffer("scale", torch.tensor(VDP_SCALE))
        self.double()

    def forward(self, t, z):
        return self.scale * self.net(z / self.box)


def vanderpol_field(z: torch.Tensor, mu: float = VDP_MU) -> torch.Tensor:
    """The true van der Pol field ``(y, mu (1 - x^2) y - x)``."""
    x, y = z[..., :1], z[..., 1:]
    return torch.cat([y, mu * (1 - x**2) * y - x], -1)


@functools.cache
def vanderpol(quick: bool):
    """A van der Pol Neural ODE (mu = 3, a relaxation oscillator): the MLP field regressed on the
    true field over the box (Adam, cosine schedule), run on [0, 2] from states near its limit cycle
    (dopri5 needs 100-300 NFE there). Initial states: points of the learned field's own limit cycle
    (after a 10-unit transient from (2, 0)) plus N(0, 0.1^2) noise; fitting and held-out states are
    disjoint draws."""
    import torchdiffeq

    torch.manual_seed(0)
    start = time.perf_counter()
    f = VanDerPolNODE()
    box = f.box
    optimizer = torch.optim.Adam(f.parameters(), lr=3e-3)
    steps = 100 if quick else 600
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, 1e-4)
    for _ in range(steps):
        z = (2 * torch.rand(512, 2, dtype=torch.float64) - 1) * box
        loss = ((f(None, z) - vanderpol_field(z)) / f.scale).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    loss = loss.detach()
    f.requires_grad_(False)
    f.eval()
    train_s = time.perf_counter() - start
    with torch.no_grad():
        t = torch.linspace(0, 20, 401, dtype=torch.float64)
        cycle = torchdiffeq.odeint(f, torch.tensor([[2.0, 0.0]], dtype=torch.float64), t, rtol=1e-8, atol=1e-8)
        cycle = cycle[200:, 0]  # t in [10, 20]: on the limit cycle
    generator = torch.Generator().manual_seed(3)
    n_fit, n_test = (32, 32) if quick else (512, 256)

    def draw(n):
        pick = torch.randint(len(cycle), (n,), generator=generator)
        return cycle[pick] + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    return {
        "vf": f,
        "x_fit": draw(n_fit),
        "x": draw(n_test),
        "x_tune": draw(TUNE_INPUTS[quick]),
        "t_span": torch.tensor([0.0, VDP_T], dtype=torch.float64),
        "train_s": train_s,
        "regression_loss": loss.item(),
    }


LORENZ_T = 0.5


@functools.cache
def lorenz(quick: bool):
    """The Lorenz tutorial's field (float64) on the short horizon [0, 0.5], from its initial draw
    15 + N(0, I); fitting and held-out states are disjoint draws."""
    torch.manual_seed(0)
    n_fit, n_test = (32, 32) if quick else (512, 256)
    return {
        "vf": lorenz_example.Lorenz(),
        "x_fit": lorenz_example.initial_states(n_fit, "cpu"),
        "x": lorenz_example.initial_states(n_test, "cpu"),
        "x_tune": lorenz_example.initial_states(TUNE_INPUTS[quick], "cpu"),
        "t_span": torch.tensor([0.0, LORENZ_T], dtype=torch.float64),
    }
