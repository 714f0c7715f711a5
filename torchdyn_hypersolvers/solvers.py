"""Fixed-step solvers and hypersolvers that follow torchdyn's solver protocol.

A torchdyn solver is an ``nn.Module`` with ``order``, ``stepping_class = 'fixed'``,
``sync_device_dtype(x, t_span)`` and ``step(f, x, t, dt, k1=None, args=None)``
returning ``(None, x_next, None)``. Every class here honours it, so it works in
``torchdyn.core.NeuralODE(f, solver=...)`` and ``torchdyn.numerics.odeint``
without any change to torchdyn. The stepping itself is :func:`rk_increment`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .hypernets import call_hypernet, check_convention, detect_convention
from .mesh import check_t_span, forward_time, map_steps, step_times
from .tableaus import EULER, HEUN, MIDPOINT, RALSTON, ButcherTableau, alpha_tableau, get_tableau, rk_increment
from .tableaus import RK4 as RK4_TABLEAU
from .validity import Validity, check_solve
from .validity import describe as describe_solver

__all__ = [
    "FixedStepSolver",
    "Euler",
    "Midpoint",
    "Heun",
    "Ralston",
    "RK4",
    "Alpha",
    "HyperSolver",
    "HyperEuler",
    "HyperMidpoint",
    "HyperHeun",
    "HyperRalston",
    "HyperRK4",
    "HyperAlpha",
    "resolve_base",
]

VectorField = Callable[[Tensor, Tensor], Tensor]
BaseLike = Union[str, ButcherTableau, "FixedStepSolver", nn.Module]

# torchdyn's own fixed-step classes, recognised by name so that no private import is needed.
_TORCHDYN_FIXED = {"Euler": EULER, "Midpoint": MIDPOINT, "RungeKutta4": RK4_TABLEAU}
_TORCHDYN_ADAPTIVE_NAMES = {"dopri5", "DormandPrince45", "DormandPrince5", "tsit5", "Tsitouras45", "Tsitouras5"}
_TORCHDYN_IMPLICIT_NAMES = {"ieuler", "implicit_euler", "ImplicitEuler", "alf", "AsynchronousLeapfrog"}


def resolve_base(base: BaseLike) -> ButcherTableau:
    """The Butcher tableau of an explicit fixed-step base solver given in any accepted form.

    Accepts a name (``'euler'``, ``'midpoint'``, ``'heun'``, ``'ralston'``, ``'rk4'``), a
    :class:`ButcherTableau`, one of this package's solvers, or torchdyn's ``Euler``,
    ``Midpoint`` and ``RungeKutta4``. Adaptive and implicit solvers are refused.
    """
    if isinstance(base, ButcherTableau):
        return base
    if isinstance(base, (FixedStepSolver, HyperSolver)):
        return base.tableau
    if isinstance(base, str):
        if base in _TORCHDYN_ADAPTIVE_NAMES:
            raise ValueError(
                f"base solver {base!r} is adaptive; a hypersolver needs an explicit fixed-step base "
                "('euler', 'midpoint', 'heun', 'ralston', 'rk4')"
            )
        if base in _TORCHDYN_IMPLICIT_NAMES:
            raise ValueError(
                f"base solver {base!r} is implicit or symplectic; a hypersolver needs an explicit "
                "fixed-step base ('euler', 'midpoint', 'heun', 'ralston', 'rk4')"
            )
        return get_tableau(base)
    if isinstance(base, nn.Module):
        name = type(base).__name__
        if getattr(base, "stepping_class", None) == "adaptive":
            raise ValueError(f"base solver {name} is adaptive; a hypersolver needs an explicit fixed-step base")
        if name in _TORCHDYN_FIXED and not hasattr(base, "hypernet"):
            return _TORCHDYN_FIXED[name]
        raise ValueError(
            f"base solver {name} is not an explicit Runge-Kutta method this package knows; pass a name, "
            "a ButcherTableau, or torchdyn's Euler / Midpoint / RungeKutta4"
        )
    raise TypeError(f"cannot use {base!r} as a base solver")


def _check_state(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fixed-step solvers here integrate a single tensor state, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"got a state of shape {tuple(x.shape)} with no batch dimension; states must be (B, ...). "
            "torchdyn hands the flattened adjoint state to the forward solver when "
            "sensitivity='adjoint' and no solver_adjoint is given: pass a classical one, "
            "e.g. NeuralODE(f, solver=hs, sensitivity='adjoint', solver_adjoint='dopri5')."
        )


class FixedStepSolver(nn.Module):
    """A classical explicit Runge-Kutta solver, defined by its tableau, as a torchdyn solver."""

    stepping_class = "fixed"

    def __init__(self, base: BaseLike):
        super().__init__()
        self.tableau = resolve_base(base)
        self.order = self.tableau.order

    def sync_device_dtype(self, x: Tensor, t_span: Tensor) -> Tuple[Tensor, Tensor]:
        """torchdyn hook: put ``t_span`` on ``x``'s device."""
        _check_state(x)
        return x, t_span.to(x.device)

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One step ``x + dt * psi(t, x)``; torchdyn's ``(None, x_next, None)`` return."""
        psi, _ = rk_increment(self.tableau, f, t, x, dt, k1)
        return None, x + dt * psi, None

    def solve(self, f: VectorField, z0: Tensor, t_span, return_trajectory: bool = True, **fast) -> Tensor:
        """Integrate over ``t_span``; the trajectory ``[T, ...]`` or only the final state.

        ``fast`` options (``compile``, ``cuda_graph``) as in :func:`fixed_solve`."""
        return fixed_solve(self, f, z0, t_span, return_trajectory, **fast)

    def extra_repr(self) -> str:
        return f"{self.tableau.name}, order={self.order}"


