import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    RK4,
    Alpha,
    ButcherTableau,
    Euler,
    FixedStepSolver,
    Heun,
    Midpoint,
    Ralston,
)
from torchdyn_hypersolvers._solver_names import resolve_base
from torchdyn_hypersolvers.tableaus import EULER, HEUN, MIDPOINT, RALSTON, alpha_tableau, rk_increment
from torchdyn_hypersolvers.tableaus import RK4 as RK4_TABLEAU

BASES = [EULER, MIDPOINT, HEUN, RALSTON, RK4_TABLEAU]


def time_dependent(t, z):
    """dz/dt = -2 t z, z(t) = z0 exp(-t**2): exercises the nodes c."""
    return -2.0 * t * z


def observed_order(tableau, steps=(8, 16, 32, 64)):
    z0 = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    errors = []
    for n in steps:
        t_span = torch.linspace(0.0, 1.5, n + 1, dtype=torch.float64)
        z1 = FixedStepSolver(tableau).solve(time_dependent, z0, t_span, return_trajectory=False)
        errors.append((z1 - z0 * math.exp(-(1.5**2))).abs().max().item())
    logs = [(math.log(1.5 / n), math.log(e)) for n, e in zip(steps, errors)]
    mx = sum(x for x, _ in logs) / len(logs)
    my = sum(y for _, y in logs) / len(logs)
    return sum((x - mx) * (y - my) for x, y in logs) / sum((x - mx) ** 2 for x, _ in logs)


@pytest.mark.parametrize("tableau", BASES + [alpha_tableau(0.3), alpha_tableau(1.5)], ids=lambda t: t.name)
def test_empirical_convergence_order(tableau):
    assert abs(observed_order(tableau) - tableau.order) < 0.2


@pytest.mark.parametrize(
    "ours, theirs", [(Euler(), "euler"), (Midpoint(), "midpoint"), (RK4(), "rk4")], ids=["euler", "midpoint", "rk4"]
)
def test_bases_match_torchdyn(ours, theirs, linear2d):
    x = torch.randn(5, 2, dtype=torch.float64)
    t_span = torch.linspace(0, 2, 17, dtype=torch.float64)
    _, ref = odeint(linear2d, x, t_span, solver=theirs)
    _, got = odeint(linear2d, x, t_span, solver=ours)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_heun_and_ralston_work_in_torchdyn_odeint(linear2d):
    x = torch.randn(4, 2, dtype=torch.float64)
    t_span = torch.linspace(0, 1, 65, dtype=torch.float64)
    exact = linear2d.flow(1.0, x)
    for solver in (Heun(), Ralston(), Alpha(0.75)):
        _, traj = odeint(linear2d, x, t_span, solver=solver)
        assert (traj[-1] - exact).abs().max() < 2e-3


def test_alpha_family_members():
    for alpha, named in [(0.5, MIDPOINT), (1.0, HEUN), (2.0 / 3.0, RALSTON)]:
        member = alpha_tableau(alpha)
        assert member.a[0][0] == pytest.approx(named.a[0][0])
        assert list(member.b) == pytest.approx(list(named.b))
        assert list(member.c) == pytest.approx(list(named.c))
    assert list(RALSTON.b) == pytest.approx([0.25, 0.75])


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.1, 3.0), dt=st.floats(0.01, 0.5))
def test_every_alpha_member_is_second_order_taylor_on_linear_fields(alpha, dt):
    # on dz/dt = A z every two-stage second-order method gives psi = A z + dt/2 A^2 z exactly
    A = torch.tensor([[0.3, -1.0], [1.2, -0.4]], dtype=torch.float64)
    z = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    dt = torch.tensor(dt, dtype=torch.float64)
    psi, k1 = rk_increment(alpha_tableau(alpha), lambda t, x: x @ A.T, torch.tensor(0.0), z, dt)
    torch.testing.assert_close(k1, z @ A.T)
    torch.testing.assert_close(psi, z @ A.T + dt / 2 * z @ (A @ A).T)


def test_rk_increment_evaluates_f_once_per_stage_and_reuses_k1():
    calls = []

    def f(t, z):
        calls.append(t)
        return -z

    z, t, dt = torch.ones(3, 2), torch.tensor(0.0), torch.tensor(0.1)
    for tableau in BASES:
        calls.clear()
        _, k1 = rk_increment(tableau, f, t, z, dt)
        assert len(calls) == tableau.stages
        calls.clear()
        rk_increment(tableau, f, t, z, dt, k1=k1)
        assert len(calls) == tableau.stages - 1


def test_bad_tableaus_and_names():
    with pytest.raises(ValueError, match="strictly lower triangular"):
        ButcherTableau("bad", 2, a=((0.5, 0.5),), b=(0.5, 0.5), c=(0.0, 1.0))
    with pytest.raises(ValueError, match="c\\[0\\] == 0"):
        ButcherTableau("bad", 1, a=(), b=(1.0,), c=(0.5,))
    with pytest.raises(ValueError, match="alpha > 0"):
        alpha_tableau(0.0)
    with pytest.raises(ValueError, match="unknown base solver 'rk45'.*euler"):
        resolve_base("rk45")


def test_rk_stages_takes_tensor_coefficients_and_applies_every_one():
    """A step's coefficients as tensors (a non-stationary solver's) give the tableau's step, zeros
    included (applied, not compared: a comparison would synchronise), with gradients to each."""
    from torchdyn_hypersolvers.tableaus import StepCoefficients, rk_stages

    field = lambda t, z: torch.sin(z) * (1.0 + t)  # noqa: E731
    z, t, dt = torch.randn(5, 3), torch.tensor(0.2), torch.tensor(0.1)
    rows = tuple(torch.tensor(row, requires_grad=True) for row in RK4_TABLEAU.a)
    b = torch.tensor(RK4_TABLEAU.b, requires_grad=True)
    c = torch.tensor(RK4_TABLEAU.c, requires_grad=True)
    psi, stages = rk_stages(StepCoefficients(rows, b, c), field, t, z, dt)
    psi_ref, stages_ref = rk_stages(RK4_TABLEAU, field, t, z, dt)
    torch.testing.assert_close(psi, psi_ref)
    assert len(stages) == len(stages_ref) == 4
    psi.sum().backward()
    assert all(row.grad is not None for row in rows)
    assert rows[1].grad[0] != 0  # the zero entry a_31 was applied: it has a gradient
    assert b.grad is not None and c.grad[1:].abs().sum() > 0
