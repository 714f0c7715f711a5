"""The fast fixed-step loop: every solve of this package runs here.

``fixed_solve`` runs any torchdyn-protocol fixed-step solver over a mesh with no
comparisons against the mesh and no host synchronisation inside the loop, keeps only
the states asked for, and can compile the step or capture the whole solve as a CUDA
graph. The compiled steps and graphs are cached per solver.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Union

import torch
from torch import Tensor, nn

from ._mesh import check_t_span, forward_time
from ._states import check_state
from .tableaus import VectorField

__all__ = ["fixed_solve"]



def fixed_solve(
    stepper: nn.Module,
    f: VectorField,
    z0: Tensor,
    t_span,
    return_trajectory: bool = True,
    compile: Union[bool, str] = False,
    cuda_graph: bool = False,
) -> Tensor:
    """Run ``stepper.step`` over ``t_span``, the fast path.

    No comparisons against the mesh and no host synchronisation inside the loop (the
    step sizes are computed once); only the states asked for are kept; under
    ``torch.no_grad()`` the loop runs in ``torch.inference_mode()``.

    Args:
        compile: ``True`` (inductor) or a ``torch.compile`` backend name: the step is
            compiled once per (solver, vector field, direction) and reused.
        cuda_graph: capture the whole solve as one CUDA graph and replay it (CUDA
            tensors, no gradient); one capture per (shape, dtype, mesh, vector field).
    """
    t_span = check_t_span(t_span)
    if isinstance(z0, dict):  # torchdyn's odeint takes them, with a solver whose step handles dicts
        raise TypeError(
            "the fast path integrates a single tensor state, got a dict; run dict states through "
            "torchdyn.numerics.odeint / NeuralODE with a solver whose step handles them"
        )
    if hasattr(stepper, "check_inputs"):
        stepper.check_inputs(z0, t_span)
    else:  # a torchdyn solver
        check_state(z0)
    t_span = t_span.to(z0.device)
    user_f, backwards = f, bool(t_span[1] < t_span[0])
    f, t_span = forward_time(f, t_span)
    ts, dts = t_span[:-1].unbind(0), (t_span[1:] - t_span[:-1]).unbind(0)
    step = _compiled_step(stepper, user_f, f, backwards, compile) if compile else _eager_step(stepper, f)
    if cuda_graph:
        return _graphed(stepper, user_f, step, z0, t_span, ts, dts, return_trajectory)
    mode = torch.inference_mode() if not torch.is_grad_enabled() else contextlib.nullcontext()
    with mode:
        return _loop(step, z0, ts, dts, return_trajectory)


def _eager_step(stepper: nn.Module, f: VectorField) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda z, t, dt: stepper.step(f, z, t, dt)[1]


def _loop(step, z0: Tensor, ts, dts, return_trajectory: bool) -> Tensor:
    z, traj = z0, [z0]
    for t, dt in zip(ts, dts):
        z = step(z, t, dt)
        if return_trajectory:
            traj.append(z)
    return torch.stack(traj) if return_trajectory else z


class _Cache(dict):
    """A solver's compiled steps and CUDA graphs. Kept on the solver instance (not in a global
    table), so that the solver and the vector fields it was compiled for are freed with it;
    copies and pickles of the solver start with an empty one."""

    def __deepcopy__(self, memo) -> _Cache:
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def _cache(stepper: nn.Module) -> dict:
    return stepper.__dict__.setdefault("_fast_path_cache", _Cache())


def _compiled_step(stepper, user_f, f, backwards: bool, compile: Union[bool, str]):
    backend = "inductor" if compile is True else compile
    key = ("compiled", id(user_f), backwards, backend)
    cache = _cache(stepper)
    if key not in cache or cache[key][0] is not user_f:
        cache[key] = (user_f, torch.compile(_eager_step(stepper, f), backend=backend, dynamic=False))
    return cache[key][1]


def _graphed(stepper, user_f, step, z0: Tensor, t_span: Tensor, ts, dts, return_trajectory: bool) -> Tensor:
    if z0.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got a state on {z0.device}")
    if torch.is_grad_enabled() and (z0.requires_grad or any(p.requires_grad for p in stepper.parameters())):
        raise ValueError("cuda_graph=True is for inference: call it under torch.no_grad() or torch.inference_mode()")
    key = ("graph", id(user_f), tuple(z0.shape), z0.dtype, z0.device, tuple(t_span.tolist()), return_trajectory)
    cache = _cache(stepper)
    if key not in cache or cache[key][0] is not user_f:
        static_z0 = z0.detach().clone()
        if hasattr(stepper, "record_initial_state"):  # a stage-aware g reads z0: the graph reads it here
            stepper.record_initial_state(static_z0)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
                for _ in range(2):
                    _loop(step, static_z0, ts, dts, return_trajectory)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = _loop(step, static_z0, ts, dts, return_trajectory)
        cache[key] = (user_f, graph, static_z0, static_out)
    _, graph, static_z0, static_out = cache[key]
    static_z0.copy_(z0)
    graph.replay()
    return static_out.clone()
