"""Stage-aware g (issue 13, points 2 and 5): g reads every stage of the base step and z(0)."""

import pytest
import torch
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import (
    RK4,
    Heun,
    HyperEuler,
    HyperHeun,
    HyperRK4,
    MLPHyperNet,
    fit,
    harvest,
    load,
    pareto,
    save,
)
from torchdyn_hypersolvers._costs import CallCounter
from torchdyn_hypersolvers.fit import (
    correction_inputs,
    predicted_residuals,
    residual_data,
    residual_loss,
    residual_targets,
)
from torchdyn_hypersolvers.hypernets import ConvHyperNet, check_hypernet_input
from torchdyn_hypersolvers.tableaus import HEUN, rk_increment, rk_stages

SPAN = torch.linspace(0, 1, 5)  # dyadic steps: the fast path's and torchdyn's t and dt agree exactly


class Field3(nn.Module):
    """A non-autonomous 3-D field, as a CNF's [x, logp] state."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, t, x, args=None):
        return self.net(x) + torch.sin(3 * t)


class Forced(nn.Module):
    """dz/dt = A z + sin(3t) b: a non-autonomous linear 2-D field."""

    def __init__(self):
        super().__init__()
        self.register_buffer("A", torch.tensor([[-0.1, -1.0], [1.0, -0.1]]))
        self.register_buffer("b", torch.tensor([1.0, 0.0]))

    def forward(self, t, z, args=None):
        return z @ self.A.T + torch.sin(3 * t) * self.b


def paper_cnf_g():
    """The paper's CNF HyperHeun g: reads [x, f(x), f(x + ds f(x)), x0, ds] for a 3-D state."""
    return nn.Sequential(nn.Linear(13, 32), nn.Softplus(), nn.Linear(32, 32), nn.Softplus(), nn.Linear(32, 3))


def paper_step(f, g, x, x0, t, ds):
    """The paper's HyperHeun step, written out."""
    f0 = f(t, x)
    f1 = f(t + ds, x + ds * f0)
    xfx = torch.cat([x, f0, f1, x0, ds * torch.ones(x.shape[0], 1)], 1)
    return x + ds / 2 * (f0 + f1) + ds**3 * g(xfx)


def test_rk_increment_is_rk_stages_first_stage():
    f = Field3()
    z, t, dt = torch.randn(4, 3), torch.tensor(0.3), torch.tensor(0.25)
    psi, stages = rk_stages(HEUN, f, t, z, dt)
    psi2, k1 = rk_increment(HEUN, f, t, z, dt)
    assert len(stages) == 2 and torch.equal(psi, psi2) and torch.equal(k1, stages[0])
    assert torch.equal(stages[1], f(t + dt, z + dt * stages[0]))


@pytest.mark.parametrize("cls, s", [(HyperHeun, 2), (HyperRK4, 4)])
def test_one_evaluation_of_f_per_stage(cls, s):
    f, x0 = Field3(), torch.randn(8, 3)
    mlp = cls(MLPHyperNet(3, hidden=(8,), stages=s, time=True))
    concat = cls(nn.Linear((s + 2) * 3 + 1, 3), convention="concat_stages")
    for hs in (mlp, concat):
        counter = CallCounter(f)
        hs.solve(counter, x0, SPAN)
        assert counter.calls == s * (len(SPAN) - 1)
        model = NeuralODE(f, solver=hs)
        model(x0, SPAN)
        assert model.vf.nfe == s * (len(SPAN) - 1)


def test_the_papers_cnf_g_runs_as_written_bitwise_equal_to_its_step():
    torch.manual_seed(1)
    f, g = Field3(), paper_cnf_g()
    x0 = torch.randn(16, 3)
    hs = HyperHeun(g, convention="concat_stages")
    with torch.no_grad():
        # the fast path: t_k = t_span[k], dt_k = t_span[k+1] - t_span[k]
        x, direct = x0, [x0]
        for k in range(len(SPAN) - 1):
            x = paper_step(f, g, x, x0, SPAN[k], SPAN[k + 1] - SPAN[k])
            direct.append(x)
        assert torch.equal(hs.solve(f, x0, SPAN), torch.stack(direct))
        # torchdyn's loop: t accumulates, dt = t_span[k+1] - t
        x, t, dt, theirs = x0, SPAN[0], SPAN[1] - SPAN[0], [x0]
        for k in range(1, len(SPAN)):
            x = paper_step(f, g, x, x0, t, dt)
            theirs.append(x)
            t = t + dt
            if k < len(SPAN) - 1:
                dt = SPAN[k + 1] - t
        _, sol = NeuralODE(f, solver=hs)(x0, SPAN)
        assert torch.equal(sol, torch.stack(theirs))
    # the paper fits it by trajectory fitting on one step: gradients reach g through z0 and the stages
    out = hs.solve(f, x0, SPAN[[0, -1]], return_trajectory=False)
    out.abs().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


