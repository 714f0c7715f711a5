"""tune's finalists: a wider default g per budget, the budget fit on by default, every finalist timed,
and cheapest() picking by measured time."""

import json
import math
import warnings

import pytest
import torch
from torch import nn

from torchdyn_hypersolvers import HyperEuler, HyperMidpoint, MLPHyperNet, tune, tuning
from torchdyn_hypersolvers._reference import reference_solve
from torchdyn_hypersolvers.nonstationary import NonStationarySolver
from torchdyn_hypersolvers.tuning import Choice, Search, TuneResult, _budget_iterations

SPAN = torch.linspace(0, 1, 2)


class _Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, t, z):
        return self.net(z)


def _field():
    torch.manual_seed(0)
    return _Field()


@pytest.fixture(scope="module")
def ladder():
    f = _field()
    x = torch.randn(160, 2, generator=torch.Generator().manual_seed(3))
    sizes = ((16, 16), (48, 48, 48))
    result = tune(f, x, SPAN, nfe=[2, 4], bases=(HyperEuler, HyperMidpoint), stage_aware=False, iterations=120,
                  grid_iterations=10, g_sizes=sizes, progress=False)
    return f, result, sizes


def test_every_budget_has_a_finalist_per_g_size_and_its_choice_is_the_most_accurate(ladder):
    f, result, sizes = ladder
    for n, choice in result.choices.items():
        finalists = [c for c in result.options if c.nfe == n]
        alone = [c for c in finalists if c.g_size is None]
        assert sorted(c.g_size for c in finalists if c.g_size) == sorted(sizes)
        if choice.solver.tableau.stages > 1:  # and the best base's per-step coefficients, without g, or why not
            skipped = [why for what, why in result.pruned.items() if what.endswith(f"(no g) at NFE {n}")]
            assert len(alone) + len(skipped) == 1
            if alone:
                assert isinstance(alone[0].solver, NonStationarySolver)
                assert alone[0].solver.coefficients.g is None and "(no g)" in alone[0].label
        assert choice in finalists and choice.error == min(c.error for c in finalists)
        for c in finalists:
            assert math.isfinite(c.wall_ms) and c.wall_ms > 0
            if c.g_size:
                g = c.solver.coefficients.g if isinstance(c.solver, NonStationarySolver) else c.solver.hypernet
                widths = [m.out_features for m in g.net if isinstance(m, nn.Linear)][:-1]
                assert tuple(widths) == c.g_size
            # the recorded error is the finalist's own, on its own mesh
            z = result.held_out
            ref = reference_solve(f, z, SPAN, "dopri5", 1e-9, 1e-9)[-1]
            with torch.no_grad():
                final = c.solver.solve(f, z, c.mesh, return_trajectory=False)
                ref = ref.detach()
            assert float((final - ref).norm(dim=1).mean()) == pytest.approx(c.error, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("factor", [1e-9, 1e9])
def test_coefficients_alone_are_fitted_only_when_the_base_is_within_alone_factor_of_the_best(monkeypatch, factor):
    monkeypatch.setattr(tuning, "ALONE_FACTOR", factor)
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(3))
    result = tune(_field(), x, SPAN, nfe=[4], bases=(HyperMidpoint,), stage_aware=False, iterations=60,
                  budget_iterations=20, g_sizes=((16, 16),), progress=False)
    alone = [c for c in result.options if c.g_size is None]
    skipped = {what: why for what, why in result.pruned.items() if "(no g)" in what}
    if factor < 1:  # the base is always more than 1e-9 times the hypersolver's error: never fitted, and said why
        assert not alone and list(skipped) == ["midpoint with per-step coefficients (no g) at NFE 4"]
        (why,) = skipped.values()
        assert "not fitted" in why and "1e-09x the best hypersolver's" in why
    else:
        assert len(alone) == 1 and not skipped and alone[0].fitted_for_budget


def test_budget_fit_is_on_by_default_and_kept_only_when_it_helps(ladder):
    _, result, _ = ladder
    assert any(c.fitted_for_budget for c in result.options)
    for c in result.options:
        if c.fitted_for_budget:
            assert c.learned_grid and c.error < c.uniform_error
            assert torch.equal(c.solver.time_grid, c.mesh.to(c.solver.time_grid))


