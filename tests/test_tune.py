"""tune(): the best hypersolver per budget on held-out inputs, learned time grids, save/load."""

import math
import re
import warnings

import pytest
import torch
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    Euler,
    HyperEuler,
    HyperMidpoint,
    HyperRK4,
    MLPHyperNet,
    Recipe,
    load,
    pareto,
    tune,
    tuning,
)
from torchdyn_hypersolvers._reference import reference_solve
from torchdyn_hypersolvers._time_grid import fit_time_grid, grid_from_logits
from torchdyn_hypersolvers.tuning import PRUNE_FACTOR, Search, _resolve_search
from torchdyn_hypersolvers.validity import OutsideFitWarning, Validity, outside_fit_ignored

T_SPAN = torch.linspace(0, 1, 2)


class _Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, t, z, args=None):  # torchdyn passes args to a field that takes t
        return self.net(z)


def _field():
    torch.manual_seed(0)
    return _Field()


@pytest.fixture(scope="module")
def tuned():
    f = _field()
    model = NeuralODE(f, solver="dopri5")
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    result = tune(
        model,
        x,
        T_SPAN,
        nfe=[4, 8],
        bases=(HyperEuler, HyperMidpoint),
        stage_aware="both",  # Midpoint with a plain and a stage-aware g: a real choice at every budget
        iterations=150,
        grid_iterations=30,
        budget_iterations=0,  # the residual-fitted candidates' choice (finalists: test_tune_finalists.py)
        g_sizes=((64, 64),),
        progress=False,
    )
    return model.vf, model, x, result


def _held_out_error(f, z, solver, mesh):
    ref = reference_solve(f, z, T_SPAN, "dopri5", 1e-9, 1e-9)[-1]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the tuned mesh is inside the solver's validity record
        final = solver.solve(f, z, mesh, return_trajectory=False)
    return float((final - ref).detach().norm(dim=1).mean())