@pytest.mark.parametrize("cls, base, s", [(HyperHeun, Heun, 2), (HyperRK4, RK4, 4)])
def test_zero_initialised_stage_aware_mlp_is_the_base_solver(cls, base, s):
    f, x0 = Forced(), torch.randn(8, 2)
    hs = cls(MLPHyperNet(2, hidden=(8, 8), stages=s, time=True))
    assert hs.convention == "stages" and hs.reads_stages
    with torch.no_grad():
        assert torch.equal(hs.solve(f, x0, SPAN), base().solve(f, x0, SPAN))
        _, sol = NeuralODE(f, solver=hs)(x0, SPAN)
        assert torch.equal(sol, base().solve(f, x0, SPAN))


def test_default_mlp_hypernet_is_unchanged():
    torch.manual_seed(0)
    plain = MLPHyperNet(2, hidden=(16, 16))
    torch.manual_seed(0)
    old_shapes = nn.Sequential(nn.Linear(5, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 2))
    assert plain.config == {"state_dim": 2, "hidden": [16, 16], "activation": "silu"}
    assert plain.hypernet_convention == "dt_t_z_dz"
    for (name, p), q in zip(plain.net.named_parameters(), old_shapes.parameters()):
        assert p.shape == q.shape and (name.startswith("4.") or torch.equal(p, q))
    timed = MLPHyperNet(2, hidden=(16,), time=True, stages=2)
    assert timed.config["time"] is True and timed.config["stages"] == 2
    assert timed.net[0].in_features == 4 * 2 + 1 + 1
    assert ConvHyperNet(3, hidden=4, stages=2, time=True).net[0].in_channels == 4 * 3 + 2


def test_inputs_checked_once_per_solve_by_name():
    f, x0 = Field3(), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"reads 7 input features .* supplies 13 = 4\*3\+1"):
        HyperHeun(nn.Linear(7, 3), convention="concat_stages").solve(f, x0, SPAN)
    with pytest.raises(ValueError, match="reads 2 stages but the base step has 4"):
        HyperRK4(MLPHyperNet(3, stages=2)).solve(f, x0, SPAN)
    with pytest.raises(ValueError, match="not under 'dt_t_z_dz'"):
        HyperHeun(MLPHyperNet(3, stages=2), convention="dt_t_z_dz").solve(f, x0, SPAN)
    check_hypernet_input(nn.Linear(13, 3), "concat_stages", x0, stages=2)  # the paper's g fits
    fresh = HyperHeun(MLPHyperNet(3, stages=2))
    with pytest.raises(RuntimeError, match="initial state z0"):
        fresh.step(f, x0, SPAN[0], SPAN[1])
    fresh.record_initial_state(x0)
    fresh.step(f, x0, SPAN[0], SPAN[1])


def test_residual_helpers_and_pareto_with_a_stage_aware_g():
    torch.manual_seed(2)
    f = Forced()
    traj = Heun().solve(f, torch.randn(5, 2), SPAN)
    hs = HyperHeun(MLPHyperNet(2, hidden=(8,), stages=2, time=True))
    nn.init.normal_(hs.g.net[-1].weight)
    targets, stages = residual_targets(hs, f, traj, SPAN, with_stages=True)
    assert len(stages) == 2 and stages[0].shape == targets.shape == traj[1:].shape
    predicted = predicted_residuals(hs, f, traj, SPAN)
    with torch.no_grad():
        for k in range(len(SPAN) - 1):
            args = correction_inputs(hs, f, SPAN[k], traj[k], SPAN[k + 1] - SPAN[k], z0=traj[0])
            assert torch.allclose(predicted[k], hs.correction(*args), atol=1e-6)
    result = pareto(f, traj[0], SPAN[[0, -1]], solvers=[hs], steps=[4], timing=False)
    assert result.rows[0].macs_g > 0 and result.rows[0].nfe == 8


