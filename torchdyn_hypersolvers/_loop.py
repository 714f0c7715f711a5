"""The fast fixed-step loop: every solve of this package runs here.

``fixed_solve`` runs any torchdyn-protocol fixed-step solver over a mesh with no
comparisons against the mesh and no host synchronisation inside the loop, keeps only
the states asked for, and can compile the solve (or, on long meshes, its step) or capture
the whole solve as a CUDA graph. The compiled solves, steps and graphs are cached per solver.

A solver may be shared by threads that solve at once: the loop keeps its state in locals, a
solver's per-solve state is per thread, and the cache below is safe to share (see :class:`_Cache`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from typing import Callable, Union

import torch
from torch import Tensor, nn

from ._mesh import check_t_span, forward_time
from ._outside_fit import check_model_of
from ._states import check_state
from ._user_model import check_vector_field, uncounted_field
from .tableaus import VectorField

__all__ = ["fixed_solve", "UNROLLED_STEPS"]

UNROLLED_STEPS = 32
"""With ``compile``, a mesh of up to this many steps is compiled as one graph (the whole solve: one
compilation per step count); a longer one step by step (one compilation for every mesh)."""


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
        compile: ``True`` (inductor) or a ``torch.compile`` backend name. A mesh of up to
            :data:`UNROLLED_STEPS` steps is solved by one compiled graph, made once per (solver,
            vector field, direction, step count, return_trajectory); on a longer mesh the step is
            compiled, once per (solver, vector field, direction). Either serves every batch size and
            both ``torch.no_grad()`` and ``torch.inference_mode()``; with gradients on, it compiles anew.
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
        check_model_of(stepper, f)
    else:  # a torchdyn solver
        check_state(z0)
    t_span = t_span.to(z0.device)
    user_f, backwards = f, bool(t_span[1] < t_span[0])
    counted = ()
    if compile and not cuda_graph:  # torchdyn's call counters would make every compiled solve compile anew
        f, counted = uncounted_field(f)
    f, t_span = forward_time(f, t_span)
    steps = len(t_span) - 1
    per_step = bool(compile) and (cuda_graph or steps > UNROLLED_STEPS)
    step = _compiled_step(stepper, user_f, f, backwards, compile) if per_step else _eager_step(stepper, f)
    if cuda_graph:
        ts, dts = _step_times(t_span)
        return _graphed(stepper, user_f, step, z0, t_span, ts, dts, return_trajectory)
    if compile and not per_step:
        solve = _compiled_solve(stepper, user_f, step, (backwards, compile, steps, return_trajectory))
    else:
        solve = functools.partial(_loop, step, return_trajectory=return_trajectory)
    mode = torch.inference_mode() if not torch.is_grad_enabled() else contextlib.nullcontext()
    try:
        with mode:  # the inputs are made here: one kind of tensor whatever mode the caller is in
            ts, dts = _step_times(t_span)
            calls = _calls_per_step(stepper, user_f, backwards, counted, (z0, ts[0], dts[0])) if counted else 0
            out = solve(_compile_input(z0) if compile else z0, ts, dts)
        for wrapper in counted:  # what the wrappers would have counted
            wrapper.nfe += calls * steps
        return out
    except TypeError:
        check_vector_field(user_f)  # a named error when f cannot be called as f(t, z); no cost otherwise
        raise


def _eager_step(stepper: nn.Module, f: VectorField) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda z, t, dt: stepper.step(f, z, t, dt)[1]


def _calls_per_step(stepper, user_f, backwards: bool, counted, first: tuple) -> float:
    """How many times a step calls the field, as torchdyn's wrappers (``counted``, outermost first) count
    in one eager step from ``first = (z0, t0, dt0)`` (forward-time frame), once per (solver, field); the
    counters are then put back as they were."""
    key = ("calls per step", id(user_f))
    entry = _cache(stepper).get(key)
    if entry is None or entry[0] is not user_f:
        before = [wrapper.nfe for wrapper in counted]
        f = (lambda t, z: -user_f(-t, z)) if backwards else user_f  # as forward_time makes it
        with torch.no_grad():
            stepper.step(f, *first)
        entry = (user_f, counted[0].nfe - before[0])
        for wrapper, nfe in zip(counted, before):
            wrapper.nfe = nfe
        _cache(stepper)[key] = entry
    return entry[1]


def _step_times(t_span: Tensor):
    return t_span[:-1].unbind(0), (t_span[1:] - t_span[:-1]).unbind(0)


def _compile_input(z0: Tensor) -> Tensor:
    """The initial state handed to a compiled solve or step: without gradients an inference tensor, like
    the states the loop makes (under ``torch.no_grad()`` the caller's z0 is an ordinary tensor, under
    ``torch.inference_mode()`` an inference tensor; torch.compile tells the two apart and would compile
    once for each), with its batch dimension marked dynamic (one compilation for every batch size). A new
    tensor object, so that the mark is not left on the caller's."""
    z = (z0 if z0.is_inference() else z0.clone()) if not torch.is_grad_enabled() else z0.view_as(z0)
    if z.dim() > 0:
        torch._dynamo.maybe_mark_dynamic(z, 0)
    return z