def test_solver_for_is_the_best_candidate_of_a_direct_pareto_run(tuned):
    f, model, _, result = tuned
    assert set(result.choices) == {4, 8}
    for nfe, choice in result.choices.items():
        fitted = {label: hs for label, hs in result.candidates.items() if nfe % hs.tableau.stages == 0}
        assert len(fitted) >= 2  # a real choice between candidates
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            direct = pareto(
                model,
                result.held_out,
                T_SPAN,
                solvers=fitted,
                steps=sorted({nfe // hs.tableau.stages for hs in fitted.values()}),
                timing=False,
            )
        errors = {
            label: direct.row(label, steps=nfe // hs.tableau.stages).terminal_error for label, hs in fitted.items()
        }
        assert choice.label == min(errors, key=errors.get)
        hs, mesh = result.solver_for(nfe)
        assert hs is choice.solver and mesh is choice.mesh
        for a, b in zip(hs.hypernet.parameters(), result.candidates[choice.label].hypernet.parameters()):
            assert torch.equal(a, b)
        assert len(mesh) == nfe // hs.tableau.stages + 1


def test_cheapest_meets_the_error_on_held_out_inputs(tuned):
    f, _, _, result = tuned
    e4, e8 = result.choices[4].error, result.choices[8].error
    assert e8 < e4
    goal = math.sqrt(e4 * e8)  # met at NFE 8, not at 4
    hs, mesh = result.cheapest(error=goal)
    assert hs is result.choices[8].solver
    assert _held_out_error(f, result.held_out, hs, mesh) <= goal
    hs, mesh = result.cheapest(error=e4 * 1.01)
    assert hs is result.choices[4].solver
    with pytest.raises(ValueError, match="no tuned budget reaches"):
        result.cheapest(error=e8 / 100)
    with pytest.raises(KeyError, match="tuned budgets"):
        result.solver_for(16)


def test_table_compares_with_classical_solvers_and_dopri5(tuned):
    result = tuned[3]
    kinds = {r.kind for r in result.table}
    assert kinds == {"hyper", "fixed", "adaptive"}
    text = result.to_markdown()
    assert "dopri5" in text and "best classical" in text
    # HyperEuler is pruned at a budget exactly when Euler's held-out error there is over PRUNE_FACTOR
    # times the best classical solver's (Midpoint, the closer base, is always kept)
    pruned_at = set()
    for n in (4, 8):
        classical = {r.solver: r.terminal_error for r in result.table if r.kind == "fixed" and r.nfe == n}
        ratio = classical["euler"] / min(classical.values())
        if ratio > PRUNE_FACTOR:
            pruned_at.add(n)
            assert f"{ratio:.3g}x the best classical" in result.pruned[f"HyperEuler at NFE {n}"]
    assert set(result.pruned) == {f"HyperEuler at NFE {n}" for n in pruned_at}
    expected = {"HyperMidpoint", "HyperMidpoint (stage-aware g)"} | ({"HyperEuler"} if pruned_at != {4, 8} else set())
    assert set(result.candidates) == expected


def _transient():
    """A fast transient near t0: z relaxes at rate 5 from about 3 towards sin(3t) (uniform Euler
    steps of 0.25 are stable but miss the transient)."""
    return lambda t, z: -5.0 * (z - torch.sin(3 * t))


def test_learned_grid_is_monotone_with_exact_ends_and_beats_uniform_on_a_fast_transient():
    f = _transient()
    z0 = 3.0 + torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    t_span = torch.tensor([0.0, 2.0])
    z1 = reference_solve(f, z0, t_span, "dopri5", 1e-9, 1e-9)[-1]
    euler = Euler()
    grid = fit_time_grid(euler, f, z0, z1, t_span, steps=8, iterations=150)
    assert grid[0] == 0.0 and grid[-1] == 2.0 and len(grid) == 9
    assert bool((grid[1:] > grid[:-1]).all())
    uniform = torch.linspace(0, 2, 9)
    with torch.no_grad():
        err = {
            name: float((euler.solve(f, z0, mesh, return_trajectory=False) - z1).norm(dim=1).mean())
            for name, mesh in (("uniform", uniform), ("learned", grid))
        }
    assert err["learned"] < 0.2 * err["uniform"], err


def test_grid_from_logits_backward_and_bounds():
    grid = grid_from_logits(torch.zeros(4), torch.tensor(1.0), torch.tensor(0.0))
    assert torch.allclose(grid, torch.linspace(1, 0, 5))
    with pytest.raises(ValueError, match="one entry per step"):
        grid_from_logits(torch.zeros(2, 2), torch.tensor(0.0), torch.tensor(1.0))


def test_grid_fitting_leaves_g_and_f_untouched():
    f = _field()
    hs = HyperEuler(MLPHyperNet(2))
    before = [p.clone() for p in hs.parameters()]
    z0 = torch.randn(32, 2)
    z1 = reference_solve(f, z0, T_SPAN, "dopri5", 1e-7, 1e-7)[-1]
    fit_time_grid(hs, f, z0, z1, T_SPAN, steps=3, iterations=5)
    assert all(torch.equal(a, b) for a, b in zip(before, hs.parameters()))
    assert all(p.grad is None for p in (*hs.parameters(), *f.parameters()))


def test_save_load_round_trip_of_each_choice_is_bit_exact(tuned, tmp_path):
    f, _, _, result = tuned
    result.save(tmp_path / "tuned")
    assert (tmp_path / "tuned" / "tune.md").exists() and (tmp_path / "tuned" / "tune.json").exists()
    z = result.held_out[:16]
    for nfe, choice in result.choices.items():
        hs = load(tmp_path / "tuned" / f"nfe{nfe}.pt")
        assert torch.equal(hs.time_grid, choice.mesh)  # learned or uniform, the mesh comes back
        mesh = choice.mesh
        with torch.no_grad():
            expected = choice.solver.solve(f, z, mesh)
            assert torch.equal(hs.solve(f, z, mesh), expected)
            _, through_node = NeuralODE(f, solver=hs)(z, mesh)
            _, through_odeint = odeint(f, z, mesh, solver=hs)
        assert torch.equal(through_node, expected)
        assert torch.equal(through_odeint, expected)


def test_learned_grid_is_in_the_validity_record_and_describe():
    f = _transient()
    x = 3.0 + torch.randn(64, 1, generator=torch.Generator().manual_seed(2))
    result = tune(
        f,
        x,
        torch.tensor([0.0, 2.0]),
        nfe=[8],
        bases=(HyperEuler,),
        stage_aware=False,
        iterations=100,
        grid_iterations=100,
        progress=False,
    )
    choice = result.choices[8]
    assert choice.learned_grid and choice.error < choice.uniform_error
    hs = choice.solver
    assert torch.equal(hs.time_grid, choice.mesh)
    assert "time grid of 8 steps" in hs.describe()
    dts = (choice.mesh[1:] - choice.mesh[:-1]).abs()
    assert hs.validity.dt_min <= float(dts.min()) and float(dts.max()) <= hs.validity.dt_max


def test_match_sets_the_target_and_max_seconds_prunes():
    f = _field()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    result = tune(
        f,
        x,
        T_SPAN,
        nfe=[4, 8],
        match="dopri5:1e-3",
        bases=(HyperEuler, HyperMidpoint),
        iterations=20,
        grid=False,
        max_seconds=0.0,
        progress=False,
    )
    assert result.target_error == result.table.row("dopri5", tol=1e-3).terminal_error
    assert len(result.candidates) == 1  # the first candidate is always fitted
    assert any("budget was spent" in why for why in result.pruned.values())


def test_bad_arguments_are_refused_by_name():
    f = _field()
    x = torch.randn(16, 2)
    with pytest.raises(ValueError, match="match must be"):
        tune(f, x, T_SPAN, match="dopri5", progress=False)
    with pytest.raises(ValueError, match="nfe must be"):
        tune(f, x, T_SPAN, nfe=[0, 4], progress=False)
    with pytest.raises(ValueError, match="held_out"):
        tune(f, x, T_SPAN, held_out=1.5, progress=False)
    with pytest.raises(ValueError, match="one entry per input"):
        tune(f, x, T_SPAN, labels=torch.zeros(3), progress=False)
    with pytest.raises(ValueError, match="bases must be"):
        tune(f, x, T_SPAN, bases=("euler",), progress=False)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match="pass hypernet="):
        tune(lambda t, z: conv(z), torch.randn(16, 2, 4, 4), T_SPAN, nfe=[4], bases=(HyperEuler,), progress=False)


def test_scaled_mlp_hypernet_standardises_and_round_trips(tmp_path):
    from torchdyn_hypersolvers import save
    from torchdyn_hypersolvers.fit import residual_data

    def vf(t, z):
        return torch.stack([10 * z[:, 1], -z[:, 0] - 3 * z[:, 1]], 1)

    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 0.5])
    g = MLPHyperNet(2, hidden=(8,), scaled=True)
    hs = HyperMidpoint(g)
    trajectories = harvest_for(vf, x, hs)
    mesh = torch.linspace(0, 1, 5)
    with torch.no_grad():  # zero last layer: the base solver, scaled or not
        assert torch.equal(hs.solve(vf, x, mesh), hs.base_solver.solve(vf, x, mesh))
    data = residual_data(hs, trajectories)
    g.standardize_(data)
    assert torch.allclose(g.z_mean, data.z.flatten(0, 1).mean(0))
    assert torch.allclose(g.out_std, data.target.flatten(0, 1).std(0))
    assert float(g.z_std[0]) > 3 * float(g.z_std[1])  # the features' own scales
    with torch.no_grad():
        g.net[-1].weight.normal_()
        g.net[-1].bias.normal_()
    save(hs, tmp_path / "g.pt")
    again = load(tmp_path / "g.pt")
    assert again.hypernet.config["scaled"] is True
    with torch.no_grad():
        assert torch.equal(again.solve(vf, x, mesh), hs.solve(vf, x, mesh))
    with pytest.raises(ValueError, match="scaled=True"):
        MLPHyperNet(2).standardize_(data)


