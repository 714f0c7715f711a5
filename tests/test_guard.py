"""Guarded hypersolvers: the fallback, its counts, first-same-as-last, torchdyn, autograd, and the
state-space validity record."""

import warnings

import pytest
import torch
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    Euler,
    Guarded,
    Heun,
    HyperEuler,
    HyperHeun,
    MLPHyperNet,
    MultiStageHyperNet,
    MultiStageHyperSolver,
    fit,
    harvest,
    load,
    save,
)
from torchdyn_hypersolvers._records import validity_fields, validity_record
from torchdyn_hypersolvers._wrapped import WrappedSolver, unwrap
from torchdyn_hypersolvers.guard import GuardSummary
from torchdyn_hypersolvers.validity import Validity

A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=torch.float64)  # a damped rotation


class Counted(nn.Module):
    """``z' = A z`` (autonomous), counting its calls."""

    def __init__(self, a: torch.Tensor = A):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.calls = 0

    def forward(self, t, z, args=None):
        self.calls += 1
        return z @ self.a.T


class Zero(nn.Module):
    hypernet_convention = "dt_t_z_dz"

    def forward(self, dt, t, z, dz):
        return torch.zeros_like(z)


class Garbage(nn.Module):
    """Large, fixed nonsense: a g far out of its depth."""

    hypernet_convention = "dt_t_z_dz"

    def forward(self, dt, t, z, dz):
        return 1e3 * torch.sin(7 * z + 3) + 50.0


class Residual(nn.Module):
    """``scale`` times the exact Euler residual of ``z' = A z``: ``(expm(A dt) - I - A dt) z / dt^2``."""

    hypernet_convention = "dt_t_z_dz"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, dt, t, z, dz):
        m = torch.linalg.matrix_exp(A * dt) - torch.eye(2, dtype=z.dtype) - A * dt
        return self.scale * (z @ m.T) / dt**2


