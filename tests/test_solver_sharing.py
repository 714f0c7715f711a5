"""One solver instance shared by several threads: every solve gives exactly the numbers (and, for
a guarded solver, the summary) of the same solve run alone; empty batches; multi-stage dtypes."""

import copy
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    Guarded,
    HyperEuler,
    HyperMidpoint,
    MLPHyperNet,
    MultiStageHyperNet,
    MultiStageHyperSolver,
)
from torchdyn_hypersolvers.solvers import SolveState

THREADS = 4
SOLVES = 48
A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def traced(t, z, args=None):
    """A pure vector field (all of it traceable by torch.compile)."""
    return torch.tanh(z @ A.T) + 0.3 * torch.sin(t)


def field(t, z, args=None):
    """The same field, letting other threads run at every call (the GIL is released)."""
    time.sleep(0)
    return traced(t, z)


def _g(seed: int = 0, stages: int = 1, scale: float = 0.1) -> MLPHyperNet:
    torch.manual_seed(seed)
    g = MLPHyperNet(2, hidden=(16,), stages=stages)
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, scale)
    return g


def _inputs():
    """Different initial states (batch sizes 1..5, far apart) and meshes for every solve."""
    gen = torch.Generator().manual_seed(1)
    cases = []
    for i in range(SOLVES):
        z0 = (1 + i % 4) * torch.randn(1 + i % 5, 2, generator=gen)
        cases.append((z0, torch.linspace(0, 1 + 0.1 * (i % 3), 6 + i % 4)))
    return cases


