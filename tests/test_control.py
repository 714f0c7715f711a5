"""Controlled systems: g reads the control carried in the state, the held control, rollouts,
harvest and fit across controls, the m4b side channel, and the control tutorial's --quick run."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import Euler, HyperEuler, HyperMidpoint, Midpoint, MLPHyperNet, fit, harvest, load, save
from torchdyn_hypersolvers._reference import reference_solve
from torchdyn_hypersolvers.control import ControlledSystem, rollout

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def pendulum(t, x, u):
    q, p = x[..., :1], x[..., 1:]
    return torch.cat([p, -0.5 * q - 9.81 * torch.sin(q) - 0.01 * p + u], dim=-1)


def controller(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    return lambda t, x: 5 * torch.tanh(net(x)), net


def randomised(g: nn.Module, seed=1) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.5)
    return g


SYSTEM = ControlledSystem(pendulum, control_dim=1)
T = torch.linspace(0, 1, 11)


class ReadsControl(nn.Module):
    """g(dt, t, z, dz) = [u * z_q, u]: its output depends on the control u = z[:, 2:]."""

    def forward(self, dt, t, z, dz):
        u = z[:, 2:]
        return torch.cat([u * z[:, :1], u, torch.zeros_like(u)], dim=1)


def test_g_receives_the_control_and_its_output_depends_on_it():
    hs = HyperEuler(ReadsControl())
    x = torch.tensor([[0.3, -0.2], [0.3, -0.2]])
    z = SYSTEM.join(x, torch.tensor([[1.0], [-2.0]]))  # same state, two controls
    dt = torch.tensor(0.1)
    _, z_next, _ = hs.step(SYSTEM, z, torch.tensor(0.0), dt)
    _, z_euler, _ = Euler().step(SYSTEM, z, torch.tensor(0.0), dt)
    torch.testing.assert_close(z_next, z_euler + dt**2 * ReadsControl()(dt, 0, z, None), rtol=0, atol=0)
    assert not torch.equal(z_next[0, :2] - z_euler[0, :2], z_next[1, :2] - z_euler[1, :2])
    # the template: g reads u (its output changes with u alone) and never corrects u's channels
    g = randomised(MLPHyperNet(3, hidden=(16,), control_dim=1))
    dz = SYSTEM(0.0, z)
    out = g(dt, 0.0, z, dz)
    assert out.shape == z.shape and torch.equal(out[:, 2], torch.zeros(2))
    assert (out[0, :2] - out[1, :2]).abs().min() > 1e-4
    sol = HyperEuler(g).solve(SYSTEM, z, T)
    assert torch.equal(sol[..., 2:], z[None, :, 2:].expand(len(T), 2, 1))  # held exactly, every step
    # a plain MLPHyperNet on [x, u] reads u too; only control_dim guarantees the hold
    with pytest.raises(ValueError, match="control_dim must be an int in"):
        MLPHyperNet(3, control_dim=3)
    assert "control_dim=1" in HyperEuler(g).describe()


@pytest.mark.parametrize("hyper, base", [(HyperEuler, Euler), (HyperMidpoint, Midpoint)])
def test_a_zero_g_reproduces_the_base_solver_with_controls(hyper, base):
    pi, _ = controller()
    x0 = torch.randn(6, 2)
    hs = hyper(MLPHyperNet(3, control_dim=1))
    with torch.no_grad():
        for control in (pi, torch.randn(10, 6, 1), torch.tensor([2.0])):  # feedback, sampled, held
            a = rollout(hs, SYSTEM, control, x0, T, substeps=2)
            b = rollout(base(), SYSTEM, control, x0, T, substeps=2)
            assert torch.equal(a.x, b.x) and torch.equal(a.u, b.u)
    fine = torch.linspace(0, 1, 21)  # a held control: the rollout is a plain solve on the fine mesh
    plain = base().solve(SYSTEM, SYSTEM.join(x0, 2.0), fine)[::2, :, :2]
    torch.testing.assert_close(rollout(hs, SYSTEM, torch.tensor([2.0]), x0, T, substeps=2).x, plain)
    z0 = SYSTEM.join(x0, 1.5)  # and through torchdyn's odeint, the control held over the solve
    _, via_torchdyn = odeint(SYSTEM, z0, T, solver=hs)
    assert torch.equal(via_torchdyn, base().solve(SYSTEM, z0, T))


def test_rollout_holds_each_control_over_its_interval():
    pi, net = controller()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    net.double()
    ro = rollout("dopri5", SYSTEM, pi, x0, T, atol=1e-9, rtol=1e-9)
    assert ro.x.shape == (11, 4, 2) and ro.u.shape == (10, 4, 1) and ro.pairs().shape == (40, 3)
    with torch.no_grad():
        for k in (0, 5, 9):  # each interval: the held control from the state at its start
            u = pi(T[k], ro.x[k])
            torch.testing.assert_close(ro.u[k], u)
            z = reference_solve(SYSTEM, SYSTEM.join(ro.x[k], u), T[k : k + 2].double(), "dopri5", 1e-9, 1e-9)
            torch.testing.assert_close(ro.x[k + 1], z[-1, :, :2])
    with torch.no_grad():  # torchdyn's tsit5 by name: the same closed loop
        torch.testing.assert_close(rollout("tsit5", SYSTEM, pi, x0, T, atol=1e-9, rtol=1e-9).x, ro.x)
    rk4 = rollout("rk4", SYSTEM, pi, x0, T)
    assert (rk4.x - ro.x).abs().max() < 1e-3 < (rollout("euler", SYSTEM, pi, x0, T).x - ro.x).abs().max()
    # gradients reach the controller through a hypersolver's rollout
    hs = HyperEuler(randomised(MLPHyperNet(3, hidden=(8,), control_dim=1))).double()
    rollout(hs, SYSTEM, pi, x0, T).x[-1].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="substeps"):
        rollout("euler", SYSTEM, pi, x0, T, substeps=0)
    with pytest.raises(ValueError, match="control_dim"):
        ControlledSystem(pendulum, control_dim=0)


def test_harvest_and_fit_across_a_distribution_of_controls(tmp_path):
    torch.manual_seed(0)
    dt = 0.1
    box = torch.tensor([4.0, 8.0, 10.0])

    def pairs(n):  # (state, control) samples, plus the pairs a feedback controller visits
        pi, _ = controller(seed=n)
        with torch.no_grad():
            visited = rollout("rk4", SYSTEM, pi, torch.randn(16, 2), torch.arange(11) * dt).pairs()
        return torch.cat([(torch.rand(n, 3) * 2 - 1) * box, visited])

    hs = HyperEuler(MLPHyperNet(3, hidden=(32, 32), control_dim=1))
    trajectories = harvest(SYSTEM, pairs(512), torch.tensor([0.0, dt]), steps=[1, 2], base=hs)
    assert trajectories.steps == [1, 2] and len(trajectories) == 512 + 160
    u = trajectories.states[..., 2:]  # the control is held (to the reference's rounding)
    torch.testing.assert_close(u, u[:1].expand_as(u), rtol=1e-6, atol=1e-5)
    report = fit(hs, trajectories, iterations=300, batch_size=256, progress=False, seed=0)
    assert report.relative_residual_error[1] < 0.3

    held_out = pairs(256)
    x0, u = held_out[:, :2].double(), held_out[:, 2:].double()
    one = torch.tensor([0.0, dt], dtype=torch.float64)
    with torch.no_grad():
        ref = rollout("dopri5", SYSTEM, u, x0, one, atol=1e-10, rtol=1e-10).x[-1]
        hyper = rollout(hs, SYSTEM, held_out[:, 2:], held_out[:, :2], one.float()).x[-1].double()
        euler = rollout("euler", SYSTEM, held_out[:, 2:], held_out[:, :2], one.float()).x[-1].double()
    assert (hyper - ref).norm(dim=1).mean() < 0.5 * (euler - ref).norm(dim=1).mean()
    # saved and loaded with its control channels
    save(hs, tmp_path / "hs.pt")
    back = load(tmp_path / "hs.pt")
    assert back.g.config["control_dim"] == 1
    z = SYSTEM.join(held_out[:8, :2], held_out[:8, 2:])
    with torch.no_grad():
        assert torch.equal(back.solve(SYSTEM, z, one.float()), hs.solve(SYSTEM, z, one.float()))


class M4bPendulum(nn.Module):
    """torchdyn's tutorial m4b: f stores its control and value on itself for g to read."""

    def __init__(self, u):
        super().__init__()
        self.u, self.cur_u, self.cur_f = u, None, None

    def forward(self, t, x):
        self.cur_u = self.u(t, x)
        self.cur_f = pendulum(t, x, self.cur_u)
        return self.cur_f