def _z0(n=8, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


T_SPAN = torch.linspace(0, 2, 11, dtype=torch.float64)


def test_garbage_g_falls_back_everywhere_to_the_base_solver_exactly():
    f, z0 = Counted(), _z0()
    guarded = Guarded(HyperEuler(Garbage()))
    with torch.no_grad(), pytest.warns(UserWarning, match=r"80 of 10 steps x 8 samples \(100.0%\) fell back"):
        out = guarded.solve(f, z0, T_SPAN)
        base = Euler().solve(f, z0, T_SPAN)
        unguarded = HyperEuler(Garbage()).solve(f, z0, T_SPAN)
    assert torch.equal(out, base)
    assert (unguarded - base).abs().max() > 1.0  # the unguarded one is far off
    summary = guarded.summary()
    assert isinstance(summary, GuardSummary)
    assert summary.fallbacks == 10 * 8 and summary.steps == 10 and summary.batch == 8 and summary.fraction == 1.0
    assert summary.per_sample.tolist() == [10] * 8
    assert summary.nfe == 1 + 2 * 10  # each step: its end point, then the base step's end point again
    assert "100.0%" in str(summary)


def test_heun_base_falls_back_to_heun_exactly():
    f, z0 = Counted(), _z0()
    guarded = Guarded(HyperHeun(Garbage()), warn_fraction=None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # warn_fraction=None: no warning
        out = guarded.solve(f, z0, T_SPAN)
    assert torch.equal(out, Heun().solve(f, z0, T_SPAN))
    assert guarded.summary().fallbacks == 80


def test_zero_g_never_falls_back_and_costs_one_evaluation_per_step():
    f, z0 = Counted(), _z0()
    guarded = Guarded(HyperEuler(Zero()), atol=0.0, rtol=0.0)  # no tolerance: the decision itself
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = guarded.solve(f, z0, T_SPAN)
    assert guarded.summary().fallbacks == 0
    assert f.calls == 10 + 1 == guarded.summary().nfe  # one per step, plus the last step's end point
    torch.testing.assert_close(out, Euler().solve(f, z0, T_SPAN), rtol=0, atol=1e-12)


def test_a_good_g_is_kept_and_a_harmful_one_is_dropped():
    f, z0 = Counted(), _z0()
    reference = torch.linalg.matrix_exp(A * 2.0)
    exact = z0 @ reference.T
    good = Guarded(HyperEuler(Residual(1.0)))
    with torch.no_grad():
        out = good.solve(f, z0, T_SPAN, return_trajectory=False)
    assert good.summary().fallbacks == 0 and good.summary().nfe == 11
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-10)  # g is the exact residual: the exact solution
    euler_error = (Euler().solve(f, z0, T_SPAN, return_trajectory=False) - exact).norm(dim=1)
    harmful = HyperEuler(Residual(-1.5))  # corrects the wrong way: worse than no correction
    guarded = Guarded(harmful)
    with torch.no_grad(), pytest.warns(UserWarning, match="fell back"):
        unguarded_error = (harmful.solve(f, z0, T_SPAN, return_trajectory=False) - exact).norm(dim=1)
        guarded_error = (guarded.solve(f, z0, T_SPAN, return_trajectory=False) - exact).norm(dim=1)
    assert (unguarded_error > euler_error).all()
    assert (guarded_error <= euler_error * (1 + 1e-9)).all()
    assert guarded.summary().fraction > 0.9


def test_through_neuralode_and_odeint_forward_and_backward_with_autograd():
    torch.manual_seed(0)
    g = MLPHyperNet(2).double()
    nn.init.normal_(g.net[-1].weight, std=0.5)  # a nonzero g: some samples fall back, some do not
    f, z0 = Counted(), _z0(16).requires_grad_()
    guarded = Guarded(HyperEuler(g), warn_fraction=None)
    for t_span in (T_SPAN, T_SPAN.flip(0)):
        fast = guarded.solve(f, z0, t_span)
        fast_summary = guarded.summary()
        assert 0 < fast_summary.fallbacks < 10 * 16
        _, by_odeint = odeint(f, z0, t_span, solver=guarded)
        _, by_node = NeuralODE(f, solver=guarded)(z0, t_span)
        torch.testing.assert_close(by_odeint, fast, rtol=0, atol=0)
        torch.testing.assert_close(by_node, fast, rtol=0, atol=0)
        assert guarded.summary().fallbacks == fast_summary.fallbacks
        assert guarded.summary().nfe == fast_summary.nfe
        grads = torch.autograd.grad(by_node[-1].square().sum(), (z0, f.a, *g.parameters()))
        expected = torch.autograd.grad(fast[-1].square().sum(), (z0, f.a, *g.parameters()))
        for got, want in zip(grads, expected):
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want)
        assert grads[2:][-2].abs().sum() > 0  # g's last layer gets a gradient


def test_gradients_are_the_hypersolvers_or_the_base_solvers():
    f = Counted()
    z0 = _z0().requires_grad_()
    for g, plain in ((Zero(), HyperEuler(Zero())), (Garbage(), Euler())):
        guarded = Guarded(HyperEuler(g), warn_fraction=None)
        got = torch.autograd.grad(guarded.solve(f, z0, T_SPAN)[-1].sum(), (z0, f.a))
        want = torch.autograd.grad(plain.solve(f, z0, T_SPAN)[-1].sum(), (z0, f.a))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_the_reused_stage_is_never_stale():
    f, z0 = Counted(), _z0()
    guarded = Guarded(HyperEuler(Zero()))  # never falls back: every step is hs's (Euler's)
    hs = guarded.hypersolver
    t, dt = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    with torch.no_grad():
        _, z1, _ = guarded.step(f, z0, t, dt)
        # the same tensor, another f: evaluated afresh
        other = Counted(2 * A)
        _, z2, _ = guarded.step(other, z1, t + dt, dt)
        torch.testing.assert_close(z2, hs.step(other, z1, t + dt, dt)[1])
        # changed in place since: evaluated afresh
        _, z3, _ = guarded.step(f, z2, t + 2 * dt, dt)
        z3.mul_(2)
        calls = f.calls
        _, z4, _ = guarded.step(f, z3, t + 3 * dt, dt)
        assert f.calls == calls + 2
        torch.testing.assert_close(z4, hs.step(f, z3, t + 3 * dt, dt)[1])

    class Timed(nn.Module):
        def forward(self, t, z):
            return (1 + t) * z @ A.T

    timed, stepper = Timed(), Guarded(HyperEuler(Zero()))
    with torch.no_grad():
        _, y1, _ = stepper.step(timed, z0, t, dt)
        _, y2, _ = stepper.step(timed, y1, t + 5 * dt, dt)  # not where the previous step ended
        torch.testing.assert_close(y2, hs.step(timed, y1, t + 5 * dt, dt)[1])


