"""fit(balance_meshes=True): g learns each mesh's residual relative to its size, at any scale."""

import torch
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import HyperRK4, MLPHyperNet, fit, harvest, load, save
from torchdyn_hypersolvers.fit import mesh_balance, residual_data

STEPS = [1, 2, 4]


def _smooth_field():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    return NeuralODE(f)


def _fitted(balance: bool):
    node = _smooth_field()
    hs = HyperRK4(MLPHyperNet(2, hidden=(32, 32)))
    trajectories = harvest(node, torch.randn(128, 2), torch.linspace(0, 1, 2), steps=STEPS, base=hs)
    report = fit(hs, trajectories, iterations=300, progress=False, seed=0, balance_meshes=balance)
    return hs, trajectories, report


def test_mesh_balance_weighs_each_mesh_by_its_mean_square_residual():
    hs = HyperRK4(MLPHyperNet(2))
    node = _smooth_field()
    trajectories = harvest(node, torch.randn(16, 2), torch.linspace(0, 1, 2), steps=STEPS, base=hs)
    data = residual_data(hs, trajectories)
    weight = mesh_balance(data)
    for n in STEPS:
        mask = data.mesh_steps == n
        expected = 1.0 / data.target[mask].square().mean()
        torch.testing.assert_close(weight[mask], expected.expand(int(mask.sum())).to(weight))


def test_balanced_fit_learns_tiny_rk4_residuals_that_a_plain_fit_misses():
    plain_hs, _, plain = _fitted(balance=False)
    hs, trajectories, balanced = _fitted(balance=True)
    assert plain_hs.residual_scale == 1.0
    mean_r = sum(balanced.base_residual_error.values()) / len(STEPS)
    assert hs.residual_scale < 10 * mean_r  # of the residuals' size, far below one
    for n in STEPS:  # relative error per mesh: the balanced fit is far better on every mesh
        assert balanced.relative_residual_error[n] < 0.6 * plain.relative_residual_error[n], (n, balanced, plain)
        assert balanced.relative_residual_error[n] < 0.5, (n, balanced)


def test_balancing_is_the_default_for_rk4():
    _, _, default = _fitted(balance=None)
    _, _, balanced = _fitted(balance=True)
    assert default.relative_residual_error == balanced.relative_residual_error


def test_residual_scale_is_saved_and_loaded(tmp_path):
    hs, trajectories, _ = _fitted(balance=True)
    save(hs, tmp_path / "hs.pt", trajectories=trajectories)
    loaded = load(tmp_path / "hs.pt")
    assert loaded.residual_scale == hs.residual_scale != 1.0
    x = torch.randn(8, 2)
    vf = trajectories.f
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.solve(vf, x, torch.linspace(0, 1, 3)), hs.solve(vf, x, torch.linspace(0, 1, 3)), rtol=0, atol=0
        )


def test_a_g_that_scales_its_own_output_is_not_scaled_twice():
    node = _smooth_field()
    trajectories = harvest(node, torch.randn(16, 2), torch.linspace(0, 1, 2), steps=STEPS, base="rk4")
    scaled, plain = MLPHyperNet(2, hidden=(8,), scaled=True), MLPHyperNet(2, hidden=(8,))
    assert scaled.scales_output and not plain.scales_output
    for g in (scaled, plain):
        hs = HyperRK4(g)
        if g is scaled:
            g.standardize_(residual_data(hs, trajectories))
        fit(hs, trajectories, iterations=3, progress=False, seed=0)  # balanced: the default for RK4
        assert (hs.residual_scale == 1.0) == (g is scaled), hs.residual_scale