def harvest_for(vf, x, hs):
    from torchdyn_hypersolvers import harvest

    return harvest(vf, x, T_SPAN, steps=[4], base=hs)


def test_outside_fit_ignored_silences_the_grid_fit_without_touching_the_validity_record():
    f = _field()
    hs = HyperEuler(MLPHyperNet(2))
    record = hs.validity = Validity(0.5, 0.5, (2,), "fitted on 2 steps")
    seen = []

    def recording(t, z):
        seen.append(hs.validity)
        return f(t, z)

    z0 = torch.randn(16, 2)
    z1 = reference_solve(f, z0, T_SPAN, "dopri5", 1e-7, 1e-7)[-1]
    with pytest.warns(OutsideFitWarning):  # 8 steps of 0.125: outside the record
        hs.solve(recording, z0, torch.linspace(0, 1, 9))
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_time_grid(hs, recording, z0, z1, T_SPAN, steps=8, iterations=3)
        with outside_fit_ignored(), torch.no_grad():
            hs.solve(recording, z0, torch.linspace(0, 1, 9))
    assert seen and all(v is record for v in seen) and hs.validity is record


def test_tuned_rk4_with_a_scaled_g_is_scaled_once():
    f = _field()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
    result = tune(f, x, T_SPAN, nfe=[4], bases=(HyperRK4,), iterations=5, grid=False, progress=False)
    hs = result.candidates["HyperRK4 (stage-aware g)"]
    assert hs.hypernet.scales_output and not torch.equal(hs.hypernet.out_std, torch.ones(2))  # standardised
    assert hs.residual_scale == 1.0  # g's own output scale, not a second one
    iterations = result.fit_reports["HyperRK4 (stage-aware g)"].iterations
    assert iterations == 5 * tuning.HIGH_ORDER_ITERATIONS  # order 4: fitted longer
    euler = tune(f, x, T_SPAN, nfe=[4], bases=(HyperEuler,), iterations=5, grid=False, progress=False)
    assert euler.fit_reports["HyperEuler"].iterations == 5  # a lower order: the recipe's


