import copy
import math
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import small_mlp
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import HyperEuler as TorchdynHyperEuler
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    ConvHyperNet,
    Euler,
    FixedStepSolver,
    HyperAlpha,
    HyperEuler,
    HyperHeun,
    HyperMidpoint,
    HyperRalston,
    HyperRK4,
    HyperSolver,
    MLPHyperNet,
    MultiStageHyperSolver,
    register,
    solvers,
    validity,
)
from torchdyn_hypersolvers.fit import (
    base_residuals,
    correction_inputs,
    map_stage_corrections,
    predicted_residuals,
    residual_targets,
)
from torchdyn_hypersolvers.registry import registered, unregister
from torchdyn_hypersolvers.solvers import SolveState, StepParts
from torchdyn_hypersolvers.tableaus import EULER, HEUN, MIDPOINT, rk_increment
from torchdyn_hypersolvers.tableaus import RK4 as RK4_TABLEAU

HYPER_CLASSES = [HyperEuler, HyperMidpoint, HyperHeun, HyperRalston, HyperRK4]


def _perturb(g, scale=0.1):
    """Give a zero-initialised hypernet a non-zero last layer."""
    with torch.no_grad():
        last = [m for m in g.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        last.weight.normal_(0, scale)
        last.bias.normal_(0, scale)
    return g


class TxHyperNet(nn.Module):
    """torchdyn tutorial style: forward(t, x)."""

    def __init__(self, dim=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, dim))

    def forward(self, t, x):
        return self.net(x)


@pytest.mark.parametrize("cls", HYPER_CLASSES)
def test_unfitted_hypersolver_is_its_base(cls):
    f = small_mlp()
    x, t_span = torch.randn(16, 2), torch.linspace(0, 1, 9)
    hs = cls(MLPHyperNet(2))
    _, got = NeuralODE(f, solver=hs)(x, t_span)
    _, ref = odeint(lambda t, z: f(z), x, t_span, solver=FixedStepSolver(hs.tableau))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_hyper_alpha_uses_its_alpha():
    assert HyperAlpha(MLPHyperNet(2), alpha=2 / 3).tableau.b == pytest.approx((0.25, 0.75))


@pytest.mark.parametrize("tableau", [EULER, MIDPOINT, HEUN, RK4_TABLEAU], ids=lambda t: t.name)
def test_theorem1_local_error_scales_as_delta_dt_to_the_p_plus_1(tableau, linear2d):
    """g = exact residual + delta * u  =>  one-step error = delta * dt**(p+1) * |u|."""
    p = tableau.order
    u = torch.tensor([[0.6, -0.8]], dtype=torch.float64)

    def g_for(delta):
        def g(dt, t, z, dz):
            psi, _ = rk_increment(tableau, linear2d, t, z, dt)
            exact = (linear2d.flow(dt, z) - z - dt * psi) / dt ** (p + 1)
            return exact + delta * u.expand_as(z)

        return g

    z0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    dts = [0.2, 0.1, 0.05, 0.025]
    for delta in (1e-1, 1e-2):
        hs = HyperSolver(tableau, g_for(delta), convention="explicit")
        errors = []
        for dt in dts:
            dt = torch.tensor(dt, dtype=torch.float64)
            _, z1, _ = hs.step(linear2d, z0, torch.tensor(0.0, dtype=torch.float64), dt)
            errors.append((z1 - linear2d.flow(dt, z0)).norm(dim=1).max().item())
        slope = (math.log(errors[0]) - math.log(errors[-1])) / (math.log(dts[0]) - math.log(dts[-1]))
        assert abs(slope - (p + 1)) < 0.2
        # the constant is delta * |u| = delta: error / dt**(p+1) recovers delta
        assert errors[-1] / dts[-1] ** (p + 1) == pytest.approx(delta, rel=1e-3)


@pytest.mark.parametrize("cls, per_step", [(HyperEuler, 1), (HyperMidpoint, 2), (HyperHeun, 2), (HyperRK4, 4)])
def test_nfe_per_step_counted_by_torchdyn(cls, per_step):
    model = NeuralODE(small_mlp(), solver=cls(_perturb(MLPHyperNet(2))))
    model(torch.randn(8, 2), torch.linspace(0, 1, 11))
    assert model.vf.nfe == 10 * per_step


