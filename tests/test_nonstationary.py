"""Non-stationary solvers: per-step learned Butcher coefficients for one budget."""

import copy
import pickle
import threading

import pytest
import torch
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import RK4, FixedStepSolver, Heun, HyperMidpoint, Midpoint, MLPHyperNet, harvest, load, save
from torchdyn_hypersolvers.budget import fit_budget
from torchdyn_hypersolvers.nonstationary import NonStationaryCoefficients, NonStationarySolver

SPAN = torch.linspace(0, 1, 2)
BASES = [("midpoint", Midpoint), ("heun", Heun), ("rk4", RK4)]


class Field(torch.nn.Module):
    """A time-dependent 2-D field (torchdyn's vf(t, x, args) signature too)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).to(dtype)

    def forward(self, t, z, args=None):
        return 2 * self.net(torch.cat([z, t.expand(len(z), 1).to(z.dtype)], 1))


def _perturbed(hs, scale=0.1):
    with torch.no_grad():
        hs.coefficients.deltas.normal_(0.0, scale)
    return hs


@pytest.mark.parametrize("base, classical", BASES)
@pytest.mark.parametrize("backwards", [False, True])
def test_it_is_its_base_solver_until_fitted_bitwise_in_float64(base, classical, backwards):
    f = Field(torch.float64)
    z0 = torch.randn(16, 2, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 4, dtype=torch.float64)
    t_span = t_span.flip(0) if backwards else t_span
    hs = NonStationarySolver(base, 3).double()
    assert torch.equal(hs.solve(f, z0, t_span), classical().solve(f, z0, t_span))
    _, traj = odeint(f, z0, t_span, solver=hs)
    _, expected = odeint(f, z0, t_span, solver=classical())
    assert torch.equal(traj, expected)


def test_with_g_it_is_the_hypersolver_on_its_base_until_fitted():
    f = Field(torch.float64)
    z0 = torch.randn(16, 2, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 5, dtype=torch.float64)
    g = MLPHyperNet(2, (16,), time=True).double()
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0.0, 0.3)  # a g that corrects
    hs = NonStationarySolver("midpoint", 4, g=copy.deepcopy(g))
    assert torch.equal(hs.solve(f, z0, t_span), HyperMidpoint(g).solve(f, z0, t_span))
    assert not torch.equal(hs.solve(f, z0, t_span), Midpoint().solve(f, z0, t_span))


def test_each_step_uses_its_own_coefficients_and_weights_sum_to_one():
    hs = _perturbed(NonStationarySolver("rk4", 3))
    tableaus = [hs.coefficients.tableau_at(k) for k in range(3)]
    assert len({t.a for t in tableaus}) == 3 and len({t.c for t in tableaus}) == 3
    for t in tableaus:
        assert abs(sum(t.b) - 1.0) < 1e-6 and t.c[0] == 0.0
    # a step-by-step solve with each step's own tableau gives the non-stationary solve
    f, z = Field(), torch.randn(8, 2)
    t_span = torch.tensor([0.0, 0.2, 0.7, 1.0])
    expected = z
    for k, tableau in enumerate(tableaus):
        expected = FixedStepSolver(tableau).step(f, expected, t_span[k], t_span[k + 1] - t_span[k])[1]
    with torch.no_grad():
        got = hs.solve(f, z, t_span, return_trajectory=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="step k=3 is outside the 3 steps"):
        hs.coefficients.tableau_at(3)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_a_few_hundred_parameters_at_most(steps):
    for base, stages in (("euler", 1), ("midpoint", 2), ("rk4", 4)):
        hs = NonStationarySolver(base, steps)
        count = sum(p.numel() for p in hs.parameters())
        assert count == steps * (stages * (stages + 1) // 2 + stages - 1) <= 104


def test_a_t_span_of_another_step_count_is_refused():
    f, z0 = Field(), torch.randn(4, 2)
    hs = NonStationarySolver("midpoint", 4)
    with pytest.raises(ValueError, match=r"coefficients for 4 steps, but t_span has 2 steps \(3 points\)"):
        hs.solve(f, z0, torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match=r"coefficients for 4 steps, but t_span has 5 steps"):
        NeuralODE(f, solver=hs)(z0, torch.linspace(0, 1, 6))
    with pytest.raises(RuntimeError, match="none was recorded"):
        NonStationarySolver("midpoint", 4).step(f, z0, torch.tensor(0.0), torch.tensor(0.25))
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        NonStationarySolver("midpoint", 0)


@pytest.mark.parametrize("backwards", [False, True])
def test_a_drop_in_torchdyn_solver(backwards):
    f = Field()
    z0 = torch.randn(8, 2)
    t_span = torch.tensor([0.0, 0.1, 0.45, 0.7, 1.0])
    t_span = t_span.flip(0) if backwards else t_span
    hs = _perturbed(NonStationarySolver("midpoint", 4, g=MLPHyperNet(2, (8,), time=True)))
    _, traj = NeuralODE(f, solver=hs)(z0, t_span)
    torch.testing.assert_close(traj, hs.solve(f, z0, t_span), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(traj, Midpoint().solve(f, z0, t_span))


@pytest.fixture(scope="module")
def budget():
    torch.manual_seed(0)
    f = Field()
    traj = harvest(f, torch.randn(256, 2), SPAN, steps=[2], base="midpoint")
    held_out = torch.randn(256, 2)
    ref = harvest(f, held_out, SPAN, steps=[2], base="midpoint").states[-1].float()
    return f, traj, held_out, ref


def _error(hs, f, x, ref, grid):
    with torch.no_grad():
        return float((hs.solve(f, x, grid, return_trajectory=False) - ref).norm(dim=1).mean())


def test_fit_budget_fits_the_coefficients_and_never_f(budget):
    f, traj, x, ref = budget
    uniform = torch.linspace(0, 1, 3)
    base = _error(Midpoint(), f, x, ref, uniform)
    weights = {k: v.clone() for k, v in f.state_dict().items()}
    alone = NonStationarySolver("midpoint", 2)
    report = fit_budget(alone, traj, grid=False, iterations=150, progress=False)
    on_uniform = _error(alone, f, x, ref, uniform)
    assert on_uniform < 0.7 * base, (base, on_uniform)  # the coefficients alone, on the uniform grid
    assert report.loss_history[-1] < report.loss_history[0]
    with_grid = NonStationarySolver("midpoint", 2)
    fit_budget(with_grid, traj, iterations=150, progress=False)
    assert _error(with_grid, f, x, ref, with_grid.time_grid) < 0.7 * base
    assert all(torch.equal(weights[k], v) for k, v in f.state_dict().items())  # f untouched
    assert all(p.grad is None for p in f.parameters())
    assert alone.fitted_by_trajectory


def test_fit_budget_fits_coefficients_and_g_together(budget):
    f, traj, x, ref = budget
    hs = NonStationarySolver("midpoint", 2, g=MLPHyperNet(2, (16, 16), time=True))
    before = {k: v.clone() for k, v in hs.state_dict().items()}
    fit_budget(hs, traj, iterations=60, progress=False)
    after = hs.state_dict()
    assert not torch.equal(before["hypernet.deltas"], after["hypernet.deltas"])
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("hypernet.g."))
    assert _error(hs, f, x, ref, hs.time_grid) < _error(Midpoint(), f, x, ref, torch.linspace(0, 1, 3))


def test_save_and_load_round_trip(tmp_path):
    f, z0 = Field(), torch.randn(8, 2)
    hs = _perturbed(NonStationarySolver("heun", 3, g=MLPHyperNet(2, (8,), time=True)))
    hs.time_grid = torch.tensor([0.0, 0.3, 0.6, 1.0])
    save(hs, tmp_path / "ns.pt")
    loaded = load(tmp_path / "ns.pt", g=NonStationaryCoefficients("heun", 3, g=MLPHyperNet(2, (8,), time=True)))
    assert type(loaded) is NonStationarySolver and loaded.steps == 3
    assert torch.equal(loaded.time_grid, hs.time_grid)
    with torch.no_grad():
        assert torch.equal(loaded.solve(f, z0, hs.time_grid), hs.solve(f, z0, hs.time_grid))
    with pytest.raises(ValueError, match="do not fit"):  # another budget: other shapes
        load(tmp_path / "ns.pt", g=NonStationaryCoefficients("heun", 4, g=MLPHyperNet(2, (8,), time=True)))
    with pytest.raises(ValueError, match="not from the solver's 'heun'"):
        load(tmp_path / "ns.pt", g=NonStationaryCoefficients("ralston", 3, g=MLPHyperNet(2, (8,), time=True)))


def test_copies_and_pickles_solve_alike_and_dtype_follows():
    f, z0 = Field(), torch.randn(8, 2)
    t_span = torch.linspace(0, 1, 4)
    hs = _perturbed(NonStationarySolver("rk4", 3))
    with torch.no_grad():
        out = hs.solve(f, z0, t_span)
        assert torch.equal(copy.deepcopy(hs).solve(f, z0, t_span), out)
        assert torch.equal(pickle.loads(pickle.dumps(hs)).solve(f, z0, t_span), out)
        double = copy.deepcopy(hs).double()
        assert double.solve(Field(torch.float64), z0.double(), t_span.double()).dtype == torch.float64
    with pytest.raises(TypeError, match="float32"):
        double.solve(f, z0, t_span)


def test_a_first_solve_under_inference_mode_does_not_break_training():
    f, z0 = Field(), torch.randn(8, 2)
    hs = NonStationarySolver("midpoint", 2)
    with torch.inference_mode():
        hs.solve(f, z0, torch.linspace(0, 1, 3))
    hs.solve(f, z0, torch.linspace(0, 1, 3), return_trajectory=False).square().sum().backward()
    assert hs.coefficients.deltas.grad is not None and bool(hs.coefficients.deltas.grad.ne(0).any())


def test_threads_sharing_a_solver_each_step_on_their_own_mesh():
    f, z0 = Field(), torch.randn(8, 2)
    hs = _perturbed(NonStationarySolver("midpoint", 3))
    grids = [torch.tensor([0.0, 0.1, 0.2, 1.0]), torch.tensor([0.0, 0.7, 0.8, 1.0])]
    with torch.no_grad():
        alone = [hs.solve(f, z0, grid) for grid in grids]
    results, barrier = {}, threading.Barrier(2)

    def work(i):
        barrier.wait()
        with torch.no_grad():
            results[i] = [hs.solve(f, z0, grids[i]) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert all(torch.equal(out, alone[i]) for out in results[i])
