"""Fixed-step solvers and hypersolvers that follow torchdyn's solver protocol.

A torchdyn solver is an ``nn.Module`` with ``order``, ``stepping_class = 'fixed'``,
``sync_device_dtype(x, t_span)`` and ``step(f, x, t, dt, k1=None, args=None)``
returning ``(None, x_next, None)``. Every class here honours it, so it works in
``torchdyn.core.NeuralODE(f, solver=...)`` and ``torchdyn.numerics.odeint``
without any change to torchdyn.

A class names its base solver as data, ``tableau = EULER``; the stepping itself is
:func:`~.tableaus.rk_stages` and the loop over a mesh is the package's one fast loop.
A new method is a tableau and a two-line class::

    class HyperRK38(HyperSolver):
        tableau = RK38

A hypersolver's one extension point is :meth:`HyperSolver.step_parts` (the increment, the stages
and g's correction of one step); ``step`` is defined once, on :class:`HyperSolver`.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _residuals, tableaus
from ._adjoint import solve_uncorrected, torchdyn_adjoint_solve, torchdyn_vector_field
from ._loop import fixed_solve
from ._mesh import check_t_span, check_time_grid
from ._outside_fit import check_model_of, check_solve
from ._precision import parameter_dtype
from ._residuals import ResidualMethods
from ._solver_names import resolve_base
from ._states import check_state, state_prototype
from .hypernets import call_hypernet, check_convention, check_hypernet_input, detect_convention, reads_stages
from .tableaus import ButcherTableau, VectorField, alpha_tableau, rk_increment, rk_stages
from .validity import Validity

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
    "HyperRungeKutta4",
    "HyperAlpha",
    "StepParts",
    "SolveState",
    "describe",
]

BaseLike = Union[str, ButcherTableau, nn.Module]


def _own_tableau(cls: type, base: Optional[BaseLike]) -> ButcherTableau:
    """The class's own tableau, or the one given (classes that name none need one)."""
    named = cls.tableau
    if named is None:
        if base is None:
            raise TypeError(f"{cls.__name__} needs a base solver: {cls.__name__}(base, ...)")
        return resolve_base(base)
    if base is not None and resolve_base(base) != named:
        raise TypeError(f"{cls.__name__} is {named.name}; it takes no other base solver (got {base!r})")
    return named


def _split_extras(cls: type, extras: Sequence[Any], dtype, convention):
    """Trailing positional arguments: a dtype (torchdyn's signature) or a convention name."""
    for extra in extras:
        if isinstance(extra, torch.dtype):
            dtype = extra
        elif isinstance(extra, str):
            convention = extra
        else:
            raise TypeError(f"{cls.__name__}: unexpected argument {extra!r}; expected a torch.dtype or a convention")
    return dtype, convention


def _fixed_arguments(cls: type, args: Sequence[Any], dtype) -> Tuple[ButcherTableau, Optional[torch.dtype]]:
    """``FixedStepSolver([base], [dtype])``'s positional arguments: ``(tableau, dtype)``."""
    base = None
    if args and not isinstance(args[0], torch.dtype):
        base, args = args[0], args[1:]
    if len(args) > 1:
        raise TypeError(f"{cls.__name__} takes at most a base and a dtype, got {len(args) + 1} arguments")
    dtype, _ = _split_extras(cls, args, dtype, None)
    return _own_tableau(cls, base), dtype


def _hyper_arguments(cls: type, args: Sequence[Any], dtype, convention):
    """``HyperSolver([base], hypernet, [dtype or convention])``'s positional arguments:
    ``(tableau, hypernet, dtype, convention)``; the base only for a class that names no tableau."""
    base = None
    if cls.tableau is None:
        if not args:
            raise TypeError(f"{cls.__name__}(base, hypernet) needs a base solver and a hypernet")
        base, args = args[0], args[1:]
    if not 1 <= len(args) <= 2:
        raise TypeError(
            f"{cls.__name__} takes a hypernet and optionally a dtype or convention, "
            f"got {len(args)} more positional arguments"
        )
    dtype, convention = _split_extras(cls, args[1:], dtype, convention)
    return _own_tableau(cls, base), args[0], dtype, convention


class StepParts(NamedTuple):
    """The pieces of one corrected step: ``x_next = x + dt * increment + correction``."""

    increment: Tensor
    """The base step's increment psi (the base step is ``x + dt * psi``)."""
    stages: Tuple[Tensor, ...]
    """The step's evaluations of f, ``k_1 = f(t, x)`` first."""
    correction: Tensor
    """g's term ``dt**(p+1) * g(...)``."""


