"""Issue 13, point 1: residual targets as precise as the base order needs (harvest(..., base=...))."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import HyperRK4, MLPHyperNet, fit, harvest
from torchdyn_hypersolvers._loop import fixed_solve
from torchdyn_hypersolvers._reference import reference_solve
from torchdyn_hypersolvers.fit import residual_targets
from torchdyn_hypersolvers.solvers import FixedStepSolver, HyperSolver

SPAN = torch.linspace(0, 1, 2)
STEPS = [4, 8]


class Field(nn.Module):
    """A smooth 2-D field: a damped rotation plus a small tanh MLP (float32, like a user's model)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        with torch.no_grad():
            self.net[2].weight.mul_(0.5)
        self.register_buffer("A", torch.tensor([[-0.1, 1.0], [-1.0, -0.1]]))

    def forward(self, t, z):
        return z @ self.A.T + self.net(z)


@pytest.fixture(scope="module")
def field():
    torch.manual_seed(0)
    return Field()


def _targets(base, f64, trajectories):
    """The base's residual targets on every mesh, in float64 (f64 a float64 copy of the field)."""
    hs = HyperSolver(base, MLPHyperNet(2, hidden=(4,)).double())
    out = {}
    for n in trajectories.steps:
        t_span, states = trajectories.mesh(n)
        with torch.no_grad():
            out[n] = residual_targets(hs, f64, states.double(), t_span.double())[0]
    return out


@pytest.mark.parametrize("base", ["euler", "midpoint", "heun", "rk4"])
def test_default_targets_match_tight_float64_targets(field, base):
    x = torch.randn(32, 2)
    chosen = harvest(field, x, SPAN, steps=STEPS, base=base)
    assert chosen.atol <= 1e-6 and chosen.rtol <= 1e-6
    if base != "euler":  # order >= 2: float64 references
        assert chosen.states.dtype == torch.float64
    f64 = copy.deepcopy(field).double()
    tight = harvest(f64, x.double(), SPAN, steps=STEPS, atol=1e-12, rtol=1e-12)
    got, exact = _targets(base, f64, chosen), _targets(base, f64, tight)
    for n in STEPS:
        relative = float((got[n] - exact[n]).abs().mean() / exact[n].abs().mean())
        assert relative <= 0.01, (base, n, chosen.atol, relative)
    # without base: today's defaults, in the inputs' dtype
    plain = harvest(field, x, SPAN, steps=STEPS)
    assert (plain.atol, plain.rtol, plain.states.dtype) == (1e-6, 1e-6, torch.float32)


def _terminal_error(solver, f, x, ref, steps):
    with torch.no_grad():
        final = fixed_solve(solver, f, x, torch.linspace(0, 1, steps + 1), False)
        return float((final.double() - ref).norm(dim=1).mean())


def test_hyper_rk4_fitted_with_base_defaults_beats_rk4(field):
    x, held_out = torch.randn(256, 2), torch.randn(128, 2)
    ref = reference_solve(copy.deepcopy(field).double(), held_out.double(), SPAN.double(), "dopri5", 1e-12, 1e-12)[-1]
    rk4 = _terminal_error(FixedStepSolver("rk4"), field, held_out, ref, 8)
    ratios, noise = {}, {}
    for with_base in (True, False):
        torch.manual_seed(1)
        hs = HyperRK4(MLPHyperNet(2, hidden=(32, 32)))
        trajectories = harvest(field, x, SPAN, steps=STEPS, base=hs if with_base else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without base, fit warns that noise swamps the targets
            report = fit(hs, trajectories, iterations=150, seed=0, progress=False)
        ratios[with_base] = _terminal_error(hs, field, held_out, ref, 8) / rk4
        noise[with_base] = max(report.target_noise.values())
        assert set(report.relative_residual_error) == set(STEPS)
        assert "|g - R| / |R|" in report.summary() and "target noise" in report.summary()
    assert noise[True] <= 0.01, noise
    assert ratios[True] < 0.5, ratios  # HyperRK4 beats RK4 with harvest(..., base=hs)
    assert noise[False] > 0.1 and ratios[False] > ratios[True], (noise, ratios)  # today's defaults: noise


def test_model_unchanged_by_base_harvest_and_fit():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
    model = NeuralODE(f, solver="dopri5").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    hs = HyperRK4(MLPHyperNet(2, hidden=(8,)))
    trajectories = harvest(model, torch.randn(16, 2), SPAN, steps=[4], base=hs)
    assert trajectories.states.dtype == torch.float64 and trajectories.f is model.vf
    fit(hs, trajectories, iterations=3, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype == torch.float32 and torch.equal(after[k], v), k
    assert model.training and [p.requires_grad for p in model.parameters()] == grads
    assert next(hs.parameters()).dtype == torch.float32


def test_plain_callables_in_float64_or_with_a_warning(field):
    x = torch.randn(8, 2)
    follows = harvest(lambda t, z: -z + 0.1 * torch.sin(z), x, SPAN, steps=[4], base="rk4")
    assert follows.states.dtype == torch.float64
    with pytest.warns(UserWarning, match="float64"):
        stuck = harvest(lambda t, z: field(t, z), x, SPAN, steps=[4], base="rk4")  # a float32 module inside
    assert stuck.states.dtype == torch.float32


def test_base_settings_in_the_fingerprint_and_cache(field, tmp_path):
    x = torch.randn(8, 2)
    cache = tmp_path / "t.pt"
    first = harvest(field, x, SPAN, steps=[4], base="rk4", cache=cache)
    assert first.fingerprint["dtype"] == "torch.float64" and first.fingerprint["atol"] == repr(first.atol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = harvest(field, x, SPAN, steps=[4], base="rk4", cache=cache)
    assert torch.equal(again.states, first.states) and again.atol == first.atol
    with pytest.warns(UserWarning, match="recomputed"):
        harvest(field, x, SPAN, steps=[4], cache=cache)  # no base: other tolerances and dtype


def test_refine_lowers_held_out_error_at_low_step_counts(field):
    from torchdyn_hypersolvers import HyperEuler

    x, held_out = torch.randn(256, 2), torch.randn(128, 2)
    ref = reference_solve(copy.deepcopy(field).double(), held_out.double(), SPAN.double(), "dopri5", 1e-12, 1e-12)[-1]
    errors = {}
    for refine in (0, 100):
        torch.manual_seed(1)
        hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32)))
        trajectories = harvest(field, x, SPAN, steps=[2], base=hs)
        report = fit(hs, trajectories, iterations=100, seed=0, progress=False, refine=refine)
        assert len(report.loss_history) == 100 + refine
        errors[refine] = _terminal_error(hs, field, held_out, ref, 2)
    assert errors[100] < 0.9 * errors[0], errors
    with pytest.raises(ValueError, match="refine"):
        fit(hs, trajectories, iterations=1, refine=-1, progress=False)
