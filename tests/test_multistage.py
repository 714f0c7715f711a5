"""Multi-stage hypersolvers: inner nets correct the stages, an outer g corrects the step."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    FixedStepSolver,
    HyperMidpoint,
    HyperSolver,
    MLPHyperNet,
    MultiStageHyperNet,
    MultiStageHyperSolver,
    fit,
    harvest,
    load,
    save,
)
from torchdyn_hypersolvers.tableaus import EULER, HEUN, MIDPOINT, RK4

SPAN = torch.linspace(0, 2, 2)


class Oscillator(nn.Module):
    """A damped nonlinear oscillator with a nonlinear coupling."""

    def forward(self, t: Tensor, z: Tensor, args=None) -> Tensor:  # args: torchdyn's odeint passes them
        x, v = z[:, :1], z[:, 1:]
        return torch.cat([v, -3 * torch.sin(3 * x) - 0.3 * v + 0.5 * torch.tanh(2 * x * v)], 1)


class Counted(nn.Module):
    def __init__(self, f: nn.Module):
        super().__init__()
        self.f, self.calls = f, 0

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        self.calls += 1
        return self.f(t, z)


def multistage(base, inner: bool = True, outer=(32, 32), inner_hidden=(16, 16)) -> MultiStageHyperSolver:
    h = MLPHyperNet(2, hidden=inner_hidden) if inner else None
    return MultiStageHyperSolver(base, MultiStageHyperNet(MLPHyperNet(2, hidden=outer), h))


def perturb(module: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("tableau", [EULER, MIDPOINT, HEUN, RK4], ids=lambda t: t.name)
def test_zero_initialised_multistage_is_exactly_its_base(tableau):
    torch.manual_seed(0)
    f, x = Oscillator(), torch.randn(16, 2)
    t_span = torch.linspace(0, 1, 7)
    hs, base = multistage(tableau), FixedStepSolver(tableau)
    expected = base.solve(f, x, t_span)
    assert torch.equal(hs.solve(f, x, t_span), expected)
    node = NeuralODE(f, solver=FixedStepSolver(tableau))(x, t_span)[1]
    assert torch.equal(NeuralODE(f, solver=hs)(x, t_span)[1], node)
    assert torch.equal(odeint(f, x, t_span, solver=hs)[1], odeint(f, x, t_span, solver=FixedStepSolver(tableau))[1])


@pytest.mark.parametrize("tableau", [EULER, MIDPOINT, RK4], ids=lambda t: t.name)
def test_one_evaluation_of_f_per_stage(tableau):
    torch.manual_seed(0)
    f, hs = Counted(Oscillator()), multistage(tableau)
    perturb(hs.hypernet)
    hs.solve(f, torch.randn(8, 2), torch.linspace(0, 1, 6))
    assert f.calls == 5 * tableau.stages


def test_the_step_is_the_corrected_stages_plus_the_outer_term():
    torch.manual_seed(0)
    f, x, t, dt = Oscillator(), torch.randn(8, 2), torch.tensor(0.3), torch.tensor(0.25)
    hs = multistage(HEUN)
    perturb(hs.hypernet)
    g, h = hs.hypernet.outer, hs.hypernet.inner
    with torch.no_grad():
        k1 = f(t, x) + h(dt, t, x, f(t, x))
        z2 = x + dt * k1
        k2 = f(t + dt, z2) + h(dt, t + dt, z2, f(t + dt, z2))
        direct = x + dt * (0.5 * k1 + 0.5 * k2) + dt**3 * g(dt, t, x, f(t, x))
        _, stepped, _ = hs.step(f, x, t, dt)
    torch.testing.assert_close(stepped, direct, rtol=1e-6, atol=1e-7)
    assert torch.equal(hs.correction(dt, t, x, f(t, x)), g(dt, t, x, f(t, x)))  # g is the outer net


def test_without_an_inner_net_it_is_the_plain_hypersolver():
    torch.manual_seed(0)
    f, x, t_span = Oscillator(), torch.randn(8, 2), torch.linspace(0, 1, 5)
    hs = multistage(MIDPOINT, inner=False)
    perturb(hs.hypernet)
    plain = HyperMidpoint(hs.hypernet.outer)
    assert torch.equal(hs.solve(f, x, t_span), plain.solve(f, x, t_span))


def test_save_load_round_trips_both_nets(tmp_path):
    torch.manual_seed(0)
    f, x, t_span = Oscillator(), torch.randn(8, 2), torch.linspace(0, 1, 5)
    hs = multistage(RK4)
    perturb(hs.hypernet)
    assert {k.split(".")[0] for k in hs.hypernet.state_dict()} == {"outer", "inner"}
    save(hs, tmp_path / "ms.pt")
    g = MultiStageHyperNet(MLPHyperNet(2, hidden=(32, 32)), MLPHyperNet(2, hidden=(16, 16)))
    back = load(tmp_path / "ms.pt", g=g)
    assert type(back) is MultiStageHyperSolver and back.tableau == RK4
    assert torch.equal(back.solve(f, x, t_span), hs.solve(f, x, t_span))


def test_refuses_a_plain_hypernet_and_a_stage_reading_inner_net():
    with pytest.raises(TypeError, match="MultiStageHyperNet"):
        MultiStageHyperSolver(MIDPOINT, MLPHyperNet(2))
    with pytest.raises(ValueError, match="inner"):
        MultiStageHyperNet(MLPHyperNet(2), MLPHyperNet(2, stages=2))
    with pytest.raises(ValueError, match="must match"):
        hs = MultiStageHyperSolver(MIDPOINT, MultiStageHyperNet(MLPHyperNet(2), lambda dt, t, z, dz: z[:, :1]))
        hs.solve(Oscillator(), torch.randn(4, 2), torch.linspace(0, 1, 3))
    assert isinstance(multistage(MIDPOINT), HyperSolver)


def test_trajectory_fitted_multistage_beats_the_plain_hypersolver():
    """Same base, outer width, iterations and seed; held-out terminal error over three seeds."""
    f, steps = Oscillator(), 4
    torch.manual_seed(0)
    train = harvest(f, 2 * torch.rand(256, 2) - 1, SPAN, steps=[steps])
    test = harvest(f, 2 * torch.rand(256, 2) - 1, SPAN, steps=[steps])
    t_span, ref = test.mesh(steps)

    def terminal_error(hs: HyperSolver) -> float:
        with torch.no_grad():
            return (hs.solve(f, ref[0], t_span, return_trajectory=False) - ref[-1]).norm(dim=1).mean().item()

    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        plain = HyperMidpoint(MLPHyperNet(2, hidden=(32, 32)))
        torch.manual_seed(seed)
        ms = multistage(MIDPOINT)
        for hs in (plain, ms):
            fit(hs, train, method="trajectory", iterations=200, seed=seed, progress=False)
        ratios.append(terminal_error(ms) / terminal_error(plain))
    # measured 0.41, 0.37, 0.35
    assert max(ratios) < 0.75 and sum(ratios) / len(ratios) < 0.6, ratios


def test_residual_fitting_warns_that_the_inner_net_is_not_fitted():
    torch.manual_seed(0)
    trajectories = harvest(Oscillator(), torch.rand(32, 2) * 2 - 1, SPAN, steps=[4])
    hs = multistage(MIDPOINT)
    inner = [p.detach().clone() for p in hs.hypernet.inner.parameters()]
    with pytest.warns(UserWarning, match="only g is fitted; use method='trajectory'"):
        fit(hs, trajectories, iterations=5, progress=False, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(inner, hs.hypernet.inner.parameters()))


def test_load_rebuilds_package_classes_by_name_and_user_subclasses_as_the_generic_class():
    class Mine(HyperSolver):
        tableau = MIDPOINT

    assert HyperSolver.named("MultiStageHyperSolver") is MultiStageHyperSolver
    assert HyperSolver.named("HyperMidpoint") is HyperMidpoint
    assert HyperSolver.named("Mine") is HyperSolver  # defined outside the package