def test_three_g_conventions_give_the_documented_step():
    f = small_mlp()
    vf = lambda t, z: f(z)  # noqa: E731
    z, t, dt = torch.randn(6, 2), torch.tensor(0.3), torch.tensor(0.1)
    concat = nn.Linear(2 + 2 + 1, 2)
    tx = TxHyperNet()
    explicit = _perturb(MLPHyperNet(2))
    expected = {
        "concat": concat(torch.cat([z, f(z), dt.expand(6, 1)], 1)),
        "tx": tx(t, z),
        "dt_t_z_dz": explicit(dt, t, z, f(z)),
    }
    for name, g in [("concat", concat), ("tx", tx), ("dt_t_z_dz", explicit)]:
        hs = HyperEuler(g)
        assert hs.convention == name
        _, z1, _ = hs.step(vf, z, t, dt)
        torch.testing.assert_close(z1, z + dt * f(z) + dt**2 * expected[name])


def test_drop_in_for_torchdyn_hypereuler():
    """Replacing torchdyn's HyperEuler import leaves a torchdyn hypersolver script working."""
    f, g = small_mlp(), TxHyperNet()
    x, t_span = torch.randn(10, 2), torch.linspace(0, 1, 6)
    theirs, ours = TorchdynHyperEuler(g), HyperEuler(g)
    _, ref = NeuralODE(f, solver=theirs)(x, t_span)
    _, got = NeuralODE(f, solver=ours)(x, t_span)
    torch.testing.assert_close(got, ref)
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_image_states_float64_reversed_time_and_gradients():
    c = 3
    f = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, c, 3, padding=1)).double()
    g = _perturb(ConvHyperNet(c, hidden=8)).double()
    model = NeuralODE(f, solver=HyperEuler(g), sensitivity="autograd")
    x = torch.randn(4, c, 6, 6, dtype=torch.float64)
    t_back = torch.linspace(1, 0, 5, dtype=torch.float64)
    _, traj = model(x, t_back)
    assert traj.shape == (5, 4, c, 6, 6) and traj.dtype == torch.float64
    # same numbers as the package's own solve, which applies torchdyn's reversal convention
    torch.testing.assert_close(traj, model.solver.solve(lambda t, z: f(z), x, t_back))
    traj[-1].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_concat_convention_on_images_like_the_paper():
    c = 4
    f = nn.Conv2d(c, c, 3, padding=1)
    g = nn.Sequential(nn.Conv2d(c + c + 1, 8, 3, padding=1), nn.PReLU(), nn.Conv2d(8, c, 3, padding=1))
    model = NeuralODE(f, solver=HyperEuler(g))
    x = torch.randn(2, c, 5, 5)
    _, traj = model(x, torch.linspace(0, 1, 4))
    assert traj.shape == (4, 2, c, 5, 5)
    # by hand: z <- z + dt f(z) + dt^2 g(cat[z, f(z), dt]) along the channels, dt a constant channel
    dt, z, euler = 1 / 3, x, x
    with torch.no_grad():
        for k in range(3):
            dz = f(z)
            z = z + dt * dz + dt**2 * g(torch.cat([z, dz, torch.full_like(z[:, :1], dt)], 1))
            euler = euler + dt * f(euler)
            torch.testing.assert_close(traj[k + 1], z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(traj[0], x)
    assert (traj[-1] - euler).abs().max() > 1e-3  # g's correction is there, and it is not Euler


def test_odeint_save_at_and_trajectory():
    f = small_mlp()
    hs = HyperHeun(_perturb(MLPHyperNet(2)))
    x, t_span = torch.randn(5, 2), torch.linspace(0, 1, 9)
    _, full = odeint(lambda t, z: f(z), x, t_span, solver=hs)
    t_saved, saved = odeint(lambda t, z: f(z), x, t_span, solver=hs, save_at=t_span[::4])
    torch.testing.assert_close(saved, full[::4])
    model = NeuralODE(f, solver=hs)
    torch.testing.assert_close(model.trajectory(x, t_span), full)


def test_adjoint_with_classical_solver_adjoint_and_base_solver_without():
    f = small_mlp()
    x, t_span = torch.randn(4, 2), torch.linspace(0, 1, 5)
    model = NeuralODE(f, solver=HyperEuler(_perturb(MLPHyperNet(2))), sensitivity="adjoint", solver_adjoint="dopri5")
    _, traj = model(x, t_span)
    traj[-1].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f.parameters())

    # issue 12: without solver_adjoint, torchdyn hands the flattened adjoint state to the hypersolver,
    # which solves it with its base solver and no correction, and says so (once per solver)
    g = _perturb(MLPHyperNet(2))
    grads = []
    for solver_adjoint in (None, Euler()):
        f.zero_grad()
        node = NeuralODE(f, solver=HyperEuler(g), sensitivity="adjoint")
        if solver_adjoint is not None:
            node.solver_adjoint = solver_adjoint
        _, traj = node(x, t_span)
        if solver_adjoint is None:
            with pytest.warns(UserWarning, match="adjoint.*base solver"):
                traj[-1].sum().backward()
        else:
            traj[-1].sum().backward()
        grads.append([p.grad.clone() for p in f.parameters()])
    for got, ref in zip(*grads):
        assert torch.equal(got, ref)