def test_summary_and_settings_are_checked():
    with pytest.raises(RuntimeError, match="no solve yet"):
        Guarded(HyperEuler(Zero())).summary()
    with pytest.raises(TypeError, match="wraps a HyperSolver"):
        Guarded(Euler())
    class OwnStep(HyperEuler):  # steps differently without saying how (step_parts): not guardable
        def step(self, f, x, t, dt, k1=None, args=None):
            return super().step(f, x, t, dt, k1, args)

    with pytest.raises(TypeError, match="overrides step"):
        Guarded(OwnStep(Zero()))
    with pytest.raises(TypeError, match="already guarded"):
        Guarded(Guarded(HyperEuler(Zero())))
    for bad in (dict(ratio=-1.0), dict(rtol=float("nan")), dict(atol=True), dict(warn_fraction=2.0), dict(margin=-1)):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            Guarded(HyperEuler(Zero()), **bad)
    with pytest.raises(ValueError, match="CUDA graph"):
        Guarded(HyperEuler(Zero())).solve(Counted(), _z0(), T_SPAN, cuda_graph=True)


def test_fit_records_the_state_range_and_the_guard_uses_it(tmp_path):
    f = Counted().requires_grad_(False)
    z0 = _z0(16)
    trajectories = harvest(f, z0, torch.tensor([0.0, 1.0], dtype=torch.float64), steps=[8])
    hs = HyperEuler(MLPHyperNet(2)).double()
    fit(hs, trajectories, iterations=3, progress=False, seed=0)
    record = hs.validity
    assert record.has_state_range
    flat = trajectories.states.reshape(-1, 2)
    assert record.state_min == pytest.approx(flat.amin(0).tolist())
    assert record.state_max == pytest.approx(flat.amax(0).tolist())
    assert "harvested states per feature in [" in hs.describe()
    assert record.outside(z0).sum() == 0 and record.outside(3 * z0 + 10).all()
    # saved and loaded; a record without the range (older files) still loads
    save(Guarded(hs), tmp_path / "g.pt")
    loaded = load(tmp_path / "g.pt")
    assert loaded.validity.state_min == record.state_min and loaded.describe() == hs.describe()
    old = {k: v for k, v in validity_record(record).items() if k not in ("state_min", "state_max")}
    assert not Validity(**validity_fields(old)).has_state_range
    with pytest.raises(ValueError, match="state_min"):
        Validity(**validity_fields({**old, "state_min": ["x", 1.0], "state_max": [1.0, 2.0]}))
    # margin: states outside the fitted range take the base step, whatever g
    guarded = Guarded(loaded, margin=0.0, warn_fraction=None)
    assert "outside the fitted state range" in guarded.describe()
    far = 3 * z0 + 10
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the validity record's own warning
        out = guarded.solve(f, far, torch.linspace(0, 1, 9, dtype=torch.float64))
    assert torch.equal(out, Euler().solve(f, far, torch.linspace(0, 1, 9, dtype=torch.float64)))
    assert guarded.summary().outside_fitted == 16 and guarded.summary().fraction == 1.0


def test_unbatched_state_and_state_dict():
    f = Counted()
    guarded = Guarded(HyperEuler(Garbage()), warn_fraction=None)
    with torch.no_grad():
        out = guarded.solve(f, _z0(1)[0], T_SPAN)
    assert out.shape == (11, 2) and guarded.summary().batch == 1 and guarded.summary().fallbacks == 10
    g = MLPHyperNet(2)
    assert set(Guarded(HyperEuler(g)).state_dict()) == {f"hypersolver.hypernet.{k}" for k in g.state_dict()}