@pytest.mark.parametrize(
    "stage_aware, labels",
    [
        (True, {"HyperMidpoint (stage-aware g)", "HyperRK4 (stage-aware g)"}),
        (False, {"HyperMidpoint", "HyperRK4"}),
        ("both", {"HyperMidpoint", "HyperMidpoint (stage-aware g)", "HyperRK4", "HyperRK4 (stage-aware g)"}),
    ],
)
def test_stage_aware_picks_the_g_of_bases_of_several_stages(stage_aware, labels):
    f = _field()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(5))
    options = dict(nfe=[4], bases=(HyperMidpoint, HyperRK4), iterations=3, grid=False, budget_iterations=0)
    result = tune(f, x, T_SPAN, stage_aware=stage_aware, progress=False, **options)
    assert set(result.candidates) == labels
    for label, hs in result.candidates.items():  # a stage-aware g reads every stage (and z0), a plain one z, f, dt
        assert hs.reads_stages == label.endswith("(stage-aware g)")
    assert Search().stage_aware is True


@pytest.mark.parametrize("bad", [1, 0, "yes", None, [True]])
def test_bad_stage_aware_is_refused_by_value(bad):
    with pytest.raises(ValueError, match=re.escape(f"stage_aware must be True, False or 'both', got {bad!r}")):
        Search(stage_aware=bad)


def test_search_options_and_keywords():
    f = _field()
    x = torch.randn(16, 2)
    search = Search(bases=[HyperEuler], recipe=Recipe(iterations=7), grid=False)
    assert search.bases == (HyperEuler,) and _resolve_search(search, {}) is search
    assert _resolve_search(search, {"iterations": 3}).recipe == Recipe(iterations=3)
    assert _resolve_search(None, {"held_out": 0.5, "seed": 2}) == Search(held_out=0.5, seed=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'iteration'"):
        tune(f, x, T_SPAN, iteration=3, progress=False)
    with pytest.raises(ValueError, match="grid_iterations must be a non-negative int, got -1"):
        Search(grid_iterations=-1)
    with pytest.raises(ValueError, match="max_seconds"):
        Search(max_seconds=-1.0)
    with pytest.raises(ValueError, match="nfe must be a positive int, got True"):
        tune(f, x, T_SPAN, nfe=[True, 4], progress=False)
