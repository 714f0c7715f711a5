"""The fast fixed-step path gives torchdyn's numbers, with and without gradients."""

import pytest
import torch
from conftest import small_mlp
from torchdyn.numerics import odeint

from torchdyn_hypersolvers import (
    RK4,
    Alpha,
    Euler,
    Heun,
    HyperAlpha,
    HyperEuler,
    HyperHeun,
    HyperMidpoint,
    HyperRalston,
    HyperRK4,
    Midpoint,
    MLPHyperNet,
    Ralston,
)


def _hyper(cls):
    g = MLPHyperNet(2, hidden=(16,))
    with torch.no_grad():
        g.net[-1].weight.normal_(0, 0.2)
    return cls(g) if cls is not HyperAlpha else cls(g, alpha=0.75)


SOLVERS = [_hyper(c) for c in (HyperEuler, HyperMidpoint, HyperHeun, HyperRalston, HyperRK4, HyperAlpha)] + [
    Euler(),
    Midpoint(),
    Heun(),
    Ralston(),
    RK4(),
    Alpha(0.3),
]
IDS = [type(s).__name__ for s in SOLVERS]


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_fast_path_matches_torchdyn_odeint_without_gradients(solver, backward):
    f = small_mlp()
    vf = lambda t, z: f(z) * (1 + 0.5 * torch.sin(3 * t))  # noqa: E731 -- time-dependent
    x, t_span = torch.randn(16, 2), torch.linspace(0, 1, 9)
    if backward:
        t_span = t_span.flip(0)
    with torch.no_grad():
        _, ref = odeint(vf, x, t_span, solver=solver)
        fast = solver.solve(vf, x, t_span)
        final = solver.solve(vf, x, t_span, return_trajectory=False)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final, ref[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS[:6] + SOLVERS[10:11], ids=IDS[:6] + IDS[10:11])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_fast_path_matches_torchdyn_odeint_with_gradients(solver, backward):
    f = small_mlp()
    t_span = torch.linspace(0, 1, 6)
    if backward:
        t_span = t_span.flip(0)
    grads = []
    for path in ("torchdyn", "fast"):
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()
        vf = lambda t, z: f(z)  # noqa: E731
        traj = odeint(vf, x, t_span, solver=solver)[1] if path == "torchdyn" else solver.solve(vf, x, t_span)
        params = [*f.parameters(), *solver.parameters()]
        grads.append(torch.autograd.grad(traj.square().sum(), [x, *params]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _compile_available() -> bool:
    try:
        torch.compile(lambda x: x + 1, backend="aot_eager")(torch.ones(1))
        return True
    except Exception:  # noqa: BLE001 -- any failure means "not available here"
        return False


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not available here")
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_and_eager_paths_agree(backend):
    f = small_mlp()
    vf = lambda t, z: f(z)  # noqa: E731
    hs = _hyper(HyperHeun)
    x, t_span = torch.randn(16, 2), torch.linspace(1, 0, 7)
    with torch.no_grad():
        eager = hs.solve(vf, x, t_span)
        compiled = hs.solve(vf, x, t_span, compile=backend)
        again = hs.solve(vf, x * 2, t_span, compile=backend)  # reuses the compiled step
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, hs.solve(vf, x * 2, t_span), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_path_matches_eager():
    f = small_mlp().cuda()
    vf = lambda t, z: f(z)  # noqa: E731
    hs = _hyper(HyperEuler).cuda()
    x, t_span = torch.randn(64, 2, device="cuda"), torch.linspace(0, 1, 11, device="cuda")
    with torch.no_grad():
        eager = hs.solve(vf, x, t_span)
        graphed = hs.solve(vf, x, t_span, cuda_graph=True)
        replay = hs.solve(vf, x + 1, t_span, cuda_graph=True)
        torch.testing.assert_close(graphed, eager)
        torch.testing.assert_close(replay, hs.solve(vf, x + 1, t_span))


def test_cuda_graph_refuses_cpu_states():
    hs = _hyper(HyperEuler)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        hs.solve(lambda t, z: -z, torch.randn(4, 2), torch.linspace(0, 1, 3), cuda_graph=True)


def test_no_grad_solves_run_in_inference_mode():
    hs = _hyper(HyperEuler)
    with torch.no_grad():
        out = hs.solve(lambda t, z: -z, torch.randn(4, 2), torch.linspace(0, 1, 3))
    assert out.is_inference()
    out = hs.solve(lambda t, z: -z, torch.randn(4, 2), torch.linspace(0, 1, 3))
    assert not out.is_inference() and out.requires_grad  # g's parameters require grad