class M4bHyperNet(nn.Module):
    def __init__(self, sys):
        super().__init__()
        self.sys = sys
        self.net = randomised(nn.Linear(5, 2))
        self.seen = []

    def forward(self, t, x):
        sys = self.sys
        self.seen.append((x.clone(), sys.cur_f.clone(), sys.cur_u.clone()))
        return self.net(torch.cat([x, sys.cur_f, sys.cur_u], dim=-1))


def test_the_m4b_side_channel_g_still_works():
    pi, _ = controller()
    sys = M4bPendulum(pi)
    g = M4bHyperNet(sys)
    hs = HyperEuler(g)
    assert hs.convention == "tx"
    x0 = torch.randn(5, 2)
    with torch.no_grad():
        _, sol = odeint(sys, x0, T, solver=hs)
    assert len(g.seen) == 10
    z, dt = x0, T[1] - T[0]
    for k, (x_seen, f_seen, u_seen) in enumerate(g.seen):  # g saw f and u at the step's start
        torch.testing.assert_close(x_seen, z)
        torch.testing.assert_close(u_seen, pi(T[k], z))
        torch.testing.assert_close(f_seen, pendulum(T[k], z, u_seen))
        z = z + dt * f_seen + dt**2 * g.net(torch.cat([z, f_seen, u_seen], -1)).detach()
        torch.testing.assert_close(sol[k + 1], z)