class _SolveSlot:
    """One thread's per-solve state of one solver (see :class:`SolveState`)."""

    __slots__ = ("uncorrected", "z0", "reset_queued", "__weakref__")

    def __init__(self) -> None:
        self.uncorrected = False
        self.z0: Optional[Tensor] = None
        self.reset_queued = False


class _PerThread(threading.local):
    """Each thread's :class:`_SolveSlot` (made on the thread's first look)."""

    def __init__(self) -> None:
        self.slot = _SolveSlot()


class SolveState:
    """A hypersolver's per-solve state (``hs.solve_state``), kept per thread: one solver may be shared
    by threads that solve at once, each solve reading its own thread's state. Copies and pickles of
    the solver start with a fresh one: a non-leaf z0 could not be deep-copied, nor should it travel.

    Attributes:
        uncorrected: True while solving torchdyn's adjoint (base steps, no g), in this thread.
        z0: this thread's solve's initial state, kept for a stage-aware g (None otherwise).
        reset_queued: an autograd callback will set ``uncorrected`` back when the backward pass ends.
        adjoint_warned: the warning about the uncorrected adjoint was shown (once per solver, all threads).
    """

    __slots__ = ("_threads", "adjoint_warned", "__weakref__")

    def __init__(self) -> None:
        self._threads = _PerThread()
        self.adjoint_warned = False

    @property
    def current(self):
        """The calling thread's part of the state: an object with ``uncorrected``, ``z0`` and
        ``reset_queued``, which a callback run on another thread may hold on to."""
        return self._threads.slot

    @property
    def uncorrected(self) -> bool:
        return self._threads.slot.uncorrected

    @uncorrected.setter
    def uncorrected(self, value: bool) -> None:
        self._threads.slot.uncorrected = value

    @property
    def z0(self) -> Optional[Tensor]:
        return self._threads.slot.z0

    @z0.setter
    def z0(self, value: Optional[Tensor]) -> None:
        self._threads.slot.z0 = value

    @property
    def reset_queued(self) -> bool:
        return self._threads.slot.reset_queued

    @reset_queued.setter
    def reset_queued(self, value: bool) -> None:
        self._threads.slot.reset_queued = value

    def __deepcopy__(self, memo) -> SolveState:
        return SolveState()

    def __reduce__(self):
        return (SolveState, ())


class _TimeGrid:
    """``hs.time_grid``: the time grid :func:`~.tuning.tune` chose for a hypersolver (learned or uniform),
    as the ``t_span`` to solve with (in g's dtype, on g's device); None when it was not tuned. Settable:
    a 1-D sequence of at least two finite, strictly monotonic times. Configuration, not per-solve state:
    kept in ``hs.__dict__['_time_grid']`` as floats, copied with the solver, saved and loaded with g."""

    def __get__(self, hs, owner=None) -> Optional[Tensor]:
        if hs is None:
            return self
        grid = hs.__dict__.get("_time_grid")
        if grid is None:
            return None
        like = next((p for p in hs.parameters() if p.is_floating_point()), None)
        if like is None:
            return torch.tensor(grid)
        return torch.tensor(grid, dtype=like.dtype, device=like.device)

    def __set__(self, hs, grid) -> None:
        hs.__dict__["_time_grid"] = None if grid is None else check_time_grid(grid)


_PACKAGE_CLASSES: Dict[str, type] = {}
"""This package's HyperSolver subclasses by name, filled as they are defined."""