def test_vectorised_residuals_match_the_per_step_definition():
    f = small_mlp()
    vf = lambda t, z: f(z) * torch.cos(t)  # noqa: E731  -- time-dependent
    hs = HyperMidpoint(_perturb(MLPHyperNet(2)))
    x, t_span = torch.randn(7, 2), torch.linspace(0, 2, 11)
    ref_traj = FixedStepSolver(RK4_TABLEAU).solve(vf, x, torch.linspace(0, 2, 101))[::10]
    res = base_residuals(hs, vf, ref_traj, t_span)
    pred = predicted_residuals(hs, vf, ref_traj, t_span)
    for k in range(10):
        dt = t_span[k + 1] - t_span[k]
        psi, k1 = rk_increment(MIDPOINT, vf, t_span[k], ref_traj[k], dt)
        torch.testing.assert_close(res[k], (ref_traj[k + 1] - ref_traj[k] - dt * psi) / dt**3)
        torch.testing.assert_close(pred[k], hs.g(dt, t_span[k], ref_traj[k], k1))


@pytest.mark.parametrize("backward", [False, True])
def test_residuals_of_its_own_solution_are_g(backward):
    """On the hypersolver's own trajectory, the base residual is exactly g's prediction."""
    f = small_mlp(dtype=torch.float64)
    hs = HyperRK4(_perturb(MLPHyperNet(2)).double())
    x = torch.randn(5, 2, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 6, dtype=torch.float64)
    if backward:
        t_span = t_span.flip(0)
    vf = lambda t, z: f(z)  # noqa: E731
    traj = hs.solve(vf, x, t_span)
    torch.testing.assert_close(base_residuals(hs, vf, traj, t_span), predicted_residuals(hs, vf, traj, t_span))
    base_traj = hs.solve(vf, x, t_span, correct=False)
    assert base_residuals(hs, vf, base_traj, t_span).abs().max() < 1e-8


def test_register_by_name_explicitly():
    f = small_mlp()
    hs = HyperEuler(_perturb(MLPHyperNet(2)))
    x, t_span = torch.randn(3, 2), torch.linspace(0, 1, 4)
    register("test-hyper-euler", hs)
    try:
        assert "test-hyper-euler" in registered()
        _, by_name = NeuralODE(f, solver="test-hyper-euler")(x, t_span)
        _, direct = NeuralODE(f, solver=hs)(x, t_span)
        torch.testing.assert_close(by_name, direct)
        _, via_odeint = odeint(lambda t, z: f(z), x, t_span, solver="test-hyper-euler")
        torch.testing.assert_close(via_odeint, direct)
    finally:
        unregister("test-hyper-euler")
    with pytest.raises(ValueError, match="shadow torchdyn's solver"):
        register("euler", hs)
    with pytest.raises(ValueError, match="shadow torchdyn's solver"):
        register("dopri5", hs)