def test_cheapest_is_the_fastest_finalist_that_meets_the_error(ladder):
    _, result, _ = ladder
    goal = max(c.error for c in result.options)
    fastest = min(result.options, key=lambda c: (c.wall_ms, c.nfe))
    hs, mesh = result.cheapest(error=goal)
    assert hs is fastest.solver and mesh is fastest.mesh
    text = result.to_markdown()
    assert "| NFE | finalist | g | held-out error | wall (ms) |" in text and "48x3" in text


def _choice(nfe: int, error: float, wall_ms: float) -> Choice:
    hs = HyperEuler(MLPHyperNet(2, hidden=(4,)))
    return Choice(nfe, f"n{nfe}", hs, torch.linspace(0, 1, nfe + 1), nfe, error, error, wall_ms, False)


def test_cheapest_picks_by_wall_time_not_by_nfe():
    slow4, fast8 = _choice(4, 1e-3, wall_ms=9.0), _choice(8, 1e-4, wall_ms=2.0)
    result = TuneResult({4: slow4, 8: fast8}, None, {}, torch.zeros(1, 2), torch.zeros(1), options=[slow4, fast8])
    assert result.cheapest(error=2e-3)[0] is fast8.solver  # both meet it; NFE 8 is faster here
    assert result.fastest(error=5e-4) is fast8
    with pytest.raises(ValueError, match="no tuned budget reaches a held-out error of 1e-05"):
        result.cheapest(error=1e-5)


def test_budget_iterations_default_to_half_the_recipes_and_shrink_with_the_nfe():
    search = Search()
    assert search.budget_iterations is None
    assert _budget_iterations(search, 2) == search.recipe.iterations // 2 == _budget_iterations(search, 4)
    assert _budget_iterations(search, 16) == search.recipe.iterations // 8
    assert _budget_iterations(Search(budget_iterations=300), 8) == 150
    assert _budget_iterations(Search(budget_iterations=0), 2) == 0


def test_a_user_g_is_not_laddered_and_the_json_lists_the_finalists_with_a_distance(tmp_path):
    f = _field()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    result = tune(f, x, SPAN, nfe=[2], bases=(HyperEuler,), iterations=30, grid_iterations=5, budget_iterations=20,
                  hypernet=lambda cls, aware: MLPHyperNet(2, hidden=(8,), time=True), distance="mmd", progress=False)
    assert len(result.options) == 1 and result.options[0].g_size is None
    # the sample distance of every finalist and of every row of the table
    assert result.options[0].distance >= 0 and all(r.distance is not None for r in result.table)
    lines = result.to_markdown().splitlines()
    assert lines[0].endswith("| MMD to reference |") and lines[2].count("|") == lines[0].count("|")
    result.save(tmp_path)
    numbers = json.loads((tmp_path / "tune.json").read_text())
    assert [o["nfe"] for o in numbers["options"]] == [2] and numbers["options"][0]["wall_ms"] > 0


@pytest.mark.parametrize("sizes", [(), ((),), ((0,),), (64,), ((32, True),), "64"])
def test_bad_g_sizes_are_named(sizes):
    with pytest.raises(ValueError, match="g_sizes must be a non-empty tuple of hidden-layer tuples"):
        Search(g_sizes=sizes)


def test_an_unknown_distance_is_named():
    with pytest.raises(ValueError, match="unknown distance 'w3'"):
        Search(distance="w3")


