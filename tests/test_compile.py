"""The compiled fast path: one compilation per solver, field, direction (and step count, for the short
meshes solved as one graph), whatever the batch size and whichever no-grad mode the caller is in;
compiled solves give the eager numbers."""

import pytest
import torch
from torch._dynamo.utils import counters

from torchdyn_hypersolvers import HyperEuler, HyperHeun, MLPHyperNet
from torchdyn_hypersolvers._loop import UNROLLED_STEPS
from torchdyn_hypersolvers.nonstationary import NonStationarySolver


def _available() -> bool:
    try:
        torch.compile(lambda x: x + 1, backend="eager")(torch.ones(1))
        return True
    except Exception:  # noqa: BLE001 (any failure means: no torch.compile here)
        return False


pytestmark = pytest.mark.skipif(not _available(), reason="torch.compile is not available here")


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, t, z):
        return self.net(torch.cat([z, t.expand(len(z), 1)], 1))


def _compilations() -> int:
    return counters["stats"]["unique_graphs"]


def _mixed_solves(hs, f, backend, batches=(8, 64, 512, 3), t_span=None):
    """Solves alternately under no_grad and inference_mode, over several batch sizes: (compiled, eager)."""
    t_span = torch.linspace(0, 1, 5) if t_span is None else t_span
    out = []
    for i, batch in enumerate(batches):
        z0 = torch.randn(batch, 2)
        with torch.no_grad() if i % 2 == 0 else torch.inference_mode():
            out.append((hs.solve(f, z0, t_span, compile=backend), hs.solve(f, z0, t_span)))
    return out


def test_one_compilation_for_both_no_grad_modes_and_every_batch_size():
    hs, f = HyperEuler(MLPHyperNet(2, (16,), time=True)), Field()
    before = _compilations()
    results = _mixed_solves(hs, f, "eager")
    assert _compilations() - before == 1
    for compiled, eager in results:
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    z0 = torch.randn(7, 2)
    with torch.inference_mode():  # backwards: one more compilation (another direction), then none
        back = [hs.solve(f, z0, torch.linspace(1, 0, 5), compile="eager") for _ in range(2)]
    assert _compilations() - before == 2
    torch.testing.assert_close(back[0], hs.solve(f, z0, torch.linspace(1, 0, 5)).detach())


def test_long_meshes_compile_the_step_once_for_all_of_them():
    hs, f = HyperEuler(MLPHyperNet(2, (16,), time=True)), Field()
    before = _compilations()
    for steps in (UNROLLED_STEPS + 1, UNROLLED_STEPS + 8):
        results = _mixed_solves(hs, f, "eager", batches=(8, 64), t_span=torch.linspace(0, 1, steps + 1))
        for compiled, eager in results:
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert _compilations() - before == 1


def test_short_meshes_compile_the_solve_once_per_step_count():
    hs, f = HyperEuler(MLPHyperNet(2, (16,), time=True)), Field()
    before = _compilations()
    for grid in (torch.linspace(0, 1, 3), torch.tensor([0.0, 0.2, 1.0]), torch.linspace(0, 1, 4)):
        for compiled, eager in _mixed_solves(hs, f, "eager", batches=(8, 64), t_span=grid):
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert _compilations() - before == 2  # 2 steps (two grids), 3 steps


def test_solvers_and_fields_do_not_share_the_recompile_limit():
    fields = [Field() for _ in range(3)]
    hs = HyperHeun(MLPHyperNet(2, (8,), time=True))
    before = _compilations()
    with torch._dynamo.config.patch(recompile_limit=2), torch.no_grad():
        for f in fields:  # each its own compilation, none run eagerly for want of room
            hs.solve(f, torch.randn(4, 2), torch.linspace(0, 1, 3), compile="eager")
    assert _compilations() - before == 3