class FixedStepSolver(nn.Module):
    """A classical explicit Runge-Kutta solver, defined by its tableau, as a torchdyn solver.

    ``FixedStepSolver(base)`` runs any base (a name, a :class:`~.tableaus.ButcherTableau`, ...);
    the subclasses name theirs: ``Euler()``, ``RK4()``. ``dtype`` is accepted for
    torchdyn's signature; the state's dtype is what the solve uses.
    """

    stepping_class = "fixed"
    tableau: ClassVar[Optional[ButcherTableau]] = None

    def __init__(self, *args: Any, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.tableau, self.dtype = _fixed_arguments(type(self), args, dtype)
        self.order = self.tableau.order

    def sync_device_dtype(self, x: Tensor, t_span: Tensor) -> Tuple[Tensor, Tensor]:
        """torchdyn hook (once per solve): the fast path's checks, then ``t_span`` on ``x``'s device.

        Any tensor shape is accepted, and dict states as by torchdyn's ``SolverTemplate``
        (they need a ``step`` that handles them, e.g. a subclass's)."""
        t_span = check_t_span(t_span)
        proto = state_prototype(x)
        if isinstance(x, Tensor):
            self.check_inputs(x, t_span)
        return x, t_span.to(proto.device)

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """Refuse, by name, a state this solver cannot integrate (run once per solve)."""
        check_state(x)

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One step ``x + dt * psi(t, x)``; torchdyn's ``(None, x_next, None)`` return."""
        psi, _ = rk_increment(self.tableau, f, t, x, dt, k1)
        return None, x + dt * psi, None

    def solve(self, f: VectorField, z0: Tensor, t_span, return_trajectory: bool = True, **fast) -> Tensor:
        """Integrate over ``t_span``; the trajectory ``[T, ...]`` or only the final state.

        ``fast`` options: ``compile=True`` (or a ``torch.compile`` backend name) compiles the whole solve
        (meshes of up to 32 steps, once per step count) or the step (longer meshes), once per (solver,
        vector field, direction), for every batch size and both no-grad modes; ``cuda_graph=True`` captures
        the whole solve as one CUDA graph (CUDA tensors, no gradient) and replays it."""
        return fixed_solve(self, f, z0, t_span, return_trajectory, **fast)

    def extra_repr(self) -> str:
        return f"{self.tableau.name}, order={self.order}"


class Euler(FixedStepSolver):
    """Forward Euler, order 1, one f evaluation per step."""

    tableau = tableaus.EULER


class Midpoint(FixedStepSolver):
    """Explicit midpoint, order 2, two f evaluations per step."""

    tableau = tableaus.MIDPOINT


class Heun(FixedStepSolver):
    """Heun's method (explicit trapezoid), order 2, two f evaluations per step. Not in torchdyn."""

    tableau = tableaus.HEUN


class Ralston(FixedStepSolver):
    """Ralston's method (alpha = 2/3, b = (1/4, 3/4)), order 2. Not in torchdyn."""

    tableau = tableaus.RALSTON


class RK4(FixedStepSolver):
    """Classical Runge-Kutta, order 4, four f evaluations per step."""

    tableau = tableaus.RK4


class Alpha(FixedStepSolver):
    """The two-stage, second-order alpha family (1/2 midpoint, 1 Heun, 2/3 Ralston)."""

    def __init__(self, alpha: float, dtype: Optional[torch.dtype] = None):
        super().__init__(alpha_tableau(alpha), dtype=dtype)


class HyperSolver(nn.Module, ResidualMethods):
    """A base solver corrected by a network g that learns its local truncation residual.

    One step is ``z + dt * psi(t, z) + dt**(p+1) * g(dt, t, z, f(t, z))``, ``f(t, z)`` being the base
    step's first stage (reused: g costs no extra evaluation of f). Under the stage-aware conventions
    (``'stages'``, ``'concat_stages'``) g reads every stage ``k_1..k_s`` of the step and the solve's
    initial state ``z0``. A subclass steps differently by overriding :meth:`step_parts`, never ``step``.

    ``HyperSolver(base, hypernet)`` corrects any base; the subclasses name theirs
    (``HyperEuler(hypernet)``, as torchdyn's ``HyperEuler(hypernet, dtype=...)``).

    One solver may be shared by threads that solve at once (``hs.solve``, ``NeuralODE(f, solver=hs)``,
    ``odeint``, wrapped in :class:`~.guard.Guarded` too): what a solve keeps between its steps
    (:attr:`solve_state`) is per thread, so each solve gives the numbers it gives alone.

    Args:
        base: the explicit fixed-step base solver (a name such as ``'rk4'``, a
            :class:`~.tableaus.ButcherTableau`, a package solver, or torchdyn's ``Euler`` / ``RungeKutta4``).
        hypernet: g, in any of the conventions of :mod:`.hypernets`.
        dtype: accepted for torchdyn's signature; the state's dtype is what a solve uses.
        convention: ``'concat'``, ``'tx'``, ``'dt_t_z_dz'``, ``'stages'`` or ``'concat_stages'``;
            read from g when omitted (the stage-aware two only from ``g.hypernet_convention``).
    """

    stepping_class = "fixed"
    tableau: ClassVar[Optional[ButcherTableau]] = None
    validity: Optional[Validity] = None
    """Where g was fitted (set by ``fit`` and ``load``); solves outside it warn. None: unchecked."""
    residual_scale: float = 1.0
    """g's output is multiplied by this (saved with g): ``fit(..., balance_meshes=True)`` sets it to the
    residual targets' root mean square, so that g learns numbers of order one (a high-order base's are ~1e-4)."""

    def __init__(self, *args: Any, dtype: Optional[torch.dtype] = None, convention: Optional[str] = None):
        super().__init__()
        self._setup(*_hyper_arguments(type(self), args, dtype, convention))

    def _setup(self, tableau: ButcherTableau, hypernet: Callable, dtype, convention: Optional[str]) -> None:
        self.tableau, self.order, self.dtype = tableau, tableau.order, dtype
        self.hypernet = hypernet  # torchdyn's attribute name: state_dict keys match its HyperEuler
        self.convention = check_convention(convention) if convention else detect_convention(hypernet)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith(__name__.rpartition(".")[0] + "."):  # this package's classes only
            _PACKAGE_CLASSES[cls.__name__] = cls

    @classmethod
    def named(cls, name: str) -> type:
        """This package's hypersolver class called ``name`` (how :func:`~.io.load` rebuilds one);
        ``HyperSolver`` for any other name (a user's subclass is rebuilt as the generic class)."""
        return _PACKAGE_CLASSES.get(name, HyperSolver)

    @classmethod
    def from_tableau(cls, tableau: ButcherTableau, hypernet: Callable, convention: Optional[str] = None) -> HyperSolver:
        """An instance of this class on ``tableau`` (how :func:`~.io.load` rebuilds any subclass)."""
        hs = cls.__new__(cls)
        nn.Module.__init__(hs)
        hs._setup(tableau, hypernet, None, convention)
        return hs

    @property
    def g(self) -> Callable:
        return self.hypernet

    @property
    def reads_stages(self) -> bool:
        """Whether g reads every stage of the base step and the solve's initial state z0."""
        return reads_stages(self.convention)

    @property
    def op1(self) -> int:
        """``order + 1``, the power of ``dt`` on g's correction (torchdyn's attribute name)."""
        return self.order + 1

    @property
    def base_solver(self) -> FixedStepSolver:
        """The uncorrected base solver (one instance, so its compiled steps are cached)."""
        base = self.__dict__.get("_base_solver")
        if base is None or base.tableau != self.tableau:
            base = self.__dict__["_base_solver"] = FixedStepSolver(self.tableau)  # not a submodule
        return base

    @property
    def solve_state(self) -> SolveState:
        """The solver's :class:`SolveState`, each thread's own (fresh in copies and pickles of the solver)."""
        state = self.__dict__.get("_solve_state")
        if state is None:  # setdefault: threads sharing a new solver all get the same one
            state = self.__dict__.setdefault("_solve_state", SolveState())
        return state

    @property
    def correcting(self) -> bool:
        """Whether steps are corrected now (in this thread): False while solving torchdyn's adjoint, whose
        steps are the base solver's (see :meth:`sync_device_dtype`); a wrapper of this solver reads it."""
        return not _current(self).uncorrected

    def sync_device_dtype(self, x: Tensor, t_span: Tensor) -> Tuple[Tensor, Tensor]:
        """torchdyn hook (once per solve): the fast path's checks, then ``t_span`` on ``x``'s device.
        torchdyn's adjoint solve runs uncorrected, with a UserWarning once per solver: g was fitted to
        the forward state's residuals, not to the adjoint state's."""
        t_span = check_t_span(t_span)
        proto = state_prototype(x)
        sensitivity = torchdyn_adjoint_solve()  # called here: it walks the stack from this hook
        if sensitivity is not None:
            solve_uncorrected(self.solve_state, sensitivity, type(self).__name__, self.tableau.name)
        elif isinstance(x, Tensor):
            self.check_inputs(x, t_span)
            check_model_of(self, torchdyn_vector_field())  # f is given to the steps, not to this hook
        else:  # a dict state: g is not called on it by the default step
            self.solve_state.uncorrected = False
        return x, t_span.to(proto.device)

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """Refuse a state g cannot take (dtype, shape, input size) and warn outside g's validity
        record; once per solve (the next steps are corrected)."""
        self.solve_state.uncorrected = False
        check_state(x)
        _check_g_dtype(self.hypernet, x)
        check_hypernet_input(self.hypernet, self.convention, x, self.tableau.stages)
        check_solve(self, x, t_span)
        self.record_initial_state(x)

    def record_initial_state(self, z0: Tensor) -> None:
        """Keep the solve's initial state for g (only under the stage-aware conventions, which
        read it); :meth:`check_inputs` calls it at the start of every solve."""
        self.solve_state.z0 = z0 if self.reads_stages else None

    def describe(self) -> str:
        """What this hypersolver is, what it was fitted on, and where it is valid."""
        return describe(self)

    time_grid = _TimeGrid()

    def correction(
        self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor,
        stages: Optional[Sequence[Tensor]] = None, z0: Optional[Tensor] = None,
    ) -> Tensor:
        """g's predicted residual at one step, checked to have z's shape. The stage-aware
        conventions also read ``stages`` (all of the base step's; ``stages[0] == dz``) and ``z0``."""
        out = _call_g(self, dt, t, z, dz, stages, z0)
        return out if self.residual_scale == 1.0 else out * self.residual_scale

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One corrected step, ``x + dt * increment + correction`` of :meth:`step_parts`; torchdyn's
        ``(None, x_next, None)`` return. (The base solver's step while solving torchdyn's adjoint.)"""
        if _current(self).uncorrected:
            return self.base_solver.step(f, x, t, dt, k1, args)
        parts = self.step_parts(f, x, t, dt, k1)
        return None, x + dt * parts.increment + parts.correction, None

    def step_parts(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None) -> StepParts:
        """The pieces of one corrected step (:class:`StepParts`): the base step's increment, all of its
        stage evaluations and g's term ``dt**(p+1) * g(...)``. The method a subclass overrides."""
        psi, stages = rk_stages(self.tableau, f, t, x, dt, k1)
        if self.reads_stages:
            g = self.correction(dt, t, x, stages[0], stages, _recorded_z0(self))
        else:
            g = self.correction(dt, t, x, stages[0])
        return StepParts(psi, stages, dt ** (self.order + 1) * g)

    def solve(
        self, f: VectorField, z0: Tensor, t_span, correct: bool = True, return_trajectory: bool = True, **fast
    ) -> Tensor:
        """Integrate over ``t_span`` with the correction on (or off: the base solver): torchdyn's ``odeint``
        numbers, fast. ``fast`` options: ``compile=True`` (or a ``torch.compile`` backend name) compiles the
        whole solve (meshes of up to 32 steps, once per step count) or the step (longer meshes), once per
        (solver, vector field, direction), for every batch size and both no-grad modes; ``cuda_graph=True``
        captures the whole solve as one CUDA graph (CUDA tensors, no gradient) and replays it."""
        return fixed_solve(self if correct else self.base_solver, f, z0, t_span, return_trajectory, **fast)

    def extra_repr(self) -> str:
        return f"base={self.tableau.name}, order={self.order}, convention={self.convention!r}"


def _check_g_dtype(hypernet: Callable, x: Tensor) -> None:
    g_dtype = parameter_dtype(hypernet)
    if g_dtype is not None and g_dtype != x.dtype:
        raise TypeError(
            f"the state is {x.dtype} but g ({type(hypernet).__name__}) has {g_dtype} parameters; "
            f"cast one to the other, e.g. hs.to({x.dtype})"
        )


def _call_g(hs: HyperSolver, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor, stages, z0) -> Tensor:
    """g's output at one step, refused by name unless it is a tensor of z's dtype and shape."""
    if hs.reads_stages and (stages is None or z0 is None):
        raise TypeError(
            f"g reads all stages of the base step and z0 (the {hs.convention!r} convention): "
            "call correction(dt, t, z, dz, stages, z0)"
        )
    out = call_hypernet(hs.hypernet, hs.convention, dt, t, z, dz, stages, z0)
    name = type(hs.hypernet).__name__
    if not isinstance(out, Tensor):
        raise TypeError(f"hypernet {name} returned {type(out).__name__}, not a tensor")
    if out.dtype != z.dtype:
        raise TypeError(
            f"hypernet {name} returned {out.dtype} for a {z.dtype} state; "
            "they must match (a different dtype would silently change the solution's)"
        )
    if out.shape != z.shape:
        raise ValueError(
            f"hypernet {name} returned shape {tuple(out.shape)} for a state of shape {tuple(z.shape)}; they must match"
        )
    return out


def _current(hs: HyperSolver) -> _SolveSlot:
    """The calling thread's part of the solver's state (the lookup of every step: no properties)."""
    state = hs.__dict__.get("_solve_state")
    return (state if state is not None else hs.solve_state)._threads.slot


def _recorded_z0(hs: HyperSolver) -> Tensor:
    z0 = _current(hs).z0
    if z0 is None:
        raise RuntimeError(
            f"g reads the solve's initial state z0 (the {hs.convention!r} convention) but none was recorded: "
            "solve with hs.solve / torchdyn's odeint, or call hs.record_initial_state(z0) before step()"
        )
    return z0


def describe(hs: HyperSolver) -> str:
    """What a hypersolver is, what it was fitted on, and where it is valid (``hs.describe()``)."""
    tableau = hs.tableau
    lines = [
        f"{type(hs).__name__}: base solver {tableau.name} (order {tableau.order}, {tableau.stages} "
        f"f evaluation{'s' if tableau.stages > 1 else ''} per step) corrected by {_hypernet_text(hs.g)}, "
        f"called with the {hs.convention!r} convention."
    ]
    validity: Optional[Validity] = getattr(hs, "validity", None)
    if validity is None:
        lines.append("No fitting record: fit(...) or load(...) sets one; solves are not checked against it.")
    else:
        if validity.description:
            lines.append(f"Fitted: {validity.description}.")
        lines.append(f"Valid for {validity.range_text()}; solves outside it warn.")
        if validity.has_state_range:
            lines.append(f"Fitted in state space on {validity.state_range_text()}; Guarded(...) can check against it.")
    grid = hs.__dict__.get("_time_grid")
    if grid is not None:
        points = ", ".join(f"{v:.4g}" for v in grid)
        lines.append(
            f"Tuned for a time grid of {len(grid) - 1} steps: t = [{points}] (hs.time_grid; pass it as the t_span)."
        )
    return "\n".join(lines)


def _hypernet_text(g) -> str:
    config = getattr(g, "config", None)
    if isinstance(config, dict):
        return f"{type(g).__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())})"
    return type(g).__name__


def __getattr__(name: str):
    if name == "map_stage_corrections":  # before 0.3 it lived here
        warnings.warn(
            "torchdyn_hypersolvers.solvers.map_stage_corrections moved to the fitting side "
            "(torchdyn_hypersolvers._residuals); the old path will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return _residuals.map_stage_corrections
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HyperEuler(HyperSolver):
    """Euler corrected by g (p = 1): one evaluation of f and one of g per step.

    The cheapest hypersolver, and the paper's choice for image classifiers; torchdyn's
    ``HyperEuler`` with the same ``hypernet`` attribute and ``state_dict`` keys.
    """

    tableau = tableaus.EULER


class HyperMidpoint(HyperSolver):
    """The explicit midpoint method corrected by g (p = 2): two evaluations of f, one of g.

    torchdyn's ``HyperMidpoint``; the paper's choice for base-solver generalisation.
    """

    tableau = tableaus.MIDPOINT


class HyperHeun(HyperSolver):
    """Heun's method corrected by g (p = 2): two evaluations of f, one of g per step.

    The paper's choice for sampling continuous normalizing flows, where its g reads both
    stages and the initial state (``convention='concat_stages'``).
    """

    tableau = tableaus.HEUN


class HyperRalston(HyperSolver):
    """Ralston's method (alpha = 2/3) corrected by g (p = 2): two evaluations of f, one of g."""

    tableau = tableaus.RALSTON


class HyperRK4(HyperSolver):
    """Classical RK4 corrected by g (p = 4): four evaluations of f, one of g per step.

    Its residual is divided by dt**5: fit it on precise targets (``harvest(..., base=hs)``).
    """

    tableau = tableaus.RK4


HyperRungeKutta4 = HyperRK4
"""torchdyn's name for the same solver."""


class HyperAlpha(HyperSolver):
    """A member of the two-stage alpha family corrected by g (p = 2)."""

    def __init__(
        self, hypernet: Callable, alpha: float, convention: Optional[str] = None, dtype: Optional[torch.dtype] = None
    ):
        super().__init__(alpha_tableau(alpha), hypernet, dtype=dtype, convention=convention)
