"""torchdyn's own fixed-step tests, ported: this package's solvers against torchdyn 1.0.6's (issue 12).

The behaviour of torchdyn's ``test/models/test_ode.py``, ``test/test_sensitivity.py``,
``test/layers/test_galerkin.py`` and ``test/test_energy.py`` is re-checked here with every case
run twice, once with torchdyn's solver and once with this package's equivalent, and the two
results compared: bitwise (``torch.equal``) where the arithmetic is the same, to float tolerance
otherwise. The pairs are Euler, Midpoint, RK4 and the three hypersolvers with a zero g (which
then equal their base solver).

Differs on purpose: torchdyn 1.0.6's ``RungeKutta4`` evaluates its stages at ``t, t + dt/2,
t + dt/2, t + dt/2`` (its tableau's ``c`` is read one place off), so for time-dependent vector
fields it is compared here with torchdyn's own ``RungeKutta4`` given the correct nodes
``t + dt/2, t + dt/2, t + dt``; :func:`test_rk4_stage_times_differ_from_torchdyn_on_purpose`
pins the difference down.

Then one test per point 1..7 of the issue.
"""

import copy
import functools
import re
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import grad
from torch.testing import assert_close
from torchdyn.core import NeuralODE, ODEProblem
from torchdyn.datasets import ToyDataset
from torchdyn.models.energy import GNF, HNN, LNN
from torchdyn.nn import (
    Chebychev,
    DataControl,
    DepthCat,
    Fourier,
    GalLinear,
    GaussianRBF,
    MultiquadRBF,
    Polynomial,
    VanillaRBF,
)
from torchdyn.numerics import Lorenz, VanDerPol, odeint, odeint_mshooting
from torchdyn.numerics.solvers.hyper import HyperEuler as TdHyperEuler
from torchdyn.numerics.solvers.hyper import HyperMidpoint as TdHyperMidpoint
from torchdyn.numerics.solvers.hyper import HyperRungeKutta4 as TdHyperRungeKutta4
from torchdyn.numerics.solvers.ode import Euler as TdEuler
from torchdyn.numerics.solvers.ode import Midpoint as TdMidpoint
from torchdyn.numerics.solvers.ode import MSZero
from torchdyn.numerics.solvers.ode import RungeKutta4 as TdRungeKutta4

from torchdyn_hypersolvers import (
    RK4,
    Euler,
    FixedStepSolver,
    HyperEuler,
    HyperHeun,
    HyperMidpoint,
    HyperRK4,
    HyperSolver,
    Midpoint,
    MLPHyperNet,
)

# --------------------------------------------------------------------------------------------
# solver pairs
# --------------------------------------------------------------------------------------------


class ZeroG(nn.Module):
    """A hypernet in torchdyn's convention ``g(t, x)`` that is identically zero."""

    def forward(self, t, x):
        return torch.zeros_like(x)


def _correct_rk4_nodes(solver):
    """torchdyn's RungeKutta4 with its stage times fixed to ``t + dt/2, t + dt/2, t + dt``.

    Its ``step`` reads ``c[0], c[1], c[2]`` for stages 2..4; 1.0.6 stores ``c = (0, 1/2, 1/2, 1)``."""
    c, a, bsol, berr = solver.tableau
    solver.tableau = (torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=c.dtype), a, bsol, berr)
    return solver


PAIRS = {
    # name: (torchdyn's solver, ours, torchdyn's stage times are wrong for time-dependent fields)
    "euler": (lambda: TdEuler(), lambda: Euler(), False),
    "midpoint": (lambda: TdMidpoint(), lambda: Midpoint(), False),
    "rk4": (lambda: TdRungeKutta4(), lambda: RK4(), True),
    "hypereuler": (lambda: TdHyperEuler(ZeroG()), lambda: HyperEuler(ZeroG()), False),
    "hypermidpoint": (lambda: TdHyperMidpoint(ZeroG()), lambda: HyperMidpoint(ZeroG()), False),
    "hyperrk4": (lambda: TdHyperRungeKutta4(ZeroG()), lambda: HyperRK4(ZeroG()), True),
}
PAIR_NAMES = list(PAIRS)
BASE_OF = {HyperEuler: Euler, HyperMidpoint: Midpoint, HyperRK4: RK4}
TD_BASE_PAIR = {HyperEuler: "euler", HyperMidpoint: "midpoint", HyperRK4: "rk4"}
ORDER = {"euler": 1, "midpoint": 2, "rk4": 4, "hypereuler": 1, "hypermidpoint": 2, "hyperrk4": 4}