def test_compiled_training_gives_the_eager_gradients():
    f = Field()
    hs = HyperEuler(MLPHyperNet(2, (16,), time=True))
    with torch.no_grad():
        for p in hs.parameters():
            p.normal_(0.0, 0.3)
    z0 = torch.randn(16, 2)
    grads = []
    for backend in ("aot_eager", None):
        hs.zero_grad()
        fast = {"compile": backend} if backend else {}
        hs.solve(f, z0, torch.linspace(0, 1, 5), return_trajectory=False, **fast).square().sum().backward()
        grads.append([p.grad.clone() for p in hs.parameters()])
    for compiled, eager in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_a_non_stationary_solver_compiles_once_for_every_grid_of_its_budget():
    f = Field()
    hs = NonStationarySolver("midpoint", 4, g=MLPHyperNet(2, (8,), time=True))
    with torch.no_grad():
        for p in hs.parameters():
            p.normal_(0.0, 0.3)
    before = _compilations()
    grids = [torch.linspace(0, 1, 5), torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0])]
    for grid in grids:
        for compiled, eager in _mixed_solves(hs, f, "eager", batches=(8, 64), t_span=grid):
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    assert _compilations() - before == 1


@pytest.mark.slow
def test_inductor_compiles_once_and_gives_the_eager_numbers():
    hs, f = HyperEuler(MLPHyperNet(2, (16,), time=True)), Field()
    before = _compilations()
    for compiled, eager in _mixed_solves(hs, f, True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert _compilations() - before == 1


@pytest.mark.parametrize("steps", [4, UNROLLED_STEPS + 3])  # the whole solve compiled, or its step
@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("timed", [True, False])  # a field f(t, z), or a net of z that torchdyn wraps twice
def test_a_neural_odes_field_compiles_once_and_counts_its_evaluations_as_eager(steps, backwards, timed):
    """torchdyn's NeuralODE wraps its field in counters (DEFunc, DEFuncBase: ``nfe``, a float that
    torch.compile would guard on, compiling again at every solve); compiled solves run the field unwrapped,
    compile once and add to every counter what an eager solve counts."""
    from torchdyn.core import NeuralODE

    class TimedField(Field):
        def forward(self, t, z, args=None):  # torchdyn passes args to a field that takes t
            return super().forward(t, z)

    torch.manual_seed(0)
    of_z = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    net = TimedField() if timed else of_z
    node = NeuralODE(net, solver="euler")
    hs, f = HyperHeun(MLPHyperNet(2, (16,), time=True)), node.vf
    t_span = torch.linspace(0, 1, steps + 1)
    t_span = t_span.flip(0) if backwards else t_span
    counters_of = [m for m in (f, f.vf) if hasattr(m, "nfe")]  # DEFunc, and the DEFuncBase around a net of z
    assert len(counters_of) == (1 if timed else 2)
    before = _compilations()
    for batch in (8, 64, 5, 8):
        z0 = torch.randn(batch, 2)
        with torch.no_grad():
            start = [c.nfe for c in counters_of]
            compiled = hs.solve(f, z0, t_span, compile="eager")
            counted = [c.nfe - s for c, s in zip(counters_of, start)]
            eager = hs.solve(f, z0, t_span)
            eager_counted = [c.nfe - s - n for c, s, n in zip(counters_of, start, counted)]
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
        assert counted == eager_counted == [2 * steps] * len(counters_of)  # Heun: two evaluations of f per step
    assert _compilations() - before == 1


def test_a_field_that_does_more_than_count_keeps_its_torchdyn_wrapper():
    from torchdyn.core.defunc import DEFunc

    from torchdyn_hypersolvers._user_model import uncounted_field

    class DepthVariable(torch.nn.Module):  # torchdyn's DEFunc sets .t on every module that has one
        def __init__(self):
            super().__init__()
            self.t, self.linear = 0.0, torch.nn.Linear(2, 2)

        def forward(self, t, z, args=None):
            return self.linear(z) * self.t

    wrapped = DEFunc(DepthVariable())
    assert uncounted_field(wrapped) == (wrapped, ())
    plain = Field()
    assert uncounted_field(plain) == (plain, ())
