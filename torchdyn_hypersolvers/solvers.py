"""Fixed-step solvers and hypersolvers that follow torchdyn's solver protocol.

A torchdyn solver is an ``nn.Module`` with ``order``, ``stepping_class = 'fixed'``,
``sync_device_dtype(x, t_span)`` and ``step(f, x, t, dt, k1=None, args=None)``
returning ``(None, x_next, None)``. Every class here honours it, so it works in
``torchdyn.core.NeuralODE(f, solver=...)`` and ``torchdyn.numerics.odeint``
without any change to torchdyn.

A class names its base solver as data, ``tableau = EULER``; the stepping itself is
:func:`~.tableaus.rk_stages` and the loop over a mesh is :func:`~._loop.fixed_solve`.
A new method is a tableau and a two-line class::

    class HyperRK38(HyperSolver):
        tableau = RK38
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import tableaus
from ._adjoint import torchdyn_adjoint_solve
from ._loop import fixed_solve
from ._mesh import check_t_span, check_time_grid, forward_time, map_steps, step_times
from ._outside_fit import check_solve
from ._precision import parameter_dtype
from ._solver_names import resolve_base
from ._states import check_state, state_prototype
from .hypernets import call_hypernet, check_convention, check_hypernet_input, detect_convention, reads_stages
from .tableaus import ButcherTableau, VectorField, alpha_tableau, rk_increment, rk_stages
from .validity import Validity
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
    "HyperRungeKutta4",
    "HyperAlpha",
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


class _InitialState:
    """The current solve's initial state, for a stage-aware g. Not a copy of the state: copies and
    pickles of the solver start empty (a non-leaf z0 could not be deep-copied, nor should it travel)."""

    __slots__ = ("z0",)

    def __init__(self) -> None:
        self.z0: Optional[Tensor] = None

    def __deepcopy__(self, memo) -> _InitialState:
        return _InitialState()

    def __reduce__(self):
        return (_InitialState, ())


_PACKAGE_CLASSES: Dict[str, type] = {}
"""This package's HyperSolver subclasses by name, filled as they are defined."""


