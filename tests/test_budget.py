"""Fitting for one budget, end to end: g and the time grid together on the terminal error."""

import warnings

import pytest
import torch

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit, harvest
from torchdyn_hypersolvers.budget import BUDGET_RECIPE, COEFFICIENTS_RECIPE, fit_budget
from torchdyn_hypersolvers.nonstationary import NonStationarySolver
from torchdyn_hypersolvers.validity import OutsideFitWarning

SPAN = torch.linspace(0, 1, 2)


class Field(torch.nn.Module):
    """A time-dependent field with a transient: the uniform 4-step Euler grid leaves room."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))

    def forward(self, t, z):
        return 2 * self.net(torch.cat([z, t.expand(len(z), 1)], 1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    f = Field()
    traj = harvest(f, torch.randn(256, 2), SPAN, steps=[4], base="euler")
    held_out = torch.randn(128, 2)
    ref = harvest(f, held_out, SPAN, steps=[4], base="euler").states[-1].float()
    hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32), time=True))
    fit(hs, traj, iterations=300, progress=False, seed=0)
    return f, traj, held_out, ref, hs


def _error(hs, f, x, ref, grid):
    with torch.no_grad():
        return float((hs.solve(f, x, grid, return_trajectory=False) - ref).norm(dim=1).mean())


def test_fitting_for_the_budget_lowers_the_held_out_terminal_error(setup):
    f, traj, x, ref, fitted = setup
    hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32), time=True))
    hs.load_state_dict(fitted.state_dict())
    before = _error(hs, f, x, ref, torch.linspace(0, 1, 5))
    weights = {k: v.clone() for k, v in f.state_dict().items()}
    report = fit_budget(hs, traj, iterations=300, progress=False)
    after = _error(hs, f, x, ref, hs.time_grid)
    assert after < 0.8 * before, (before, after)
    assert report.method == "budget" and len(report.loss_history) == 300
    assert report.loss_history[-1] < report.loss_history[0]
    grid = hs.time_grid
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all()) and len(grid) == 5
    assert not torch.equal(grid, torch.linspace(0, 1, 5))  # the grid moved
    assert all(torch.equal(weights[k], v) for k, v in f.state_dict().items())  # f untouched
    assert all(p.grad is None for p in f.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideFitWarning)  # its record covers the grid it chose
        hs.solve(f, x[:8], grid)


def test_without_the_grid_only_g_is_fitted_on_the_uniform_mesh(setup):
    f, traj, x, ref, fitted = setup
    hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32), time=True))
    hs.load_state_dict(fitted.state_dict())
    fit_budget(hs, traj, grid=False, iterations=50, progress=False)
    assert torch.equal(hs.time_grid, torch.linspace(0, 1, 5))
    assert any(not torch.equal(a, b) for a, b in zip(hs.state_dict().values(), fitted.state_dict().values()))


def _fitted(traj, g: bool = False, **options):
    torch.manual_seed(0)
    solver = NonStationarySolver("midpoint", steps=2, g=MLPHyperNet(2, hidden=(8,), time=True) if g else None)
    fit_budget(solver, traj, iterations=40, progress=False, seed=0, **options)
    return [p.detach().clone() for p in solver.parameters()] + [solver.time_grid]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_coefficients_without_g_default_to_their_own_recipe(setup):
    """Per-step coefficients alone start from the base tableau: by default they are fitted with
    COEFFICIENTS_RECIPE (a higher learning rate than BUDGET_RECIPE's, which refines a fitted g)."""
    f = setup[0]
    traj = harvest(f, torch.randn(64, 2), SPAN, steps=[2], base="midpoint")
    assert COEFFICIENTS_RECIPE.lr > BUDGET_RECIPE.lr
    default, gentle = _fitted(traj), _fitted(traj, recipe=BUDGET_RECIPE)
    assert _same(default, _fitted(traj, recipe=COEFFICIENTS_RECIPE))
    assert not _same(default, gentle)
    assert _same(_fitted(traj, lr=BUDGET_RECIPE.lr), gentle)  # a keyword still overrides the default
    with_g = _fitted(traj, g=True)  # with a g, the gentle recipe
    assert _same(with_g, _fitted(traj, g=True, recipe=BUDGET_RECIPE))
    assert not _same(with_g, _fitted(traj, g=True, recipe=COEFFICIENTS_RECIPE))


def test_one_budget_at_a_time(setup):
    f, _, _, _, fitted = setup
    two = harvest(f, torch.randn(8, 2), SPAN, steps=[4, 8])
    with pytest.raises(ValueError, match=r"fits one budget: the trajectories hold meshes of \[4, 8\] steps"):
        fit_budget(fitted, two, iterations=1, progress=False)
    with pytest.raises(TypeError, match="iteration"):
        fit_budget(fitted, two.replace(meshes={4: two.meshes[4]}), iteration=1)


def test_tune_fits_its_choice_for_the_budget_when_asked(setup, tmp_path):
    from torchdyn_hypersolvers import load, tune

    f = setup[0]
    x = torch.randn(192, 2)
    common = dict(nfe=[4], bases=(HyperEuler,), iterations=200, grid_iterations=20, g_sizes=((64, 64),), progress=False)
    plain = tune(f, x, SPAN, budget_iterations=0, **common)
    budget = tune(f, x, SPAN, budget_iterations=200, **common)
    mine, theirs = budget.choices[4], plain.choices[4]
    assert not theirs.fitted_for_budget and mine.fitted_for_budget  # kept: it lowers the held-out error
    assert mine.error < theirs.error and mine.uniform_error == theirs.uniform_error
    assert mine.learned_grid and torch.equal(mine.solver.time_grid, mine.mesh.to(mine.solver.time_grid))
    assert "HyperEuler (g and grid fitted for the budget)" in budget.to_markdown()
    budget.save(tmp_path)
    assert torch.equal(load(tmp_path / "nfe4.pt").time_grid, mine.solver.time_grid)
    with pytest.raises(ValueError, match="budget_iterations must be a non-negative int"):
        tune(f, x, SPAN, budget_iterations=-1, **common)