def _loop(step, z0: Tensor, ts, dts, return_trajectory: bool = True) -> Tensor:
    z, traj = z0, [z0]
    for t, dt in zip(ts, dts):
        z = step(z, t, dt)
        if return_trajectory:
            traj.append(z)
    return torch.stack(traj) if return_trajectory else z


class _Cache(dict):
    """A solver's compiled steps and CUDA graphs. Kept on the solver instance (not in a global
    table), so that the solver and the vector fields it was compiled for are freed with it;
    copies and pickles of the solver start with an empty one.

    Shared by the threads that share the solver. A compiled step is read-only once made (two
    threads compiling the same one at once both get a working step; one is kept). A CUDA graph's
    static input and output serve one solve at a time: ``lock`` is held while a graph is captured
    or replayed, and a replay waits (on the device, not the host) until the previous one's output
    was copied out, whichever stream it ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo) -> _Cache:
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


def _cache(stepper: nn.Module) -> _Cache:
    cache = stepper.__dict__.get("_fast_path_cache")
    return cache if cache is not None else stepper.__dict__.setdefault("_fast_path_cache", _Cache())


def _compiled_step(stepper, user_f, f, backwards: bool, compile: Union[bool, str]):
    backend = "inductor" if compile is True else compile
    key = ("compiled", id(user_f), backwards, backend)
    entry = _cache(stepper).get(key)
    if entry is None or entry[0] is not user_f:
        entry = (user_f, torch.compile(_own_code(_eager_step(stepper, f)), backend=backend))
        _cache(stepper)[key] = entry
    return entry[1]


def _compiled_solve(stepper, user_f, step, setting: tuple):
    """The whole loop over a mesh of ``steps`` steps compiled as one graph, for ``setting = (backwards,
    compile, steps, return_trajectory)``: one call per solve instead of one per step."""
    backwards, compile, steps, return_trajectory = setting
    backend = "inductor" if compile is True else compile
    key = ("compiled solve", id(user_f), backwards, backend, steps, return_trajectory)
    entry = _cache(stepper).get(key)
    if entry is None or entry[0] is not user_f:
        solve = functools.partial(_loop, step, return_trajectory=return_trajectory)
        entry = (user_f, torch.compile(_own_code(lambda z, ts, dts: solve(z, ts, dts)), backend=backend))
        _cache(stepper)[key] = entry
    return entry[1]


def _own_code(step: Callable) -> Callable:
    """``step`` with a code object of its own. torch.compile keeps its compilations, and counts them
    against its recompile limit (then runs eagerly), per code object; every step made by
    :func:`_eager_step` shares one, so without this the steps of a few solvers or fields would fill
    the limit together."""
    code = step.__code__.replace()
    return types.FunctionType(code, step.__globals__, step.__name__, step.__defaults__, step.__closure__)


def _graphed(stepper, user_f, step, z0: Tensor, t_span: Tensor, ts, dts, return_trajectory: bool) -> Tensor:
    if z0.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got a state on {z0.device}")
    if torch.is_grad_enabled() and (z0.requires_grad or any(p.requires_grad for p in stepper.parameters())):
        raise ValueError("cuda_graph=True is for inference: call it under torch.no_grad() or torch.inference_mode()")
    key = ("graph", id(user_f), tuple(z0.shape), z0.dtype, z0.device, tuple(t_span.tolist()), return_trajectory)
    cache = _cache(stepper)
    with cache.lock:  # the graph's static buffers serve one solve at a time
        entry = cache.get(key)
        if entry is None or entry[0] is not user_f:
            entry = cache[key] = _capture(stepper, user_f, step, z0, ts, dts, return_trajectory)
        _, graph, static_z0, static_out, done = entry
        stream = torch.cuda.current_stream()
        stream.wait_event(done)  # the previous replay's output was copied out (a no-op before the first)
        static_z0.copy_(z0)
        graph.replay()
        out = static_out.clone()
        done.record(stream)
    return out


def _capture(stepper, user_f, step, z0: Tensor, ts, dts, return_trajectory: bool):
    """Capture the solve as a CUDA graph: ``(user_f, graph, static z0, static output, event)``."""
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
    return user_f, graph, static_z0, static_out, torch.cuda.Event()
