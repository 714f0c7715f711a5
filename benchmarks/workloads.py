"""The workloads the benchmarks measure: the tutorials' models, trained and fitted once
per process (offline, CPU-sized; ``quick`` shrinks everything to seconds)."""

from __future__ import annotations

import functools
import resource
import time
import warnings

import torch

from examples import cnf_density, image_classification, quickstart
from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit, harvest

warnings.filterwarnings("ignore", message=".*outside where its g was fitted.*")

MOONS_STEPS = [4, 8, 12, 16, 20, 24]
DIGITS_STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 20, 24]
CNF_STEPS = [2, 4, 6, 8, 10, 12]  # HyperHeun: NFE 4..24


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
def moons(quick: bool):
    """The quickstart's classifier with a HyperEuler fitted for 4..24 steps."""
    torch.manual_seed(0)
    model, (X_train, _), (X_test, y_test), accuracy = quickstart.train_moons(
        512 if quick else 2048, 40 if quick else 400, "cpu", progress=False
    )
    hs, cost = _harvest_and_fit(
        model,
        X_train,
        torch.linspace(0, 1, 2),
        MOONS_STEPS,
        HyperEuler(MLPHyperNet(2, hidden=(32, 32))),
        50 if quick else 3000,
    )
    return {"model": model, "node": model[0], "x": X_test, "y": y_test, "hs": hs, "fit": cost, "accuracy": accuracy}


@functools.cache
def digits(quick: bool):
    """The image tutorial's digits classifier with its paper-style HyperEuler."""
    torch.manual_seed(0)
    (X_train, y_train), (X_test, y_test) = image_classification.load_digits("cpu")
    if quick:
        X_train, y_train, X_test, y_test = X_train[:128], y_train[:128], X_test[:64], y_test[:64]
    model, g = image_classification.build("digits", "cpu")
    image_classification.train_classifier(model, X_train, y_train, epochs=1 if quick else 10, progress=False)
    hs, cost = _harvest_and_fit(
        model, X_train, torch.linspace(0, 1, 2), DIGITS_STEPS, HyperEuler(g), 30 if quick else 1500, batch_size=32
    )
    return {"model": model, "node": model[2], "x": X_test, "y": y_test, "hs": hs, "fit": cost}


@functools.cache
def cnf(quick: bool):
    """The CNF tutorial's pinwheel flow, sampled backwards, with a HyperHeun."""
    vf, _ = cnf_density.train_cnf("pinwheel", iterations=10 if quick else 300, progress=False)
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
