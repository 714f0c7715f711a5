"""fit refuses non-finite data, warns about noisy targets, leaves the user's f as it was and
keeps g's last finite weights.

No silent wrong answers: one test (or parametrized family) per finding of the hostile-input pass
of version 0.2 (numbered as there).
"""

import re
import warnings

import pytest
import torch
from robustness_helpers import INF, NAN, SPAN, _hs, _linear_trajectories
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import (
    FitDivergedError,
    HyperEuler,
    HyperRK4,
    MLPHyperNet,
    Trajectories,
    fit,
    harvest,
)

# --- 6. non-finite fitting data refused up front -----------------------------------------------------


def test_06_fit_refuses_non_finite_trajectories_with_count_and_place():
    trajectories = _linear_trajectories(n=64, steps=4)
    states = trajectories.states.clone()
    states[-1, 40:43, 0] = NAN  # three values, in trajectories a 4-trajectory fit never samples
    bad = Trajectories(trajectories.t, states, trajectories.meshes, trajectories.f)
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    with pytest.raises(ValueError, match=r"(?i)non-finite|nan") as info:
        fit(hs, bad, iterations=3, batch_size=4, progress=False, seed=0)
    message = str(info.value)
    assert re.search(r"\b3\b", message), message  # how many
    assert re.search(r"\b40\b", message), message  # where


# --- 9. fit estimates the noise in its targets ------------------------------------------------------


def _noise(report):
    noise = report.target_noise
    return max(noise.values()) if isinstance(noise, dict) else float(noise)


def test_09_fit_warns_when_reference_noise_swamps_the_residual_targets():
    # float32 and atol=rtol=1e-4 on 8 steps: RK4's targets are divided by dt**5 = 3e-5, the
    # reference error in them is several times the targets themselves
    noisy = _linear_trajectories(n=16, steps=8, atol=1e-4, rtol=1e-4)
    hs = HyperRK4(MLPHyperNet(2, hidden=(16,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = fit(hs, noisy, iterations=20, progress=False, seed=0)
        except ValueError as err:  # refusing is also acceptable
            assert "noise" in str(err).lower(), err
            report = None
    if report is not None:
        assert any(issubclass(w.category, UserWarning) and "noise" in str(w.message).lower() for w in caught), [
            str(w.message) for w in caught
        ]
        assert hasattr(report, "target_noise")
    # a clean reference (float64, tight tolerances) fits silently and reports little noise
    clean = _linear_trajectories(n=16, steps=8, dtype=torch.float64, atol=1e-12, rtol=1e-12)
    hs = HyperRK4(MLPHyperNet(2, hidden=(16,)).double())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clean_report = fit(hs, clean, iterations=20, progress=False, seed=0)
    assert not any("noise" in str(w.message).lower() for w in caught), [str(w.message) for w in caught]
    if report is not None:
        assert _noise(clean_report) < _noise(report)


# --- 10. f is bit-for-bit unchanged and gradient-free after harvest + fit ---------------------------


def _bn_net():
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        net(torch.randn(32, 2))  # non-trivial running statistics
    return net.train()


class BNField(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _bn_net()

    def forward(self, t, z, args=None):
        return self.net(z)


def _model(kind):
    """(what harvest is given, the module the user owns)."""
    if kind == "callable":
        net = _bn_net()

        def f(t, z):
            return net(z)

        return f, net
    if kind == "module":
        field = BNField()
        return field, field
    if kind == "neuralode":
        node = NeuralODE(BNField(), solver="dopri5")
        return node, node
    model = nn.Sequential(nn.BatchNorm1d(2), NeuralODE(BNField(), solver="dopri5", return_t_eval=False))
    with torch.no_grad():
        model[0](torch.randn(32, 2))
    return model.train(), model


@pytest.mark.parametrize("method", ["residual", "trajectory"])
@pytest.mark.parametrize("kind", ["callable", "module", "neuralode", "sequential"])
def test_10_f_is_unchanged_and_gradient_free_after_harvest_and_fit(kind, method):
    model, owned = _model(kind)
    state = {k: v.clone() for k, v in owned.state_dict().items()}
    modes = [m.training for m in owned.modules()]
    flags = [p.requires_grad for p in owned.parameters()]
    trajectories = harvest(model, torch.randn(16, 2), SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # BatchNorm may not vectorise
        fit(hs, trajectories, method=method, iterations=5, batch_size=8, progress=False, seed=0)
    after = owned.state_dict()
    changed = [k for k in state if not torch.equal(state[k], after[k])]
    assert not changed, f"harvest/fit changed the user's {changed}"
    assert [m.training for m in owned.modules()] == modes
    assert [p.requires_grad for p in owned.parameters()] == flags
    with_grad = [name for name, p in owned.named_parameters() if p.grad is not None]
    assert not with_grad, f"harvest/fit left .grad on the user's {with_grad}"


# --- 11. a diverged fit keeps g's last finite weights ------------------------------------------------


def test_11_fit_with_infinite_lr_restores_the_last_finite_weights():
    trajectories = _linear_trajectories(n=16, steps=4)
    hs = _hs()
    before = [p.detach().clone() for p in hs.parameters()]
    with pytest.raises(FitDivergedError):
        fit(hs, trajectories, lr=INF, iterations=20, progress=False, seed=0)
    assert all(bool(torch.isfinite(p).all()) for p in hs.parameters()), "g was left with non-finite weights"
    # the very first step made every weight non-finite: the last finite weights are the initial ones
    assert all(torch.equal(a, b) for a, b in zip(hs.parameters(), before))
