"""Flow-matching samplers: torchdiffeq's odeint call, flow_matching's model(x, t, **extras),
class-conditional fields, torchcfm's own classes, and the sample distances."""

import subprocess
import sys

import pytest
import torch
import torchdiffeq
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import ConvHyperNet, HyperEuler, HyperMidpoint, MLPHyperNet, fit, harvest, pareto
from torchdyn_hypersolvers.flow_matching import Conditional, VelocityModel, odeint
from torchdyn_hypersolvers.metrics import mmd, wasserstein2

SPAN = torch.tensor([0.0, 1.0])


class Field(nn.Module):
    """A smooth, time-dependent 2-D field."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, x, args=None):
        return self.net(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


def fitted_hyper_euler(f, x, iterations=150):
    hs = HyperEuler(MLPHyperNet(x.shape[1], hidden=(32, 32), time=True))
    fit(hs, harvest(f, x, SPAN, steps=[4]), iterations=iterations, progress=False, seed=0)
    return hs


# --- odeint: torchdiffeq's call -------------------------------------------------------------------


def test_odeint_returns_torchdiffeqs_shape_and_the_package_solve():
    f, y0, t = Field(), torch.randn(32, 2), torch.linspace(0, 1, 5)
    hs = HyperEuler(MLPHyperNet(2, time=True))
    nn.init.normal_(hs.g.net[-1].weight, std=0.1)  # a g that corrects
    with torch.no_grad():
        out = odeint(f, y0, t, hs)
        assert out.shape == (5, 32, 2)
        torch.testing.assert_close(out, hs.solve(f, y0, t), rtol=0, atol=0)
        assert not torch.allclose(out, odeint(f, y0, t, "euler"))
        torch.testing.assert_close(odeint(f, y0, t, method=hs), out, rtol=0, atol=0)  # torchdiffeq's keyword


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_odeint_steps_as_torchdiffeq_does(method):
    f, y0 = Field(), torch.randn(16, 2)
    with torch.no_grad():
        back = torch.tensor([1.0, 0.0])
        for t, options in ((torch.linspace(0, 1, 5), None), (SPAN, {"step_size": 0.25}), (back, {"step_size": 0.3})):
            mine = odeint(f, y0, t, method=method, options=options)
            theirs = torchdiffeq.odeint(f, y0, t, method=method, options=options or {})
            if options and t[0] > t[-1]:  # torchdiffeq clips its last step; this package splits evenly
                assert mine.shape == theirs.shape
                torch.testing.assert_close(mine, theirs, rtol=1e-2, atol=1e-2)
            else:
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_odeint_runs_adaptive_solvers_by_name_at_the_given_tolerances():
    f, y0, t = Field(), torch.randn(8, 2, dtype=torch.float64), torch.linspace(0, 1, 3, dtype=torch.float64)
    f.double()
    with torch.no_grad():
        mine = odeint(f, y0, t, method="dopri5", rtol=1e-5, atol=1e-5)
        theirs = torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_odeint_steps_on_a_tuned_time_grid():
    f, y0 = Field(), torch.randn(8, 2)
    hs = HyperEuler(MLPHyperNet(2, time=True))
    grid = [0.0, 0.1, 0.45, 1.0]
    hs.time_grid = grid
    with torch.no_grad():
        torch.testing.assert_close(odeint(f, y0, SPAN, hs)[-1], hs.solve(f, y0, torch.tensor(grid))[-1])
        on = odeint(f, y0, torch.tensor([0.0, 0.45, 1.0]), hs)
        torch.testing.assert_close(on, hs.solve(f, y0, torch.tensor(grid))[[0, 2, 3]])
        uniform = odeint(f, y0, SPAN, hs, options={"step_size": 0.5})  # the user's steps win
        torch.testing.assert_close(uniform, hs.solve(f, y0, torch.linspace(0, 1, 3))[[0, 2]])
    with pytest.raises(ValueError, match=r"tuned for the time grid.*t=\[0.0, 0.3, 1.0\]"):
        odeint(f, y0, torch.tensor([0.0, 0.3, 1.0]), hs)
    with pytest.raises(ValueError, match="start and end on its ends"):
        odeint(f, y0, torch.tensor([0.0, 2.0]), hs)


def test_odeint_keeps_gradients():
    f, y0 = Field(), torch.randn(8, 2, requires_grad=True)
    odeint(f, y0, SPAN, "rk4", options={"step_size": 0.25})[-1].sum().backward()
    assert y0.grad is not None and f.net[0].weight.grad is not None


def test_odeint_names_bad_arguments():
    f, y0 = Field(), torch.randn(4, 2)
    with pytest.raises(TypeError, match="no rtol / atol"):
        odeint(f, y0, SPAN, "euler", rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="both solver='euler' and method='rk4'"):
        odeint(f, y0, SPAN, "euler", method="rk4")
    with pytest.raises(TypeError, match="needs a solver"):
        odeint(f, y0, SPAN)
    with pytest.raises(TypeError, match=r"unsupported options \['grid_constructor'\]"):
        odeint(f, y0, SPAN, "euler", options={"grid_constructor": None})
    with pytest.raises(ValueError, match="step_size.*positive"):
        odeint(f, y0, SPAN, "euler", options={"step_size": 0.0})
    with pytest.raises(TypeError, match="one tensor state y0, got tuple"):
        odeint(f, (y0, y0), SPAN, "euler")
    with pytest.raises(TypeError, match="adaptive: it takes rtol= and atol=, not \\['step_size'\\]"):
        odeint(f, y0, SPAN, "dopri5", options={"step_size": 0.1})
    with pytest.raises(ValueError, match="unknown solver 'eulr'"):
        odeint(f, y0, SPAN, "eulr")


# --- flow_matching's model(x, t, **extras) ----------------------------------------------------------


def test_velocity_model_samples_as_flow_matchings_ode_solver():
    solver_module = pytest.importorskip("flow_matching.solver")

    class Velocity(nn.Module):  # flow_matching's convention: model(x, t, **extras), t a 0-d tensor
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 2)

        def forward(self, x, t, shift=0.0):
            return self.net(torch.cat([x, t.reshape(1, 1).expand(x.shape[0], 1)], dim=1)) + shift

    model, x = Velocity(), torch.randn(16, 2)
    with torch.no_grad():
        theirs = solver_module.ODESolver(model).sample(x, step_size=0.25, method="midpoint", shift=0.5)
        mine = odeint(VelocityModel(model, shift=0.5), x, SPAN, "midpoint", options={"step_size": 0.25})[-1]
        unshifted = odeint(VelocityModel(model), x, SPAN, "midpoint", options={"step_size": 0.25})[-1]
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert (mine - unshifted).abs().min() > 0.1  # the extras reach the model
    with torch.no_grad():  # and torchdyn's NeuralODE takes it
        _, traj = NeuralODE(VelocityModel(model, shift=0.5), solver="midpoint")(x, torch.linspace(0, 1, 5))
    torch.testing.assert_close(traj[-1], theirs, rtol=1e-5, atol=1e-6)


# --- class-conditional fields ---------------------------------------------------------------------


class Rotations(nn.Module):
    """``dx/dt = A_y x``: a rotation at a different speed per label, records the labels it was given."""

    def __init__(self, classes=3):
        super().__init__()
        self.register_buffer("speed", torch.linspace(0.5, 3.0, classes))
        self.seen = []

    def forward(self, t, x, y):
        self.seen.append(y)
        w = self.speed[y][:, None]
        return w * torch.stack([-x[:, 1], x[:, 0]], dim=1)


def test_conditional_rides_the_label_in_the_state():
    velocity = Rotations()
    cond = Conditional(velocity, shape=(2,), num_classes=3)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0])
    z = cond.initial_state(x, y)
    assert z.shape == (6, 5) and torch.equal(cond.samples(z), x) and torch.equal(cond.labels(z), y)
    dz = cond(torch.tensor(0.0), z)
    assert torch.equal(dz[:, 2:], torch.zeros(6, 3)) and torch.equal(velocity.seen[-1], y)
    torch.testing.assert_close(dz[:, :2], velocity(0.0, x, y))
    with torch.no_grad():
        traj = odeint(cond, z, torch.linspace(0, 1, 3), "rk4")
    assert traj.shape == (3, 6, 5) and torch.equal(traj[..., 2:], z[..., 2:].expand(3, 6, 3))
    assert cond.samples(traj).shape == (3, 6, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0..3"):
        cond.initial_state(x, torch.tensor([0, 1, 2, 3, 0, 0]))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \(6,\)"):
        cond.initial_state(x, torch.zeros(6))
    with pytest.raises(TypeError, match="one of num_classes="):
        Conditional(velocity, shape=(2,))


def test_conditional_images_and_embeddings():
    seen = {}

    def velocity(t, x, c):
        seen["x"], seen["c"] = x.shape, c
        return -x * c.sum(1).reshape(-1, 1, 1, 1)

    cond = Conditional(velocity, shape=(1, 4, 4), condition_dim=2)
    x, c = torch.randn(3, 1, 4, 4), torch.rand(3, 2)
    z = cond.initial_state(x, c)
    assert z.shape == (3, 18) and torch.equal(cond.samples(z), x)
    cond(torch.tensor(0.0), z)
    assert seen["x"] == (3, 1, 4, 4) and torch.equal(seen["c"], c)
    with pytest.raises(ValueError, match=r"conditions of shape \(3, 5\), expected \(3, 2\)"):
        cond.initial_state(x, torch.rand(3, 5))
    with pytest.raises(ValueError, match=r"samples of shape \(1, 5, 5\)"):
        cond.initial_state(torch.randn(3, 1, 5, 5), c)


def test_one_hypersolver_fitted_across_labels_serves_every_label():
    torch.manual_seed(0)
    cond = Conditional(Rotations(), shape=(2,), num_classes=3)
    labels = torch.arange(600) % 3
    z0 = cond.initial_state(torch.randn(600, 2), labels)
    hs = HyperEuler(cond.make_hypernet(HyperEuler))
    assert hs.g.config["control_dim"] == 3
    fit(hs, harvest(cond, z0, SPAN, steps=[4]), iterations=400, progress=False, seed=0)
    test = cond.initial_state(torch.randn(300, 2), torch.arange(300) % 3)
    mesh = torch.linspace(0, 1, 5)
    with torch.no_grad():
        ref = odeint(cond, test, SPAN, "dopri5", rtol=1e-8, atol=1e-8)[-1]
        hyper, euler = odeint(cond, test, mesh, hs)[-1], odeint(cond, test, mesh, "euler")[-1]
        _, via_torchdyn = NeuralODE(cond, solver=hs)(test, mesh)
    assert torch.equal(hyper[:, 2:], test[:, 2:])  # g never changes the label
    torch.testing.assert_close(via_torchdyn[-1], hyper)
    for label in range(3):
        rows = cond.labels(test) == label
        err_h = (hyper[rows] - ref[rows]).norm(dim=1).mean()
        err_e = (euler[rows] - ref[rows]).norm(dim=1).mean()
        assert err_h < 0.5 * err_e, (label, float(err_h), float(err_e))


# --- torchcfm's own classes -----------------------------------------------------------------------


def test_torchcfm_mlp_harvest_fit_pareto_and_adjoint_neural_ode():
    pytest.importorskip("torchcfm")
    from torchcfm.models.models import MLP
    from torchcfm.utils import sample_8gaussians, torch_wrapper

    torch.manual_seed(0)
    f = torch_wrapper(MLP(dim=2, w=32, time_varying=True))
    x = sample_8gaussians(256)
    node = NeuralODE(f, solver="dopri5", sensitivity="adjoint", atol=1e-4, rtol=1e-4)
    before = {k: v.clone() for k, v in f.state_dict().items()}
    hs = fitted_hyper_euler(node, x)
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    result = pareto(f, x, SPAN, solvers={"hs": hs, "euler": "euler"}, steps=(4,), distance="mmd", repeats=1)
    assert result.row("hs").terminal_error < result.row("euler").terminal_error
    assert 0 < result.row("hs").distance < result.row("euler").distance
    mesh = torch.linspace(0, 1, 5)
    with torch.no_grad():
        plain = NeuralODE(f, solver=hs)(x, mesh)[1]
    y = x.clone().requires_grad_()
    with pytest.warns(UserWarning, match="adjoint"):  # the adjoint runs the base solver, and says so
        _, traj = NeuralODE(f, solver=hs, sensitivity="adjoint")(y, mesh)
        traj[-1].pow(2).sum().backward()
    torch.testing.assert_close(traj.detach(), plain)  # the forward solve is the corrected one
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_torchcfm_unet_is_a_vector_field():
    pytest.importorskip("torchcfm")
    from torchcfm.models.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="4")
    x, mesh = torch.randn(4, 1, 8, 8), torch.linspace(0, 1, 3)
    hs = HyperEuler(ConvHyperNet(1, hidden=8, time=True))
    fit(hs, harvest(unet, x, SPAN, steps=[2], atol=1e-5, rtol=1e-5), iterations=10, progress=False, seed=0)
    assert hs.g.net[-1].weight.abs().sum() > 0  # fitted
    with torch.no_grad():
        out = odeint(unet, x, mesh, hs)
        _, traj = NeuralODE(unet, solver=hs)(x, mesh)
    assert out.shape == (3, 4, 1, 8, 8)
    torch.testing.assert_close(traj, out)
    assert not torch.allclose(out, odeint(unet, x, mesh, "euler"))


def test_torchcfm_class_conditional_unet_through_conditional():
    pytest.importorskip("torchcfm")
    from torchcfm.models.unet import UNetModel

    unet = UNetModel(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions="4",
                     class_cond=True, num_classes=3)
    cond = Conditional(unet, shape=(1, 8, 8), num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    z = cond.initial_state(torch.randn(4, 1, 8, 8), y)
    hs = HyperMidpoint(cond.make_hypernet(HyperMidpoint, hidden=(16,)))
    with torch.no_grad():
        out = cond.samples(odeint(cond, z, SPAN, hs)[-1])
        direct = odeint(lambda t, x: unet(t, x, y), z[:, :64].reshape(4, 1, 8, 8), SPAN, "midpoint")[-1]
    torch.testing.assert_close(out, direct)  # an unfitted g: exactly the base solver on the labelled field


# --- sample distances -----------------------------------------------------------------------------


def test_wasserstein2_against_hand_computed_values():
    pytest.importorskip("ot")
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert wasserstein2(x, x[[2, 0, 1]]) == pytest.approx(0.0, abs=1e-12)  # order does not matter
    assert wasserstein2(x, x + torch.tensor([0.3, 0.4])) == pytest.approx(0.5)  # a translation moves by |c|
    # two points each: {0, 1} -> {0, 3} on a line: match 0-0 and 1-3, W2^2 = (0 + 4) / 2
    assert wasserstein2(torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [0.0]])) == pytest.approx(2**0.5)
    images = torch.randn(5, 1, 2, 2)
    assert wasserstein2(images, images + 1.0) == pytest.approx(2.0)  # flattened: |(1, 1, 1, 1)| = 2


def test_sample_distances_subsample_seeded_and_name_bad_inputs():
    pytest.importorskip("ot")
    a, b = torch.randn(300, 2), torch.randn(400, 2) + 1.0
    assert wasserstein2(a, b, max_samples=100) == wasserstein2(a, b, max_samples=100)
    assert wasserstein2(a, b, max_samples=100, seed=1) != wasserstein2(a, b, max_samples=100)
    assert 1.0 < wasserstein2(a, b) < 2.0
    assert mmd(a, a) == pytest.approx(0.0, abs=1e-7)
    assert 0 < mmd(a, a + 0.1) < mmd(a, a + 1.0) < mmd(a, a + 3.0)
    assert mmd(a, b, bandwidth=0.5) != mmd(a, b)
    for fn in (wasserstein2, mmd):
        with pytest.raises(ValueError, match=r"samples of shape \(2,\) cannot be compared.*\(3,\)"):
            fn(a, torch.randn(10, 3))
        with pytest.raises(ValueError, match="holds nan"):
            fn(a, torch.full((10, 2), float("nan")))
        with pytest.raises(ValueError, match="at least 2"):
            fn(a[:1], b)
        with pytest.raises(TypeError, match="floating-point"):
            fn(a, torch.ones(5, 2, dtype=torch.long))


def test_the_package_works_without_the_flow_extra():
    code = (
        "import sys\n"
        "for name in ('ot', 'torchcfm', 'flow_matching'): sys.modules[name] = None\n"
        "import torch\n"
        "import torchdyn_hypersolvers, torchdyn_hypersolvers.flow_matching as fm\n"
        "from torchdyn_hypersolvers.metrics import mmd, wasserstein2\n"
        "a = torch.randn(50, 2)\n"
        "assert mmd(a, a + 1) > 0\n"
        "print(fm.odeint(lambda t, x: -x, a, torch.tensor([0.0, 1.0]), 'rk4').shape)\n"
        "try:\n"
        "    wasserstein2(a, a)\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 50, 2])" in out.stdout
    assert 'pip install "torchdyn-hypersolvers[flow]"' in out.stdout