class FixedStepSolver(nn.Module):
    """A classical explicit Runge-Kutta solver, defined by its tableau, as a torchdyn solver.

    ``FixedStepSolver(base)`` runs any base (a name, a :class:`ButcherTableau`, ...);
    the subclasses name theirs: ``Euler()``, ``RK4()``. ``dtype`` is accepted for
    torchdyn's signature; the state's dtype is what the solve uses.
    """

    stepping_class = "fixed"
    tableau: ClassVar[Optional[ButcherTableau]] = None

    def __init__(self, *args: Any, dtype: Optional[torch.dtype] = None):
        super().__init__()
        base = None
        if args and not isinstance(args[0], torch.dtype):
            base, args = args[0], args[1:]
        if len(args) > 1:
            raise TypeError(f"{type(self).__name__} takes at most a base and a dtype, got {len(args) + 1} arguments")
        self.dtype, _ = _split_extras(type(self), args, dtype, None)
        self.tableau = _own_tableau(type(self), base)
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

        ``fast`` options (``compile``, ``cuda_graph``) as in :func:`~._loop.fixed_solve`."""
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


class HyperSolver(nn.Module):
    """A base solver corrected by a network g that learns its local truncation residual.

    One step is ``z + dt * psi(t, z) + dt**(p+1) * g(dt, t, z, f(t, z))``. ``f(t, z)`` is
    the base solver's first stage, computed once and reused as g's input, so the
    correction costs one call of g and no extra evaluation of f. Under the stage-aware
    conventions (``'stages'``, ``'concat_stages'``) g reads every stage ``k_1..k_s`` of the
    step and the solve's initial state ``z0`` (recorded by :meth:`check_inputs`, once per
    solve), still at ``tableau.stages`` evaluations of f per step.

    ``HyperSolver(base, hypernet)`` corrects any base; the subclasses name theirs
    (``HyperEuler(hypernet)``, as torchdyn's ``HyperEuler(hypernet, dtype=...)``).

    Args:
        base: the explicit fixed-step base solver (see :func:`~._solver_names.resolve_base`).
        hypernet: g, in any of the conventions of :mod:`.hypernets`.
        dtype: accepted for torchdyn's signature; the state's dtype is what a solve uses.
        convention: ``'concat'``, ``'tx'``, ``'dt_t_z_dz'``, ``'stages'`` or ``'concat_stages'``;
            read from g when omitted (the stage-aware two only from ``g.hypernet_convention``).
    """

    stepping_class = "fixed"
    tableau: ClassVar[Optional[ButcherTableau]] = None
    _uncorrected = False  # True while solving torchdyn's adjoint: see sync_device_dtype
    validity: Optional[Validity] = None
    """Where g was fitted (set by ``fit`` and ``load``); solves outside it warn. None: unchecked."""
    residual_scale: float = 1.0
    """g's output is multiplied by this: ``fit(..., balance_meshes=True)`` sets it to the residual
    targets' root mean square, so that g learns numbers of order one even where a high-order base
    leaves residuals of 1e-4 (saved and loaded with g)."""

    def __init__(self, *args: Any, dtype: Optional[torch.dtype] = None, convention: Optional[str] = None):
        super().__init__()
        base = None
        if type(self).tableau is None:
            if not args:
                raise TypeError(f"{type(self).__name__}(base, hypernet) needs a base solver and a hypernet")
            base, args = args[0], args[1:]
        if not 1 <= len(args) <= 2:
            raise TypeError(
                f"{type(self).__name__} takes a hypernet and optionally a dtype or convention, "
                f"got {len(args)} more positional arguments"
            )
        hypernet, extras = args[0], args[1:]
        dtype, convention = _split_extras(type(self), extras, dtype, convention)
        self._setup(_own_tableau(type(self), base), hypernet, dtype, convention)

    def _setup(self, tableau: ButcherTableau, hypernet: Callable, dtype, convention: Optional[str]) -> None:
        self.tableau, self.order, self.dtype = tableau, tableau.order, dtype
        self.hypernet = hypernet  # torchdyn's attribute name: state_dict keys match its HyperEuler
        self.convention = check_convention(convention) if convention else detect_convention(hypernet)

    @property
    def reads_stages(self) -> bool:
        """Whether g reads every stage of the base step and the solve's initial state z0."""
        return reads_stages(self.convention)

    @property
    def op1(self) -> int:
        """``order + 1``, the power of ``dt`` on g's correction (torchdyn's attribute name)."""
        return self.order + 1

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
    def base_solver(self) -> FixedStepSolver:
        """The uncorrected base solver (one instance, so its compiled steps are cached)."""
        base = self.__dict__.get("_base_solver")
        if base is None or base.tableau != self.tableau:
            base = self.__dict__["_base_solver"] = FixedStepSolver(self.tableau)  # not a submodule
        return base

    def sync_device_dtype(self, x: Tensor, t_span: Tensor) -> Tuple[Tensor, Tensor]:
        """torchdyn hook (once per solve): the fast path's checks, then ``t_span`` on ``x``'s device.

        When the solve is torchdyn's adjoint (backward) solve, it is done with the base tableau
        and no correction: g was fitted to the forward state's residuals, not to the adjoint
        state's (another size and another vector field), so its correction there would be
        noise. A UserWarning says so, once per solver instance."""
        t_span = check_t_span(t_span)
        proto = state_prototype(x)
        sensitivity = torchdyn_adjoint_solve()
        if sensitivity is not None:
            self._uncorrected = True
            self._reset_after_backward()
            self._warn_uncorrected_adjoint(sensitivity)
        elif isinstance(x, Tensor):
            self.check_inputs(x, t_span)
        else:  # a dict state: g is not called on it by the default step
            self._uncorrected = False
        return x, t_span.to(proto.device)

    def _reset_after_backward(self) -> None:
        """Correct again once this backward pass ends, so that a later direct ``step()`` call is
        corrected (every solve also resets it: :meth:`check_inputs`)."""
        if self.__dict__.get("_reset_queued"):
            return
        solver = weakref.ref(self)

        def reset() -> None:
            hs = solver()
            if hs is not None:
                hs._uncorrected = False
                hs.__dict__["_reset_queued"] = False

        try:
            torch.autograd.Variable._execution_engine.queue_callback(reset)
        except (AttributeError, RuntimeError):  # not inside autograd's engine: the next solve resets it
            return
        self.__dict__["_reset_queued"] = True

    def _warn_uncorrected_adjoint(self, sensitivity: str) -> None:
        if self.__dict__.get("_adjoint_warned"):
            return
        self.__dict__["_adjoint_warned"] = True
        how = (
            "pass solver_adjoint=... (e.g. 'rk4' or 'dopri5') to choose it"
            if sensitivity == "adjoint"
            else "torchdyn's interpolated_adjoint always reuses the forward solver; use sensitivity='autograd' "
            "or 'adjoint' with solver_adjoint=... to choose it"
        )
        warnings.warn(
            f"{type(self).__name__} is solving the adjoint of torchdyn's sensitivity={sensitivity!r} with its base "
            f"solver {self.tableau.name} and no correction: g was fitted for the forward state, not the adjoint's; "
            f"{how}. (Shown once per solver.)",
            UserWarning,
            stacklevel=3,
        )

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """Refuse a state g cannot take (dtype, shape, input size) and warn outside g's validity
        record; once per solve (the next steps are corrected)."""
        self._uncorrected = False
        check_state(x)
        g_dtype = parameter_dtype(self.hypernet)
        if g_dtype is not None and g_dtype != x.dtype:
            raise TypeError(
                f"the state is {x.dtype} but g ({type(self.hypernet).__name__}) has {g_dtype} parameters; "
                f"cast one to the other, e.g. hs.to({x.dtype})"
            )
        check_hypernet_input(self.hypernet, self.convention, x, self.tableau.stages)
        check_solve(self, x, t_span)
        self.record_initial_state(x)

    def record_initial_state(self, z0: Tensor) -> None:
        """Keep the solve's initial state for g (only under the stage-aware conventions, which
        read it); :meth:`check_inputs` calls it at the start of every solve."""
        holder = self.__dict__.get("_initial_state")
        if holder is None:
            holder = self.__dict__["_initial_state"] = _InitialState()
        holder.z0 = z0 if self.reads_stages else None

    def _z0(self) -> Tensor:
        holder = self.__dict__.get("_initial_state")
        z0 = holder.z0 if holder is not None else None
        if z0 is None:
            raise RuntimeError(
                f"g reads the solve's initial state z0 (the {self.convention!r} convention) but none was recorded: "
                "solve with hs.solve / torchdyn's odeint, or call hs.record_initial_state(z0) before step()"
            )
        return z0

    def describe(self) -> str:
        """What this hypersolver is, what it was fitted on, and where it is valid."""
        return describe_solver(self)

    @property
    def time_grid(self) -> Optional[Tensor]:
        """The time grid :func:`~.tuning.tune` chose for this hypersolver (learned or uniform), as the
        ``t_span`` to solve with (in g's dtype, on g's device); None when it was not tuned. Settable:
        a 1-D sequence of at least two finite, strictly monotonic times (saved and loaded with g)."""
        grid = self.__dict__.get("_time_grid")
        if grid is None:
            return None
        like = next((p for p in self.parameters() if p.is_floating_point()), None)
        if like is None:
            return torch.tensor(grid)
        return torch.tensor(grid, dtype=like.dtype, device=like.device)

    @time_grid.setter
    def time_grid(self, grid) -> None:
        self.__dict__["_time_grid"] = None if grid is None else check_time_grid(grid)

    def correction(
        self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor,
        stages: Optional[Sequence[Tensor]] = None, z0: Optional[Tensor] = None,
    ) -> Tensor:
        """g's predicted residual at one step, checked to have z's shape. The stage-aware
        conventions also read ``stages`` (all of the base step's; ``stages[0] == dz``) and ``z0``."""
        if self.reads_stages and (stages is None or z0 is None):
            raise TypeError(
                f"g reads all stages of the base step and z0 (the {self.convention!r} convention): "
                "call correction(dt, t, z, dz, stages, z0); correction_inputs(f, t, z, dt, z0) builds them"
            )
        out = call_hypernet(self.hypernet, self.convention, dt, t, z, dz, stages, z0)
        if not isinstance(out, Tensor):
            raise TypeError(f"hypernet {type(self.hypernet).__name__} returned {type(out).__name__}, not a tensor")
        if out.dtype != z.dtype:
            raise TypeError(
                f"hypernet {type(self.hypernet).__name__} returned {out.dtype} for a {z.dtype} state; "
                "they must match (a different dtype would silently change the solution's)"
            )
        if out.shape != z.shape:
            raise ValueError(
                f"hypernet {type(self.hypernet).__name__} returned shape {tuple(out.shape)} "
                f"for a state of shape {tuple(z.shape)}; they must match"
            )
        return out if self.residual_scale == 1.0 else out * self.residual_scale

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One corrected step; torchdyn's ``(None, x_next, None)`` return. (The base step, as
        :class:`FixedStepSolver`'s, while solving torchdyn's adjoint: see :meth:`sync_device_dtype`.)"""
        if self._uncorrected:
            psi, _ = rk_stages(self.tableau, f, t, x, dt, k1)
            return None, x + dt * psi, None
        psi, _, c = self.step_parts(f, x, t, dt, k1)
        return None, x + dt * psi + c, None

    def step_parts(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None):
        """The pieces of one corrected step, ``x_next = x + dt * psi + c``: ``(psi, stages, c)``, the base
        step's increment, all of its stage evaluations and g's term ``c = dt**(p+1) * g(...)``."""
        psi, stages = rk_stages(self.tableau, f, t, x, dt, k1)
        if self.reads_stages:
            g = self.correction(dt, t, x, stages[0], stages, self._z0())
        else:
            g = self.correction(dt, t, x, stages[0])
        return psi, stages, dt ** (self.order + 1) * g

    def correction_inputs(self, f: VectorField, t: Tensor, z: Tensor, dt: Tensor, z0: Optional[Tensor] = None):
        """The arguments of :meth:`correction` at one step from ``z`` (``z0`` defaults to ``z``):
        ``(dt, t, z, f(t, z))``, plus the base step's stages and ``z0`` when g reads them."""
        if not self.reads_stages:
            return dt, t, z, f(t, z)
        _, stages = rk_stages(self.tableau, f, t, z, dt)
        return dt, t, z, stages[0], stages, z if z0 is None else z0

    def solve(
        self, f: VectorField, z0: Tensor, t_span, correct: bool = True, return_trajectory: bool = True, **fast
    ) -> Tensor:
        """Integrate over ``t_span`` with the correction on (or off: the base solver).

        The fast path: same numbers as torchdyn's ``odeint`` with this solver, without its
        per-step overhead. ``fast`` options (``compile``, ``cuda_graph``) as in :func:`~._loop.fixed_solve`."""
        return fixed_solve(self if correct else self.base_solver, f, z0, t_span, return_trajectory, **fast)

    # -- the paper's template methods (supplement B.1), vectorised over all steps --

    def base_residuals(self, f: VectorField, traj: Tensor, t_span) -> Tensor:
        """The base solver's residuals ``(z[k+1] - z[k] - dt psi(t_k, z[k])) / dt**(p+1)``
        on a trajectory ``[T, B, ...]``, for all steps in one batched call: ``[T-1, B, ...]``."""
        return self.residual_targets(f, traj, t_span)[0]

    def residual_targets(self, f: VectorField, traj: Tensor, t_span, with_stages: bool = False):
        """``(base residuals, f(t_k, z[k]))`` on a trajectory: what g is fitted to, and its input.

        With ``with_stages=True`` the second item is the tuple of all the base step's stage
        evaluations ``(k_1, ..., k_s)``, each ``[T-1, B, ...]`` (what a stage-aware g reads)."""
        t, dt, z, z_next, f = _steps_of(f, traj, t_span)
        psi, stages = map_steps(lambda t_, dt_, z_: rk_stages(self.tableau, f, t_, z_, dt_), t, dt, z)
        stages = tuple(stages)
        dt_b = _broadcast(dt, z)
        return (z_next - z - dt_b * psi) / dt_b ** (self.order + 1), stages if with_stages else stages[0]

    def hypersolver_residuals(
        self,
        f: VectorField,
        traj: Tensor,
        t_span,
        dz: Optional[Tensor] = None,
        stages: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """g's predicted residuals at every step of a trajectory, in one batched call of g.

        ``dz`` (``f`` at the trajectory's points) is recomputed when not given; so are the
        base step's ``stages`` when g reads them (then ``z0`` is the trajectory's first state)."""
        t, dt, z, _, f = _steps_of(f, traj, t_span)
        if not self.reads_stages:
            if dz is None:
                dz = map_steps(f, t, z)
            return map_steps(self.correction, dt, t, z, dz)
        if stages is None:
            _, stages = map_steps(lambda t_, dt_, z_: rk_stages(self.tableau, f, t_, z_, dt_), t, dt, z)
        return map_stage_corrections(self, dt, t, z, tuple(stages), traj[0])

    def extra_repr(self) -> str:
        return f"base={self.tableau.name}, order={self.order}, convention={self.convention!r}"


def map_stage_corrections(
    hs: HyperSolver, dt: Tensor, t: Tensor, z: Tensor, stages: Sequence[Tensor], z0: Tensor
) -> Tensor:
    """A stage-aware g's residuals at every step ``[S, N, ...]`` in one batched call; ``stages``
    each ``[S, N, ...]``, ``z0`` the trajectories' initial states ``[N, ...]`` (the same at every step)."""

    def at_step(dt_: Tensor, t_: Tensor, z_: Tensor, *stages_: Tensor) -> Tensor:
        return hs.correction(dt_, t_, z_, stages_[0], stages_, z0)

    return map_steps(at_step, dt, t, z, *stages)


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