def test_a_wider_g_is_fitted_once_per_candidate_on_the_meshes_of_the_budgets_it_won(monkeypatch):
    """The wider g serves only the budgets where its candidate is best: it is fitted on those meshes
    alone (not on every mesh the candidate was fitted on), once per candidate."""
    import torchdyn_hypersolvers.tuning as tuning

    calls = []
    fit_one = tuning._fit_one

    def recording(run, cls, aware, meshes, size):
        calls.append((cls.__name__, size, tuple(meshes.steps)))
        return fit_one(run, cls, aware, meshes, size)

    monkeypatch.setattr(tuning, "_fit_one", recording)
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(5))
    sizes = ((8, 8), (16, 16))
    result = tune(_field(), x, SPAN, nfe=[2, 3, 4], bases=(HyperEuler, HyperMidpoint), stage_aware=False,
                  iterations=20, grid_iterations=2, budget_iterations=4, g_sizes=sizes, progress=False)
    won = {}
    for n in result.choices:
        rows = [r for r in result.table if r.kind == "hyper" and r.nfe == n]
        best = min(rows, key=lambda r: r.terminal_error)
        won.setdefault(best.solver, set()).add(best.steps)
    wide = [(name, steps) for name, size, steps in calls if size == sizes[1]]
    assert sorted(wide) == sorted((label, tuple(sorted(steps))) for label, steps in won.items())
    narrow = {name: steps for name, size, steps in calls if size == sizes[0]}
    for label, steps in narrow.items():  # the candidates themselves: every mesh they are compared on
        assert steps == tuple(sorted({r.steps for r in result.table if r.kind == "hyper" and r.solver == label}))
    assert any(len(narrow[label]) > len(steps) for label, steps in won.items())  # the case this is about


def _spy_dtypes(monkeypatch):
    """Record g's dtype at each residual fit, and g's and f's dtypes at each budget fit."""
    seen = {"residual": [], "budget": []}
    fit, fit_budget = tuning.fit, tuning.fit_budget

    def residual(hs, trajectories, **options):
        seen["residual"].append(next(hs.parameters()).dtype)
        return fit(hs, trajectories, **options)

    def budget(hs, trajectories, **options):
        f = trajectories.f
        f_dtype = next(f.parameters()).dtype if isinstance(f, nn.Module) else "callable"
        seen["budget"].append((next(hs.parameters()).dtype, f_dtype))
        return fit_budget(hs, trajectories, **options)

    monkeypatch.setattr(tuning, "fit", residual)
    monkeypatch.setattr(tuning, "fit_budget", budget)
    return seen


FLOAT64_SEARCH = dict(nfe=[2, 4], bases=(HyperEuler, HyperMidpoint), stage_aware=False, iterations=60,
                      budget_iterations=20, g_sizes=((16, 16),), progress=False)


def test_a_float64_model_is_fitted_in_float32_and_tuned_in_float64(monkeypatch):
    """g's fits run in float32 (a float32 copy of f for the budget fits); the user's model stays float64 and
    unchanged, and every finalist comes back in float64, its held-out error measured in float64."""
    seen = _spy_dtypes(monkeypatch)
    f = _field().double()
    before = {k: v.clone() for k, v in f.state_dict().items()}
    x = torch.randn(96, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = tune(f, x, SPAN, **FLOAT64_SEARCH)
    assert seen["residual"] and set(seen["residual"]) == {torch.float32}
    assert seen["budget"] and set(seen["budget"]) == {(torch.float32, torch.float32)}
    assert all(torch.equal(before[k], v) for k, v in f.state_dict().items())
    assert all(p.dtype == torch.float64 for p in f.parameters())
    z = result.held_out
    with torch.no_grad():
        ref = reference_solve(f, z, SPAN, "dopri5", 1e-10, 1e-10)[-1]
    for choice in result.options:
        assert {p.dtype for p in choice.solver.parameters()} <= {torch.float64}
        assert choice.mesh.dtype == torch.float64
        if choice.fitted_for_budget:
            assert choice.solver.time_grid.dtype == torch.float64
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # fitted for this model (not for its float32 copy), on these steps
            final = choice.solver.solve(f, z, choice.mesh, return_trajectory=False)
        assert final.dtype == torch.float64
        assert float((final - ref).norm(dim=1).mean()) == pytest.approx(choice.error, rel=1e-3)


def test_a_float64_field_that_cannot_run_in_float32_is_budget_fitted_in_float64(monkeypatch):
    seen = _spy_dtypes(monkeypatch)
    weight = torch.tensor([[-1.0, 0.5], [-0.5, -1.0]], dtype=torch.float64)

    def field(t, z):  # float64 numbers in a closure: float32 states are refused by matmul
        return torch.tanh(z @ weight)

    x = torch.randn(96, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    result = tune(field, x, SPAN, **FLOAT64_SEARCH)
    assert set(seen["residual"]) == {torch.float32}  # residual targets need no f in float32
    assert seen["budget"] and set(seen["budget"]) == {(torch.float64, "callable")}
    assert all(p.dtype == torch.float64 for c in result.options for p in c.solver.parameters())