def test_residual_data_holds_stages_only_for_a_g_that_reads_them():
    f = Forced()
    trajectories = harvest(f, torch.randn(6, 2), SPAN[[0, -1]], steps=[4, 8])
    plain = residual_data(HyperHeun(MLPHyperNet(2, hidden=(8,))), trajectories)
    assert plain.stages is None and plain.z0 is None
    hs = HyperHeun(MLPHyperNet(2, hidden=(8,), stages=2))
    data = residual_data(hs, trajectories)
    assert len(data.stages) == 2 and data.stages[0] is data.dz and torch.equal(data.z0, trajectories.states[0])
    assert torch.equal(data.z, plain.z) and torch.equal(data.dz, plain.dz) and torch.equal(data.target, plain.target)
    index = torch.tensor([1, 4])
    batch = data.select(index)
    assert torch.equal(batch.z0, data.z0[index]) and torch.equal(batch.stages[1], data.stages[1][:, index])
    assert len(data.extend(batch)) == 8 and len(data.to("cpu").stages) == 2
    assert residual_loss(hs, data, index) >= 0
    with pytest.raises(ValueError, match="holds only f"):
        residual_loss(hs, plain)


def _held_out_error(hs, f, trajectories, n):
    t_span, ref = trajectories.mesh(n)
    with torch.no_grad():
        return (hs.solve(f, ref[0], t_span, return_trajectory=False) - ref[-1]).norm(dim=1).mean()


def test_stage_and_time_aware_g_beats_the_plain_one_on_a_non_autonomous_field():
    # measured stage/plain held-out terminal error ratio over seeds 0-4: 0.032-0.039
    f, span = Forced(), torch.tensor([0.0, 3.0])
    gen = torch.Generator().manual_seed(123)
    train = harvest(f, 2 * torch.rand(128, 2, generator=gen) - 1, span, steps=[8])
    test = harvest(f, 2 * torch.rand(64, 2, generator=gen) - 1, span, steps=[8])
    errors = {}
    for name, options in (("plain", {}), ("stages", {"time": True, "stages": 2})):
        torch.manual_seed(0)
        hs = HyperHeun(MLPHyperNet(2, hidden=(16, 16), **options))
        fit(hs, train, iterations=300, batch_size=32, seed=0, progress=False, noise_sample=0)
        errors[name] = float(_held_out_error(hs, f, test, 8))
    assert errors["stages"] / errors["plain"] < 0.2, errors
    assert errors["plain"] < float(_held_out_error(Heun(), f, test, 8))


def test_trajectory_fitting_records_each_solves_z0():
    f = Forced()
    trajectories = harvest(f, torch.randn(8, 2), SPAN[[0, -1]], steps=[2])
    hs = HyperHeun(MLPHyperNet(2, hidden=(8,), stages=2))
    report = fit(hs, trajectories, method="trajectory", iterations=5, seed=0, progress=False)
    assert len(report.loss_history) == 5 and report.loss_history[-1] < report.loss_history[0]


def test_save_load_round_trip_of_a_stage_aware_mlp_is_bit_exact(tmp_path):
    torch.manual_seed(3)
    f, x0 = Forced(), torch.randn(8, 2)
    hs = HyperRK4(MLPHyperNet(2, hidden=(8, 8), activation="tanh", stages=4, time=True))
    for p in hs.g.parameters():
        nn.init.normal_(p, std=0.3)
    save(hs, tmp_path / "hs.pt")
    loaded = load(tmp_path / "hs.pt")
    assert type(loaded) is HyperRK4 and loaded.convention == "stages"
    config = {"state_dim": 2, "hidden": [8, 8], "activation": "tanh", "time": True, "stages": 4}
    assert loaded.g.config == hs.g.config == config
    with torch.no_grad():
        assert torch.equal(loaded.solve(f, x0, SPAN), hs.solve(f, x0, SPAN))


def test_stage_option_on_hypereuler_is_refused_by_name():
    with pytest.raises(ValueError, match="reads 2 stages but the base step has 1"):
        HyperEuler(MLPHyperNet(2, stages=2)).solve(Forced(), torch.randn(2, 2), SPAN)


def test_compiled_step_reads_each_solves_z0():
    f, g = Field3(), paper_cnf_g()
    hs = HyperHeun(g, convention="concat_stages")
    with torch.no_grad():
        for _ in range(2):  # the second solve's z0 is not the first's, nor a stale copy of it
            x0 = torch.randn(4, 3)
            assert torch.allclose(hs.solve(f, x0, SPAN, compile="eager"), hs.solve(f, x0, SPAN), atol=1e-6)