def test_control_tutorial_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/control.py", "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f"results: {tmp_path.resolve()}" in proc.stdout and "| HyperEuler | " in proc.stdout
    assert pathlib.Path(summary["paths"]["figure"]).read_bytes()[:8] == PNG
    errors = summary["one_interval_error"]
    # HyperEuler beats Euler at equal NFE, on held-out pairs and on the pairs of a trained loop
    for e in (errors, summary["one_interval_error_visited"]):
        assert e["HyperEuler (1 step, 1 NFE)"] < e["Euler (1 step, 1 NFE)"]
        assert e["HyperEuler (2 steps, 2 NFE)"] < e["Euler (2 steps, 2 NFE)"]
        assert e["RK4 (1 step, 4 NFE)"] < e["Midpoint (1 step, 2 NFE)"] < e["Euler (2 steps, 2 NFE)"]
    steps = round(summary["horizon_s"] / summary["dt"])
    rows = summary["controllers"]
    for name, stages in {"euler": 1, "midpoint": 2, "rk4": 4, "HyperEuler": 1}.items():
        assert rows[name]["nfe_per_rollout"] == stages * steps, name
    assert rows["dopri5"]["nfe_per_rollout"] > rows["rk4"]["nfe_per_rollout"]
    assert summary["hypereuler_nfe_vs_rk4"] == 0.25
    for r in rows.values():
        assert 0 < r["median_iteration_ms"] * r["nfe_per_rollout"] and r["train_s"] > 0
        assert r["cost_vs_dopri5"] == pytest.approx(r["closed_loop_cost"] / rows["dopri5"]["closed_loop_cost"])
        assert 0 < r["closed_loop_cost"] < 10


def test_a_controlled_system_is_a_torchdyn_vector_field():
    from torchdyn.core import NeuralODE

    system = ControlledSystem(lambda t, x, u: -x + u, control_dim=1)  # torchdyn calls vf(t, x, args=...)
    z0 = system.join(torch.ones(4, 2), torch.tensor([0.5]))
    _, z = NeuralODE(system, solver="rk4")(z0, torch.linspace(0, 1, 11))
    assert torch.allclose(z[-1, :, :2], 0.5 + 0.5 * torch.exp(torch.tensor(-1.0)), atol=1e-4)
    assert torch.equal(z[-1, :, 2:], z0[:, 2:])  # the control is held