class Euler(FixedStepSolver):
    """Forward Euler, order 1, one f evaluation per step."""

    def __init__(self):
        super().__init__(EULER)


class Midpoint(FixedStepSolver):
    """Explicit midpoint, order 2, two f evaluations per step."""

    def __init__(self):
        super().__init__(MIDPOINT)


class Heun(FixedStepSolver):
    """Heun's method (explicit trapezoid), order 2, two f evaluations per step. Not in torchdyn."""

    def __init__(self):
        super().__init__(HEUN)


class Ralston(FixedStepSolver):
    """Ralston's method (alpha = 2/3, b = (1/4, 3/4)), order 2. Not in torchdyn."""

    def __init__(self):
        super().__init__(RALSTON)


class RK4(FixedStepSolver):
    """Classical Runge-Kutta, order 4, four f evaluations per step."""

    def __init__(self):
        super().__init__(RK4_TABLEAU)


class Alpha(FixedStepSolver):
    """The two-stage, second-order alpha family (1/2 midpoint, 1 Heun, 2/3 Ralston)."""

    def __init__(self, alpha: float):
        super().__init__(alpha_tableau(alpha))


class HyperSolver(nn.Module):
    """A base solver corrected by a network g that learns its local truncation residual.

    One step is ``z + dt * psi(t, z) + dt**(p+1) * g(dt, t, z, f(t, z))``. ``f(t, z)`` is
    the base solver's first stage, computed once and reused as g's input, so the
    correction costs one call of g and no extra evaluation of f.

    Args:
        base: the explicit fixed-step base solver (see :func:`resolve_base`).
        g: the hypernet, in any of the conventions of :mod:`.hypernets`.
        convention: ``'concat'``, ``'tx'`` or ``'explicit'``; read from g when omitted.
    """

    stepping_class = "fixed"
    validity: Optional[Validity] = None
    """Where g was fitted (set by ``fit`` and ``load``); solves outside it warn. None: unchecked."""

    def __init__(self, base: BaseLike, g: Callable, convention: Optional[str] = None):
        super().__init__()
        self.tableau = resolve_base(base)
        self.order = self.tableau.order
        self.hypernet = g  # torchdyn's attribute name: state_dict keys match its HyperEuler
        self.convention = check_convention(convention) if convention else detect_convention(g)

    @property
    def g(self) -> Callable:
        return self.hypernet

    @property
    def base_solver(self) -> FixedStepSolver:
        """The uncorrected base solver (one instance, so its compiled steps are cached)."""
        cache = _cache(self)
        if cache.get("base") is None or cache["base"].tableau != self.tableau:
            cache["base"] = FixedStepSolver(self.tableau)
        return cache["base"]

    def sync_device_dtype(self, x: Tensor, t_span: Tensor) -> Tuple[Tensor, Tensor]:
        """torchdyn hook (once per solve): check the validity record, put ``t_span`` on ``x``'s device."""
        _check_state(x)
        check_solve(self, x, t_span)
        return x, t_span.to(x.device)

    def describe(self) -> str:
        """What this hypersolver is, what it was fitted on, and where it is valid."""
        return describe_solver(self)

    def correction(self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor) -> Tensor:
        """g's predicted residual at one step, checked to have z's shape."""
        out = call_hypernet(self.hypernet, self.convention, dt, t, z, dz)
        if out.shape != z.shape:
            raise ValueError(
                f"hypernet {type(self.hypernet).__name__} returned shape {tuple(out.shape)} "
                f"for a state of shape {tuple(z.shape)}; they must match"
            )
        return out

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One corrected step; torchdyn's ``(None, x_next, None)`` return."""
        _check_state(x)
        psi, k1 = rk_increment(self.tableau, f, t, x, dt, k1)
        return None, x + dt * psi + dt ** (self.order + 1) * self.correction(dt, t, x, k1), None

    def solve(
        self, f: VectorField, z0: Tensor, t_span, correct: bool = True, return_trajectory: bool = True, **fast
    ) -> Tensor:
        """Integrate over ``t_span`` with the correction on (or off: the base solver).

        The fast path: same numbers as torchdyn's ``odeint`` with this solver, without its
        per-step overhead. ``fast`` options (``compile``, ``cuda_graph``) as in :func:`fixed_solve`."""
        return fixed_solve(self if correct else self.base_solver, f, z0, t_span, return_trajectory, **fast)

    # -- the paper's template methods (supplement B.1), vectorised over all steps --

    def base_residuals(self, f: VectorField, traj: Tensor, t_span) -> Tensor:
        """The base solver's residuals ``(z[k+1] - z[k] - dt psi(t_k, z[k])) / dt**(p+1)``
        on a trajectory ``[T, B, ...]``, for all steps in one batched call: ``[T-1, B, ...]``."""
        return self.residual_targets(f, traj, t_span)[0]

    def residual_targets(self, f: VectorField, traj: Tensor, t_span) -> Tuple[Tensor, Tensor]:
        """``(base residuals, f(t_k, z[k]))`` on a trajectory: what g is fitted to, and its input."""
        t, dt, z, z_next, f = _steps_of(f, traj, t_span)
        psi, k1 = map_steps(lambda t_, dt_, z_: rk_increment(self.tableau, f, t_, z_, dt_), t, dt, z)
        dt_b = _broadcast(dt, z)
        return (z_next - z - dt_b * psi) / dt_b ** (self.order + 1), k1

    def hypersolver_residuals(self, f: VectorField, traj: Tensor, t_span, dz: Optional[Tensor] = None) -> Tensor:
        """g's predicted residuals at every step of a trajectory, in one batched call of g.

        ``dz`` (``f`` at the trajectory's points) is recomputed when not given."""
        t, dt, z, _, f = _steps_of(f, traj, t_span)
        if dz is None:
            dz = map_steps(f, t, z)
        return map_steps(self.correction, dt, t, z, dz)

    def extra_repr(self) -> str:
        return f"base={self.tableau.name}, order={self.order}, convention={self.convention!r}"