def test_import_registers_nothing():
    code = (
        "from torchdyn.numerics.solvers.ode import SOLVER_DICT; before = set(SOLVER_DICT); "
        "import torchdyn_hypersolvers; assert set(SOLVER_DICT) == before, set(SOLVER_DICT) - before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class BadThreeArgs(nn.Module):
    def forward(self, t, z, dz):
        return z


def test_bad_inputs_raise_clear_errors():
    f = small_mlp()
    x = torch.randn(4, 2)
    wrong = HyperEuler(nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"returned shape \(4, 3\) for a state of shape \(4, 2\)"):
        NeuralODE(f, solver=wrong)(x, torch.linspace(0, 1, 3))
    for adaptive in ("dopri5", "tsit5"):
        with pytest.raises(ValueError, match="adaptive"):
            HyperSolver(adaptive, MLPHyperNet(2))
    from torchdyn.numerics.solvers.ode import DormandPrince45

    with pytest.raises(ValueError, match="adaptive"):
        HyperSolver(DormandPrince45(), MLPHyperNet(2))
    with pytest.raises(ValueError, match="implicit"):
        HyperSolver("ieuler", MLPHyperNet(2))
    with pytest.raises(TypeError, match=r"3 required arguments \('t', 'z', 'dz'\)"):
        HyperEuler(BadThreeArgs())
    with pytest.raises(ValueError, match="unknown hypernet convention"):
        HyperEuler(BadThreeArgs(), convention="xyz")
    hs = HyperEuler(MLPHyperNet(2))
    with pytest.raises(ValueError, match=r"at least two points, got shape \(1,\)"):
        hs.solve(lambda t, z: f(z), x, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="at least two points"):
        base_residuals(hs, lambda t, z: f(z), x[None], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        hs.solve(lambda t, z: f(z), x, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match=r"MLPHyperNet\(state_dim=2\) expects states \(B, 2\), got \(4, 3\)"):
        hs.solve(lambda t, z: z, torch.randn(4, 3), torch.linspace(0, 1, 3))


def _package_subclasses(cls):
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("torchdyn_hypersolvers."):
            yield sub
        yield from _package_subclasses(sub)


def test_step_parts_is_the_one_extension_point():
    """No package hypersolver overrides step: each steps by HyperSolver.step over its step_parts."""
    classes = set(_package_subclasses(HyperSolver))
    assert {HyperEuler, HyperRK4, HyperAlpha, MultiStageHyperSolver} <= classes
    for cls in classes:
        assert cls.step is HyperSolver.step, cls
    f, hs = small_mlp(), HyperHeun(_perturb(MLPHyperNet(2)))
    x, t, dt = torch.randn(4, 2), torch.tensor(0.1), torch.tensor(0.2)
    parts = hs.step_parts(lambda t, z: f(z), x, t, dt)
    assert isinstance(parts, StepParts) and len(parts.stages) == 2
    assert torch.equal(hs.step(lambda t, z: f(z), x, t, dt)[1], x + dt * parts.increment + parts.correction)


def test_solve_state_is_one_object_that_copies_and_pickles_fresh():
    hs = HyperHeun(MLPHyperNet(2, stages=2))
    hs.time_grid = [0.0, 0.4, 1.0]  # configuration: copied with the solver
    x0 = torch.randn(3, 2, requires_grad=True)
    copies = []

    def f(t, z):
        if not copies:  # mid-solve: hs holds this solve's z0, a non-leaf tensor (not deep-copyable)
            copies.append(copy.deepcopy(hs))
            copies.append(pickle.loads(pickle.dumps(hs)))
        return -z

    z0 = 2 * x0
    hs.solve(f, z0, torch.linspace(0, 1, 3))
    assert hs.solve_state.z0 is z0 and hs.correcting
    for other in copies:
        assert isinstance(other.solve_state, SolveState) and other.solve_state is not hs.solve_state
        assert other.solve_state.z0 is None and other.correcting and not other.solve_state.adjoint_warned
        assert other.time_grid.tolist() == pytest.approx([0.0, 0.4, 1.0])
    assert not {"_uncorrected", "_initial_state", "_reset_queued", "_adjoint_warned"} & set(hs.__dict__)


def test_deprecated_residual_methods_warn_and_give_the_same_numbers():
    f = small_mlp()
    vf = lambda t, z: f(z)  # noqa: E731
    hs = HyperHeun(_perturb(MLPHyperNet(2)))
    x, t_span = torch.randn(5, 2), torch.linspace(0, 1, 6)
    traj = hs.solve(vf, x, t_span).detach()
    with pytest.warns(DeprecationWarning, match="HyperSolver.base_residuals is deprecated"):
        assert torch.equal(hs.base_residuals(vf, traj, t_span), base_residuals(hs, vf, traj, t_span))
    with pytest.warns(DeprecationWarning, match="HyperSolver.residual_targets is deprecated"):
        old = hs.residual_targets(vf, traj, t_span, with_stages=True)
    new = residual_targets(hs, vf, traj, t_span, with_stages=True)
    assert torch.equal(old[0], new[0]) and all(torch.equal(a, b) for a, b in zip(old[1], new[1]))
    with pytest.warns(DeprecationWarning, match="HyperSolver.hypersolver_residuals is deprecated"):
        assert torch.equal(hs.hypersolver_residuals(vf, traj, t_span), predicted_residuals(hs, vf, traj, t_span))
    with pytest.warns(DeprecationWarning, match="HyperSolver.correction_inputs is deprecated"):
        old = hs.correction_inputs(vf, t_span[0], x, t_span[1])
    assert all(torch.equal(a, b) for a, b in zip(old, correction_inputs(hs, vf, t_span[0], x, t_span[1])))
    with pytest.warns(DeprecationWarning, match="map_stage_corrections moved"):
        assert solvers.map_stage_corrections is map_stage_corrections
    with pytest.warns(DeprecationWarning, match="validity.describe is deprecated"):
        assert validity.describe(hs) == hs.describe() == solvers.describe(hs)