class HalfBroken(nn.Module):
    """Nonsense for the samples with a positive first coordinate, zero for the others."""

    hypernet_convention = "dt_t_z_dz"

    def forward(self, dt, t, z, dz):
        return torch.where(z[:, :1] > 0, 1e3 * torch.sin(7 * z) + 50.0, torch.zeros_like(z))


def test_fallback_evaluates_f_on_the_fallen_samples_or_on_the_batch():
    z0 = _z0(16, seed=3)
    seen = {}
    for per_sample in (True, False):
        sizes = []

        def f(t, z):
            sizes.append(z.shape[0])
            return z @ A.T

        guarded = Guarded(HyperEuler(HalfBroken()), per_sample=per_sample, warn_fraction=None)
        with torch.no_grad():
            seen[per_sample] = guarded.solve(f, z0, T_SPAN)
        summary = guarded.summary()
        assert 0 < summary.fallbacks < 10 * 16 and summary.nfe == len(sizes)
        if per_sample:
            assert min(sizes) < 16 and sum(s < 16 for s in sizes) == len(sizes) - 11
        else:
            assert set(sizes) == {16}
    torch.testing.assert_close(seen[True], seen[False], rtol=0, atol=1e-12)


def _multistage(base, scale, inner=False):
    torch.manual_seed(0)
    net = MultiStageHyperNet(MLPHyperNet(2, hidden=(16,)), MLPHyperNet(2, hidden=(16,)) if inner else None).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return MultiStageHyperSolver(base, net)


@pytest.mark.parametrize("base, plain", [("euler", Euler), ("heun", Heun)])
def test_a_multistage_hypersolver_is_guarded(base, plain):
    f, z0 = Counted(), _z0()
    zero = Guarded(_multistage(base, 0.0), atol=0.0, rtol=0.0)  # a zero g: its base solver
    with torch.no_grad():
        assert torch.equal(zero.solve(f, z0, T_SPAN), plain().solve(f, z0, T_SPAN))
    assert zero.summary().fallbacks == 0
    hs = _multistage(base, 0.05)
    trusting = Guarded(hs, ratio=1e6, atol=1e6)  # nothing falls back: the unguarded solve, exactly
    with torch.no_grad():
        assert torch.equal(trusting.solve(f, z0, T_SPAN), hs.solve(f, z0, T_SPAN))
        assert (hs.solve(f, z0, T_SPAN) - plain().solve(f, z0, T_SPAN)).abs().max() > 1e-6  # the nets act
        _, by_odeint = odeint(f, z0, T_SPAN, solver=trusting)
    assert trusting.summary().fallbacks == 0 and torch.equal(by_odeint, hs.solve(f, z0, T_SPAN))
    broken = MultiStageHyperSolver(base, MultiStageHyperNet(Garbage()))
    guarded = Guarded(broken, warn_fraction=None)  # a nonsense outer g: dropped everywhere
    with torch.no_grad():
        assert torch.equal(guarded.solve(f, z0, T_SPAN), plain().solve(f, z0, T_SPAN))
    assert guarded.summary().fraction == 1.0
    with pytest.raises(TypeError, match="cannot check MultiStageHyperSolver's inner net"):
        Guarded(_multistage(base, 0.05, inner=True))  # its fallback would reuse the inner net's stages


def test_save_unwraps_a_wrapped_solver(tmp_path):
    hs = HyperEuler(MLPHyperNet(2))
    guarded = Guarded(hs)
    assert unwrap(guarded) is hs and unwrap(hs) is hs and isinstance(guarded, WrappedSolver)
    assert guarded.time_grid is None and guarded.base_solver is hs.base_solver and guarded.dtype is hs.dtype
    save(guarded, tmp_path / "g.pt")
    assert type(load(tmp_path / "g.pt")) is HyperEuler