def _steps_of(f: VectorField, traj: Tensor, t_span):
    """Per-step ``(t, dt, z, z_next, f)`` of a trajectory, in torchdyn's forward-time frame."""
    t_span = check_t_span(t_span).to(traj.device)
    if traj.shape[0] != t_span.shape[0]:
        raise ValueError(
            f"trajectory has {traj.shape[0]} time points (shape {tuple(traj.shape)}) but t_span has {t_span.shape[0]}"
        )
    t, dt = step_times(t_span.to(traj.dtype))
    f, _ = forward_time(f, t_span)
    return t, dt, traj[:-1], traj[1:], f


def _broadcast(per_step: Tensor, like: Tensor) -> Tensor:
    """A per-step ``[T]`` tensor shaped to broadcast against ``[T, B, ...]``."""
    return per_step.reshape(-1, *([1] * (like.dim() - 1)))


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
    _check_state(z0)
    t_span = check_t_span(t_span)
    check_solve(stepper, z0, t_span)
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


_CACHES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _cache(stepper: nn.Module) -> dict:
    return _CACHES.setdefault(stepper, {})


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


class HyperEuler(HyperSolver):
    """Euler corrected by g: one f and one g evaluation per step (p = 1)."""

    def __init__(self, g: Callable, convention: Optional[str] = None):
        super().__init__(EULER, g, convention)


class HyperMidpoint(HyperSolver):
    """Midpoint corrected by g (p = 2)."""

    def __init__(self, g: Callable, convention: Optional[str] = None):
        super().__init__(MIDPOINT, g, convention)


class HyperHeun(HyperSolver):
    """Heun corrected by g (p = 2); the paper's choice for CNF sampling."""

    def __init__(self, g: Callable, convention: Optional[str] = None):
        super().__init__(HEUN, g, convention)


class HyperRalston(HyperSolver):
    """Ralston corrected by g (p = 2)."""

    def __init__(self, g: Callable, convention: Optional[str] = None):
        super().__init__(RALSTON, g, convention)


class HyperRK4(HyperSolver):
    """RK4 corrected by g (p = 4)."""

    def __init__(self, g: Callable, convention: Optional[str] = None):
        super().__init__(RK4_TABLEAU, g, convention)


class HyperAlpha(HyperSolver):
    """A member of the two-stage alpha family corrected by g (p = 2)."""

    def __init__(self, g: Callable, alpha: float, convention: Optional[str] = None):
        super().__init__(alpha_tableau(alpha), g, convention)