def _concurrently(solve, cases):
    """``solve(z0, t_span)`` of every case, from ``THREADS`` threads at once, started together."""
    start = threading.Barrier(THREADS)

    def worker(k):
        start.wait()
        return [(i, solve(*cases[i])) for i in range(k, len(cases), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        done = [item for chunk in pool.map(worker, range(THREADS)) for item in chunk]
    return [out for _, out in sorted(done, key=lambda item: item[0])]


def _same(alone, shared):
    differ = [i for i, (a, b) in enumerate(zip(alone, shared)) if not _equal(a, b)]
    assert not differ, f"{len(differ)} of {len(alone)} shared solves differ from the same solve run alone: {differ}"


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _summary(guard: Guarded):
    s = guard.summary()
    return (s.steps, s.batch, s.fallbacks, s.per_sample, s.nfe)


SOLVERS = {
    "HyperEuler": lambda: HyperEuler(_g(0)),
    "HyperMidpoint stage-aware": lambda: HyperMidpoint(_g(1, stages=2)),
}


@pytest.mark.parametrize("make", SOLVERS.values(), ids=SOLVERS.keys())
def test_a_hypersolver_shared_by_threads_solves_as_alone(make):
    hs, cases = make(), _inputs()
    solve = lambda z0, t: hs.solve(field, z0, t)  # noqa: E731
    alone = [solve(*case) for case in cases]
    _same(alone, _concurrently(solve, cases))


def _compile_available() -> bool:
    try:
        torch.compile(lambda x: x + 1, backend="aot_eager")(torch.ones(1))
        return True
    except Exception:  # noqa: BLE001 - any failure means no compiler here
        return False


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not available here")
def test_a_compiled_stage_aware_step_shared_by_threads_solves_as_alone():
    hs = HyperMidpoint(_g(1, stages=2))
    cases = [(z0[:1].expand(3, 2) + i, torch.linspace(0, 1, 6)) for i, (z0, _) in enumerate(_inputs()[:16])]
    solve = lambda z0, t: hs.solve(traced, z0, t, compile="aot_eager")  # noqa: E731
    alone = [solve(*case) for case in cases]  # one compiled step (the cache's), reused by every thread
    _same(alone, _concurrently(solve, cases))
    for case, compiled in zip(cases[:2], alone):
        torch.testing.assert_close(compiled, hs.solve(traced, *case))


@pytest.mark.parametrize("make", SOLVERS.values(), ids=SOLVERS.keys())
def test_a_guarded_solver_shared_by_threads_solves_and_counts_as_alone(make):
    guard, cases = Guarded(make(), ratio=1.0, atol=0.0, rtol=0.0, warn_fraction=None), _inputs()

    def solve(z0, t):
        return guard.solve(field, z0, t), _summary(guard)  # summary(): this thread's last solve

    alone = [solve(*case) for case in cases]
    assert 0 < sum(s[1][2] for s in alone) < sum(s[1][0] * s[1][1] for s in alone)  # some fall back, not all
    _same(alone, _concurrently(solve, cases))


@pytest.mark.parametrize("guarded", [False, True], ids=["hypersolver", "guarded"])
def test_a_solver_shared_by_threads_through_torchdyn_solves_as_alone(guarded):
    hs = HyperMidpoint(_g(2, stages=2))
    solver = Guarded(hs, ratio=1.0, atol=0.0, rtol=0.0, warn_fraction=None) if guarded else hs
    cases = _inputs()[: SOLVES // 2]

    def solve(z0, t):
        _, via_odeint = odeint(field, z0, t, solver=solver)
        model = NeuralODE(field, solver=solver, return_t_eval=False)
        out = (via_odeint, model(z0, t))
        return out + (_summary(solver),) if guarded else out

    alone = [solve(*case) for case in cases]
    _same(alone, _concurrently(solve, cases))


class _Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(A.clone())

    def forward(self, t, z, args=None):
        time.sleep(0)
        return torch.tanh(z @ self.a.T) + 0.3 * torch.sin(t)


@pytest.mark.filterwarnings("ignore:HyperMidpoint is solving the adjoint", "ignore:Setting tolerances")
def test_adjoint_and_forward_solves_in_threads_sharing_a_solver_are_as_alone():
    """torchdyn's adjoint solve (uncorrected) in one thread leaves the forward solves of others corrected."""
    hs = HyperMidpoint(_g(6, stages=2))
    cases = _inputs()[: SOLVES // 2]

    def solve(z0, t):
        f = _Field()
        if len(z0) % 2:  # a forward solve of the package's fast path
            return hs.solve(f, z0, t).detach()
        model = NeuralODE(f, solver=hs, sensitivity="adjoint", return_t_eval=False)
        out = model(z0, t)
        out[-1].square().sum().backward()  # the adjoint solve, in this thread (CPU tensors)
        return out.detach(), f.a.grad

    alone = [solve(*case) for case in cases]
    _same(alone, _concurrently(solve, cases))


def test_the_solve_state_is_per_thread_and_copies_fresh():
    hs = HyperMidpoint(_g(3, stages=2))
    z0 = torch.randn(3, 2)
    hs.solve(field, z0, torch.linspace(0, 1, 3))
    seen = []
    thread = threading.Thread(target=lambda: seen.append((hs.solve_state.z0, hs.correcting)))
    thread.start()
    thread.join()
    assert seen == [(None, True)] and hs.solve_state.z0 is z0  # another thread has its own (empty) state
    for other in (copy.deepcopy(hs), pickle.loads(pickle.dumps(hs))):
        assert isinstance(other.solve_state, SolveState) and other.solve_state.z0 is None


def test_a_guard_summary_is_the_calling_threads_and_copies_start_without_one():
    guard = Guarded(HyperEuler(_g(4)), warn_fraction=None)
    guard.solve(field, torch.randn(3, 2), torch.linspace(0, 1, 5))
    errors = []

    def other():
        try:
            guard.summary()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "no solve yet" in str(errors[0])
    assert guard.summary().steps == 4 and guard.summary().batch == 3
    for twin in (copy.deepcopy(guard), pickle.loads(pickle.dumps(guard))):
        with pytest.raises(RuntimeError, match="no solve yet"):
            twin.summary()
        twin.solve(field, torch.randn(2, 2), torch.linspace(0, 1, 3))
        assert twin.summary().batch == 2


# --- an empty batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["solve", "torchdyn"])
def test_guarded_accepts_an_empty_batch(fast):
    hs = HyperEuler(_g(5))
    guard = Guarded(hs)
    z0, t_span = torch.randn(0, 2), torch.linspace(0, 1, 5)
    if fast:
        out = guard.solve(field, z0, t_span)
    else:
        _, out = odeint(field, z0, t_span, solver=guard)
    assert out.shape == (5, 0, 2) and torch.equal(out, hs.solve(field, z0, t_span))
    summary = guard.summary()
    assert (summary.batch, summary.fallbacks, summary.per_sample.shape) == (0, 0, (0,))
    assert summary.fraction == 0.0 and "0 samples" in str(summary)
    assert guard.solve(field, z0, t_span, return_trajectory=False).shape == (0, 2)


# --- multi-stage nets of different dtypes -----------------------------------------------------


DTYPES = r"(?s)outer net.*(float64.*inner net.*float32|float32.*inner net.*float64).*cast one.*\.to\("


def test_a_multistage_net_refuses_outer_and_inner_nets_of_different_dtypes():
    outer, inner = MLPHyperNet(2).double(), MLPHyperNet(2)
    with pytest.raises(TypeError, match=DTYPES):
        MultiStageHyperNet(outer, inner)
    net = MultiStageHyperNet(MLPHyperNet(2), MLPHyperNet(2))
    net.outer.double()  # cast after construction: the solver refuses it
    with pytest.raises(TypeError, match=DTYPES):
        MultiStageHyperSolver("euler", net)
    hs = MultiStageHyperSolver("euler", MultiStageHyperNet(MLPHyperNet(2), MLPHyperNet(2)))
    hs.hypernet.inner.double()  # cast after construction, before a solve: refused by name too
    with pytest.raises(TypeError, match=DTYPES):
        hs.solve(field, torch.randn(3, 2), torch.linspace(0, 1, 3))
    same = MultiStageHyperSolver("euler", MultiStageHyperNet(MLPHyperNet(2), MLPHyperNet(2)).double())
    out = same.solve(lambda t, z: -z, torch.randn(3, 2, dtype=torch.float64), torch.linspace(0, 1, 3))
    assert out.dtype == torch.float64


class _NoParameters(nn.Module):
    hypernet_convention = "dt_t_z_dz"

    def forward(self, dt, t, z, dz):
        return torch.zeros_like(z)


def test_a_multistage_net_without_parameters_takes_any_dtype():
    MultiStageHyperNet(MLPHyperNet(2).double(), _NoParameters())
    MultiStageHyperNet(_NoParameters(), MLPHyperNet(2))
