"""The validity record checks the interval and direction of a solve.

No silent wrong answers: one test (or parametrized family) per finding of the hostile-input pass
of version 0.2 (numbered as there).
"""

import warnings

import pytest
import torch
from robustness_helpers import SPAN, Field
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import (
    HyperEuler,
    MLPHyperNet,
    fit,
    harvest,
)

# --- 7. validity records the interval and the direction -------------------------------------------


@pytest.fixture(scope="module")
def fitted_on_unit_interval():
    torch.manual_seed(0)
    f = Field()
    trajectories = harvest(f, torch.randn(16, 2), SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    fit(hs, trajectories, iterations=20, progress=False, seed=0)
    return hs, f


@pytest.mark.parametrize(
    "case, t_span, match",
    [
        ("fast-longer-interval", torch.linspace(0, 8, 33), r"(?i)interval|\b8\b"),
        ("fast-backward", torch.linspace(1, 0, 5), r"(?i)backward|direction|decreasing|revers"),
        ("node-longer-interval", torch.linspace(0, 8, 33), r"(?i)interval|\b8\b"),
        ("node-backward", torch.linspace(1, 0, 5), r"(?i)interval|backward|direction|decreasing|revers|-1"),
    ],
)
def test_07_validity_checks_the_time_interval_and_direction(fitted_on_unit_interval, case, t_span, match):
    hs, f = fitted_on_unit_interval
    x = torch.randn(4, 2)
    with warnings.catch_warnings():  # where it was fitted (same |dt|, same interval): silent
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            hs.solve(f, x, torch.linspace(0, 1, 5))
    with pytest.warns(UserWarning, match=match), torch.no_grad():
        if case.startswith("fast"):
            hs.solve(f, x, t_span)
        else:
            NeuralODE(f, solver=hs)(x, t_span)