def solvers(pair, time_dependent=False):
    """``(torchdyn's solver, ours)`` for one pair, freshly built."""
    theirs, ours, wrong_nodes = PAIRS[pair]
    td = theirs()
    if time_dependent and wrong_nodes:
        td = _correct_rk4_nodes(td)
    return td, ours()


def same(ours, theirs, exact=True):
    """Ours equals torchdyn's: bitwise when ``exact`` (same arithmetic), else to float tolerance.

    Every pair does the same arithmetic on float32 states. torchdyn's RungeKutta4 keeps its
    tableau in float32 and casts it to the state's dtype, so on float64 / complex states its
    weights (1/6, 1/3) are rounded and only float tolerance applies."""
    if isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs):
            same(o, t, exact)
        return
    if isinstance(ours, dict):
        assert ours.keys() == theirs.keys()
        for k in ours:
            same(ours[k], theirs[k], exact)
        return
    if exact:
        assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    else:
        assert_close(ours, theirs)


def moons(n=32):
    X, y = ToyDataset().generate(n_samples=n, dataset_type="moons", noise=0.4)
    return torch.Tensor(X), torch.LongTensor(y.long())


def train(model, x, y, t_span, steps=2, lr=0.005):
    """What torchdyn's TestLearner does in a few steps: cross-entropy on the final state, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        _, y_hat = model(x, t_span)
        loss = nn.functional.cross_entropy(y_hat[-1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


# torchdyn's tests use Tanh; Softplus here keeps the file fast on CPUs where tanh/exp are slow
# (the comparison does not depend on the activation).
def mlp(dim=2, hidden=64):
    return nn.Sequential(nn.Linear(dim, hidden), nn.Softplus(), nn.Linear(hidden, dim))


def dc_mlp():
    return nn.Sequential(DataControl(), nn.Linear(4, 64), nn.Softplus(), nn.Linear(64, 2))


# --------------------------------------------------------------------------------------------
# test/models/test_ode.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_repr(pair):
    """NeuralODE's repr with our solver names it and counts the NFE of a solve, as with torchdyn's."""
    td, ours = solvers(pair)
    stages = ours.tableau.stages
    for solver in (td, ours):
        model = NeuralODE(mlp(), solver=solver)
        assert "NFE: 0" in repr(model)
        model(torch.randn(3, 2), torch.linspace(0, 1, 5))  # 4 steps
        text = repr(model)
        assert f"NFE: {4 * stages}" in text and f"solver: {solver!r}".splitlines()[0] in text
    assert ours.tableau.name in repr(NeuralODE(mlp(), solver=ours))


@pytest.mark.parametrize("sensitivity", ["autograd", "interpolated_adjoint"])
@pytest.mark.parametrize("field", ["mlp", "data_control"])
@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_default_run(pair, field, sensitivity):
    """A NeuralODE trains on moons: same losses and parameters as with torchdyn's solver.

    (torchdyn trains with interpolated_adjoint, whose backward solve reuses the forward solver on
    the flattened adjoint state, with x(t) read off a spline: a time-dependent field, so RK4 is
    compared with torchdyn's RK4 on corrected nodes.)"""
    x, y = moons()
    t_span = torch.linspace(0, 1, 10)
    f = mlp() if field == "mlp" else dc_mlp()
    td, ours = solvers(pair, time_dependent=sensitivity == "interpolated_adjoint")
    results = []
    for solver in (td, ours):
        model = NeuralODE(copy.deepcopy(f), solver=solver, sensitivity=sensitivity)
        results.append(train(model, x, y, t_span))
    same(results[1], results[0])


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_trajectory(pair):
    """NeuralODE.trajectory returns one state per point of t_span, equal to torchdyn's."""
    x, y = moons()
    t_span = torch.linspace(0, 1, 10)
    f = mlp()
    td, ours = solvers(pair)
    trajs = []
    for solver in (td, ours):
        model = NeuralODE(copy.deepcopy(f), solver=solver)
        train(model, x, y, t_span, steps=1)
        trajs.append(model.trajectory(x, t_span))
    assert len(trajs[1]) == 10
    same(trajs[1], trajs[0])


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_save_at(pair):
    """save_at: only the requested points are returned, equal to torchdyn's."""
    x, _ = moons()
    t_span = torch.linspace(0, 1, 10)
    save_at = t_span[torch.tensor([2, 5, 6, 9])]
    f = mlp()
    td, ours = solvers(pair)
    outs = []
    for solver in (td, ours):
        t_eval, y_save = NeuralODE(copy.deepcopy(f), solver=solver)(x, t_span, save_at)
        assert len(y_save) == len(save_at)
        outs.append(y_save)
    same(outs[1], outs[0])


def _dict_integrator(cls, *init_args):
    """torchdyn's test_dict_out_and_args: a subclass of the solver whose step calls f(t, x, args)."""

    class DictIntegrator(cls):
        def step(self, f, x, t, dt, k1=None, args=None):
            _, x_sol = f(t, x, args)
            return None, x_sol, None

    return DictIntegrator(*init_args)


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_dict_out_and_args(pair):
    """Dict states and f(t, x, args): wherever torchdyn's solver accepts them, ours does, same result."""
    small = mlp()

    def fun(t, x, args):
        out = small(torch.cat([x["i1"], x["i2"]], dim=-1))
        return t, {"i1": out[..., 0:1], "i2": out[..., 1:2]}

    td, ours = solvers(pair)
    td_dummy = _dict_integrator(type(td), *([td.hypernet] if hasattr(td, "hypernet") else []))
    ours_dummy = _dict_integrator(type(ours), *([ours.hypernet] if hasattr(ours, "hypernet") else []))
    x0 = {"i1": torch.rand(1, 1), "i2": torch.rand(1, 1)}
    t_span = torch.linspace(0, 1, 10)
    try:
        _, theirs = NeuralODE(fun, solver=td_dummy)(x0, t_span)
    except AttributeError as e:  # DiffEqSolver.sync_device_dtype reads x.device
        pytest.skip(f"torchdyn 1.0.6's {type(td).__name__} refuses dict states too ({e})")
    _, got = NeuralODE(fun, solver=ours_dummy)(x0, t_span)
    same(got, theirs)


class _TFunc(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.l = lin

    def forward(self, t, x, u, v, z, args={}):  # noqa: B006 (torchdyn's signature)
        return self.l(x + u + v + z)


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_arg_ode(pair):
    """A functools.partial vector field: odeint and NeuralODE(interpolated_adjoint) agree bitwise,
    the gradient w.r.t. x0 exists and equals torchdyn's."""
    lin = nn.Linear(1, 1)
    u = v = z = torch.randn(1, 1)
    x0_data = torch.randn(1, 1)
    t_span = torch.linspace(0, 5, 10)
    td, ours = solvers(pair, time_dependent=True)  # the interpolated adjoint is time-dependent
    results = []
    for solver in (td, ours):
        tfunc = _TFunc(copy.deepcopy(lin))
        f = functools.partial(tfunc.forward, u=u, v=v, z=z)
        x0 = x0_data.clone().requires_grad_(True)
        _, sol1 = odeint(f, x0, t_span, solver=solver)
        node = NeuralODE(f, solver, sensitivity="interpolated_adjoint", optimizable_params=tfunc.parameters())
        _, sol2 = node(x0, t_span=t_span)
        assert torch.equal(sol1, sol2)
        (g,) = grad(sol2.sum(), x0)
        results.append((sol2.detach(), g))
    same(results[1], results[0])


class _Rabi(nn.Module):
    def __init__(self, omega):
        super().__init__()
        self.sx = torch.tensor([[0, 1], [1, 0]], dtype=torch.complex128)
        self.omega = omega

    def forward(self, t, x):
        dx = -1.0j * self.omega * self.sx @ x
        return dx + dx.adjoint()


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_complex_ode(pair):
    """Complex states (Rabi oscillations): ours equals torchdyn's; order-4 pairs match the exact flow."""
    omega = torch.randn(1)
    rabi = _Rabi(omega)
    t_span = torch.linspace(0.0, 2.0, 41)
    x0 = torch.rand(2, 2, dtype=torch.complex128)
    x0 = 0.5 * (x0 + x0.adjoint()) / torch.real(x0.trace())
    td, ours = solvers(pair)
    _, theirs = odeint(rabi, x0, t_span, solver=td)
    t_eval, got = odeint(rabi, x0, t_span, solver=ours)
    same(got, theirs, exact=ORDER[pair] != 4)
    if ORDER[pair] == 4:
        sx = torch.tensor([[0, 1], [1, 0]], dtype=torch.complex128)
        si = torch.eye(2, dtype=torch.complex128)
        u_t = torch.cos(omega * t_eval)[:, None, None] * si - 1j * torch.sin(omega * t_eval)[:, None, None] * sx
        assert torch.allclose(got, u_t @ x0 @ u_t.adjoint(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_odeint_mshooting(pair):
    """Multiple shooting (MSZero) with our solver as its coarse and fine method equals torchdyn's."""
    x0 = torch.randn(8, 3) + 15
    t_span = torch.linspace(0, 1, 21)  # torchdyn's (0, 3, 10) mesh blows Lorenz up to NaN with Euler
    td, ours = solvers(pair)
    outs = []
    for solver in (td, ours):
        ms = MSZero()
        ms.coarse_method, ms.fine_method = solver, copy.deepcopy(solver)
        outs.append(odeint_mshooting(Lorenz(), x0, t_span, solver=ms, fine_steps=2, maxiter=4)[1])
    same(outs[1], outs[0])


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_odeint(pair):
    """odeint on the Lorenz system: the whole trajectory equals torchdyn's bitwise."""
    x0 = torch.randn(8, 3) + 15
    t_span = torch.linspace(0.0, 2.0, 101)  # torchdyn's 10 points blow Lorenz up to NaN
    td, ours = solvers(pair)
    t_td, theirs = odeint(Lorenz(), x0, t_span, solver=td)
    t_ours, got = odeint(Lorenz(), x0, t_span, solver=ours)
    same(t_ours, t_td)
    same(got, theirs)


# --------------------------------------------------------------------------------------------
# test/test_sensitivity.py
# --------------------------------------------------------------------------------------------

_TRUE_GRAD_TOL = {1: None, 2: 1e-2, 4: 2e-4}  # sum-abs error per sample vs a tight dopri5 adjoint


_TRUE_GRADS = {}


def _true_vdp_grad(torchdiffeq, stiffness, x_data, t_span):
    """The gradient of sum(x(T)) for VanDerPol by a tight dopri5 adjoint (computed once per case)."""
    key = (stiffness, x_data.numpy().tobytes(), t_span.numpy().tobytes())
    if key not in _TRUE_GRADS:
        x = x_data.clone().requires_grad_(True)
        sol = torchdiffeq.odeint_adjoint(VanDerPol(stiffness), x, t_span, method="dopri5", atol=1e-9, rtol=1e-9)
        _TRUE_GRADS[key] = grad(sol[-1].sum(), x)[0]
    return _TRUE_GRADS[key]


@pytest.mark.parametrize("stiffness", [0.1, 0.5])
@pytest.mark.parametrize("sensitivity", ["adjoint", "interpolated_adjoint"])
@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_odeint_adjoint(pair, sensitivity, stiffness):
    """Adjoint gradients through VanDerPol with the solver also solving the adjoint (no
    solver_adjoint): equal to torchdyn's, and for higher orders close to the true gradient."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f = VanDerPol(stiffness)
    x_data = torch.randn(32, 2)
    t_span = torch.linspace(0, 1, 30)
    td, ours = solvers(pair, time_dependent=sensitivity == "interpolated_adjoint")
    grads = []
    for solver in (td, ours):
        x = x_data.clone().requires_grad_(True)
        prob = ODEProblem(f, sensitivity=sensitivity, solver=solver)
        _, sol = prob.odeint(x, t_span)
        grads.append(grad(sol[-1].sum(), x)[0])
    same(grads[1], grads[0])
    tol = _TRUE_GRAD_TOL[ORDER[pair]]
    if tol is not None:
        grad_true = _true_vdp_grad(torchdiffeq, stiffness, x_data, t_span)
        assert ((grads[1] - grad_true).abs().sum(1) <= tol).all()


@pytest.mark.parametrize("sensitivity", ["adjoint", "interpolated_adjoint"])
@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_odeint_adjoint_intloss(pair, sensitivity):
    """Integral losses: autograd on the augmented state and the adjoint both equal torchdyn's,
    and agree with each other up to the solver's discretisation."""
    f = VanDerPol(0.5)

    def reg_term(t, x):
        return 0.1 * x[:, :1]

    x_data = torch.randn(32, 2)
    t_span = torch.linspace(0, 1, 25)
    td, ours = solvers(pair, time_dependent=sensitivity == "interpolated_adjoint")
    results = []
    for solver in (td, ours):
        x = x_data.clone().requires_grad_(True)
        node = NeuralODE(f, sensitivity="autograd", solver=solver, integral_loss=reg_term)
        _, sol = node(torch.cat([torch.zeros(x.shape[0], 1), x], 1), t_span)
        g_autograd = grad(sol[-1, :, 0].sum(), x)[0]
        x = x_data.clone().requires_grad_(True)
        node = NeuralODE(f, sensitivity=sensitivity, solver=copy.deepcopy(solver), integral_loss=reg_term)
        _, sol = node(x, t_span)
        g_adjoint = grad(0.0 * sol[-1].sum(), x)[0]
        results.append((g_autograd, g_adjoint))
    same(results[1], results[0])
    g_autograd, g_adjoint = results[1]
    tol = {1: 1e-2, 2: 2e-4, 4: 1e-5}[ORDER[pair]]
    assert (g_autograd - g_adjoint).abs().mean() <= tol


# --------------------------------------------------------------------------------------------
# test/layers/test_galerkin.py (time-dependent vector fields: RK4 uses the corrected nodes)
# --------------------------------------------------------------------------------------------

BASES = {
    "fourier": lambda: Fourier(3),
    "vanilla_rbf": lambda: VanillaRBF(3),
    "gaussian_rbf": lambda: GaussianRBF(3),
    "multiquad_rbf": lambda: MultiquadRBF(3),
    "polynomial": lambda: Polynomial(2),
    "chebychev": lambda: Chebychev(2),
}


@pytest.mark.parametrize("basis", list(BASES))
@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_default_run_gallinear(pair, basis):
    """A Galerkin (depth-variant) NeuralODE trains with our solver exactly as with torchdyn's."""
    x, y = moons(32)
    t_span = torch.linspace(0, 1, 10)
    f = nn.Sequential(nn.Linear(2, 8), nn.Softplus(), DepthCat(1), GalLinear(8, 2, expfunc=BASES[basis]()))
    td, ours = solvers(pair, time_dependent=True)
    results = []
    for solver in (td, ours):
        model = NeuralODE(copy.deepcopy(f), solver=solver)
        results.append(train(model, x, y, t_span, steps=1))
    same(results[1], results[0])


# --------------------------------------------------------------------------------------------
# test/test_energy.py
# --------------------------------------------------------------------------------------------

ENERGY = {"gnf": GNF, "hnn": HNN, "lnn": LNN}


@pytest.mark.parametrize("model_cls", list(ENERGY))
@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_energy_models(pair, model_cls):
    """Gradient / Hamiltonian / Lagrangian neural flows train with our solver exactly as with torchdyn's."""
    lnn = model_cls == "lnn"
    x, y = moons(8 if lnn else 16)
    t_span = torch.linspace(0, 1, 4 if lnn else 10)
    f = ENERGY[model_cls](nn.Sequential(nn.Linear(2, 64), nn.Softplus(), nn.Linear(64, 1)))
    td, ours = solvers(pair)
    results = []
    for solver in (td, ours):
        model = NeuralODE(copy.deepcopy(f), solver=solver)
        results.append(train(model, x, y, t_span, steps=1))
    same(results[1], results[0])


# --------------------------------------------------------------------------------------------
# differs on purpose: torchdyn 1.0.6's RK4 stage times
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", ["rk4", "hyperrk4"])
def test_rk4_stage_times_differ_from_torchdyn_on_purpose(pair):
    """On dx/dt = cos(t) torchdyn 1.0.6's RK4 is wrong (last stage at t + dt/2) and ours is the
    classical method: it equals torchdyn's RK4 with corrected nodes and is 4th-order accurate."""

    def f(t, x):
        return torch.cos(t) * torch.ones_like(x)

    x0 = torch.zeros(4, 1, dtype=torch.float64)
    t_span = torch.linspace(0, 2, 11, dtype=torch.float64)
    td_stock, ours = solvers(pair)
    td_fixed, _ = solvers(pair, time_dependent=True)
    _, got = odeint(f, x0, t_span, solver=ours)
    _, stock = odeint(f, x0, t_span, solver=td_stock)
    _, fixed = odeint(f, x0, t_span, solver=td_fixed)
    exact = torch.sin(t_span)[:, None, None].expand_as(got)
    assert_close(got, fixed)
    assert (got - exact).abs().max() < 1e-5
    assert (stock - exact).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# issue 12, points 1..7
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_point1_states_without_batch_dimension(pair):
    """odeint(f, torch.randn(3), t, solver=...) works as with torchdyn (hypersolvers: g(t, x))."""
    f = nn.Linear(3, 3)
    x0 = torch.randn(3)
    t_span = torch.linspace(0, 1, 6)
    td, ours = solvers(pair)
    _, theirs = odeint(lambda t, x: f(x), x0, t_span, solver=td)
    _, got = odeint(lambda t, x: f(x), x0, t_span, solver=ours)
    assert got.shape == (6, 3)
    same(got, theirs)


def test_point1_unbatched_state_refused_where_g_cannot_take_it():
    """A g that needs (B, D) states is refused with a message about g, not about the adjoint."""
    f = nn.Linear(3, 3)
    hs = HyperEuler(MLPHyperNet(3))
    with pytest.raises(ValueError) as info:
        odeint(lambda t, x: f(x), torch.randn(3), torch.linspace(0, 1, 6), solver=hs)
    message = str(info.value)
    assert re.search(r"(?i)hypernet|\bg\b", message), message
    assert "adjoint" not in message.lower(), message


def _adjoint_grads(solver, f, x0_data, t_span, solver_adjoint=None):
    """test_arg_ode run with sensitivity='adjoint': loss.backward(); (dL/dx0, dL/dparams)."""
    f = copy.deepcopy(f)
    node = NeuralODE(f, solver=solver, sensitivity="adjoint")
    if solver_adjoint is not None:
        node.solver_adjoint = solver_adjoint
    x0 = x0_data.clone().requires_grad_(True)
    _, sol = node(x0, t_span)
    loss = (sol[-1] ** 2).sum()
    loss.backward()
    return [x0.grad] + [p.grad.clone() for p in f.parameters()]


@pytest.mark.parametrize("pair", ["euler", "midpoint", "rk4"])
def test_point2_adjoint_without_solver_adjoint(pair):
    """sensitivity='adjoint' and no solver_adjoint: our classical solver also solves the
    (flattened) adjoint state, and the gradients equal those with torchdyn's solver."""
    f = nn.Sequential(nn.Linear(2, 16), nn.Softplus(), nn.Linear(16, 2))
    x0 = torch.randn(5, 2)
    t_span = torch.linspace(0, 1, 11)
    td, ours = solvers(pair)
    theirs = _adjoint_grads(td, f, x0, t_span)
    got = _adjoint_grads(ours, f, x0, t_span)
    for o, t in zip(got, theirs):
        assert_close(o, t)


class _TxG(nn.Module):
    """A non-zero hypernet in torchdyn's g(t, x) convention."""

    def __init__(self, dim=2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 8), nn.Softplus(), nn.Linear(8, dim))

    def forward(self, t, x):
        return self.net(x)


@pytest.mark.parametrize("cls", [HyperEuler, HyperMidpoint, HyperRK4])
def test_point2_hypersolver_adjoint_uses_base_without_correction(cls):
    """Decision: a hypersolver asked to solve the adjoint uses its base tableau and no correction,
    with a one-time UserWarning (per solver instance) that says so."""
    f = nn.Sequential(nn.Linear(2, 16), nn.Softplus(), nn.Linear(16, 2))
    x0 = torch.randn(5, 2)
    t_span = torch.linspace(0, 1, 11)
    base = BASE_OF[cls]

    # zero g: the gradients are those of the base solver run the same way
    hs = cls(ZeroG())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _adjoint_grads(hs, f, x0, t_span)
        _adjoint_grads(hs, f, x0, t_span)  # second solve with the same instance: no second warning
    ours_warnings = [w for w in caught if issubclass(w.category, UserWarning) and "adjoint" in str(w.message)]
    assert len(ours_warnings) == 1, [str(w.message) for w in caught]
    ref = _adjoint_grads(base(), f, x0, t_span)
    for o, r in zip(got, ref):
        same(o, r)

    # non-zero g: forward with the correction, adjoint with the uncorrected base solver
    g = _TxG()
    with pytest.warns(UserWarning, match="adjoint"):
        got = _adjoint_grads(cls(g), f, x0, t_span)
    td_base, _ = solvers(TD_BASE_PAIR[cls], time_dependent=True)  # torchdyn's base solves the reference adjoint
    ref = _adjoint_grads(cls(copy.deepcopy(g)), f, x0, t_span, solver_adjoint=td_base)
    for o, r in zip(got, ref):
        assert_close(o, r)


@pytest.mark.parametrize("pair", PAIR_NAMES)
def test_point3_dict_states(pair):
    """sync_device_dtype takes a dict state wherever torchdyn's does (its SolverTemplate: Euler,
    HyperEuler), returning the dict unchanged and t_span on the state's device."""
    td, ours = solvers(pair)
    x = {"q": torch.randn(4, 1), "p": torch.randn(4, 1)}
    t_span = torch.linspace(0, 1, 5)
    try:
        td_x, td_t = td.sync_device_dtype(x, t_span)
    except AttributeError:
        pytest.skip(f"torchdyn 1.0.6's {type(td).__name__} (a DiffEqSolver) refuses dict states")
    got_x, got_t = ours.sync_device_dtype(x, t_span)
    same(got_x, td_x)
    same(got_t, td_t)
    assert got_t.device == x["q"].device


@pytest.mark.parametrize(
    "cls, td_cls", [(HyperEuler, TdHyperEuler), (HyperMidpoint, TdHyperMidpoint), (HyperRK4, TdHyperRungeKutta4)]
)
def test_point4_torchdyn_constructor(cls, td_cls):
    """torchdyn's (hypernet, dtype=...) signature (keyword and positional) and its attributes
    dtype, hypernet, op1 (= order + 1, read by torchdyn scripts), order, stepping_class."""
    g = ZeroG()
    hs = cls(g, dtype=torch.float64)
    assert hs.dtype == torch.float64
    assert cls(g, torch.float64).dtype == torch.float64
    default, td = cls(g), td_cls(g)
    assert hasattr(default, "dtype")  # torchdyn's default is torch.float32; ours may say None ("the state's")
    assert default.hypernet is g
    assert default.order == td.order
    assert default.op1 == td.op1 == td.order + 1
    assert default.stepping_class == td.stepping_class == "fixed"


def test_point4_hyperrungekutta4_alias():
    from torchdyn_hypersolvers import HyperRungeKutta4

    assert HyperRungeKutta4 is HyperRK4


class _VarArgsG(nn.Module):
    """forward(self, t, x, *args): torchdyn calls it g(t, x)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, x, *args):
        return self.inner(t, x)


WRAPPERS = {
    "data_parallel": nn.DataParallel,
    "torch_compile": lambda g: torch.compile(g, backend="eager"),
    "varargs_forward": _VarArgsG,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_point5_wrapped_g(wrapper):
    """A wrapped g constructs and solves exactly like the unwrapped one (and like torchdyn's)."""
    g = _TxG(3)
    f = nn.Linear(3, 3)
    x0 = torch.randn(4, 3)
    t_span = torch.linspace(0, 1, 6)
    hs = HyperEuler(WRAPPERS[wrapper](g))
    _, got = odeint(lambda t, x: f(x), x0, t_span, solver=hs)
    _, ref = odeint(lambda t, x: f(x), x0, t_span, solver=HyperEuler(g))
    _, theirs = odeint(lambda t, x: f(x), x0, t_span, solver=TdHyperEuler(g))
    assert_close(got, ref)
    assert_close(got, theirs)


def test_point6_g_input_size_mismatch_is_named():
    """The paper's CNF HyperHeun g (13 inputs) on a 3-D state under the concat convention (which
    supplies 2*3+1 = 7) fails early with a ValueError naming 7, 13 and the convention."""
    g = nn.Sequential(nn.Linear(13, 32), nn.Softplus(), nn.Linear(32, 3))
    f = nn.Linear(3, 3)
    with pytest.raises(ValueError) as info:
        hs = HyperHeun(g)
        odeint(lambda t, x: f(x), torch.randn(4, 3), torch.linspace(0, 1, 3), solver=hs)
    message = str(info.value)
    assert re.search(r"\b7\b", message) and re.search(r"\b13\b", message), message
    assert "concat" in message, message


class _PaperHyperEuler(nn.Module):
    """Laid out like the paper's code: the vector field under f, the hypernet under g, with
    g reading cat([x, f(x), ds]) (our 'concat' convention)."""

    def __init__(self, dim=3):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, 16), nn.Softplus(), nn.Linear(16, dim))
        self.g = nn.Sequential(nn.Linear(2 * dim + 1, 32), nn.Softplus(), nn.Linear(32, dim))

    def step(self, x, ds):
        dx = self.f(x)
        return x + ds * dx + ds**2 * self.g(torch.cat([x, dx, ds * torch.ones_like(x[:, :1])], 1))


def test_point7_load_paper_state_dict():
    """A state dict with the paper's g.* / f.* keys loads into hs.hypernet via from_paper_state_dict."""
    from torchdyn_hypersolvers.io import from_paper_state_dict

    paper = _PaperHyperEuler()
    sd = paper.state_dict()
    assert any(k.startswith("g.") for k in sd) and any(k.startswith("f.") for k in sd)
    hs = HyperEuler(nn.Sequential(nn.Linear(7, 32), nn.Softplus(), nn.Linear(32, 3)))
    mapped = from_paper_state_dict(sd)
    assert set(mapped) == set(hs.hypernet.state_dict())  # 'g.' stripped, 'f.*' left out
    hs.hypernet.load_state_dict(mapped)
    for k, v in hs.hypernet.state_dict().items():
        assert torch.equal(v, sd["g." + k])
    # and the loaded hypersolver takes the paper's step
    x, ds = torch.randn(4, 3), torch.tensor(0.1)
    with torch.no_grad():
        _, got, _ = hs.step(lambda t, z: paper.f(z), x, torch.tensor(0.0), ds)
        assert_close(got, paper.step(x, ds))


def test_classes_are_the_package_solvers():
    """Sanity: the pairs use this package's solvers (not torchdyn's) on our side."""
    for pair in PAIR_NAMES:
        _, ours = solvers(pair)
        assert isinstance(ours, (FixedStepSolver, HyperSolver))
