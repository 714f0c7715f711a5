"""Non-stationary solvers: every step of an ``n``-step solve with its own Runge-Kutta coefficients.

A classical solver uses one Butcher tableau at every step. For a fixed budget of ``n`` steps,
each step ``k`` may have its own nodes ``c_k``, stage matrix ``A_k`` (strictly lower triangular)
and weights ``b_k`` (later work on learned solvers, non-stationary bespoke solvers, learns them so,
with fewer than 200 parameters). :class:`NonStationarySolver` starts from a base tableau at every
step, so that it is exactly its base solver until fitted, and learns per-step deltas::

    c_k = c + dc_k      (c_k[0] = 0: the first stage is f(t, z), reused by g)
    A_k = A + dA_k      (strictly lower triangular)
    b_k = b + db_k - mean(db_k)      (sum(b_k) = 1: each step stays consistent)

The step costs the base's evaluations of f and nothing else (a few scalar operations); with a g it
also adds the hypersolver correction ``dt**(p+1) g(...)`` of the base's order ``p``. Fit it for its
budget, end to end, with :func:`~.budget.fit_budget` (coefficients, g and the time grid together).
The nodes are free of the row sums of ``A_k``: the fitted solver may sample the vector field's time
where it helps, as a learned time grid does.

The step index ``k`` is found from ``t`` on the solve's own mesh, on the device (no host
synchronisation); a ``t_span`` of another number of steps than the solver's is refused.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import hypernets
from ._checks import check_int
from ._mesh import check_t_span
from ._precision import parameter_dtype
from ._records import tableau_record
from ._solver_names import resolve_base
from .hypernets import check_convention, check_hypernet_input, detect_convention
from .solvers import BaseLike, HyperSolver, StepParts, _recorded_z0
from .tableaus import TABLEAUS, ButcherTableau, StepCoefficients, VectorField, rk_stages

__all__ = ["NonStationaryCoefficients", "NonStationarySolver"]


class NonStationaryCoefficients(nn.Module):
    """The learned part of a :class:`NonStationarySolver`: per-step coefficient deltas and an optional g.

    One parameter, ``deltas`` of shape ``[steps, s(s-1)/2 + s + s-1]`` for a base of ``s`` stages: per
    step, the deltas of ``A``'s entries below the diagonal (row by row), of the weights ``b`` and of the
    nodes ``c[1:]``; zero at first (the base tableau), in g's dtype and on its device (the default dtype
    without a g). ``steps * (s(s+1)/2 + s - 1)`` numbers: 16 for a 4-step midpoint solver, 104 for an
    8-step RK4 one.

    Args:
        base: the base solver (a name such as ``'midpoint'``, a tableau, a solver).
        steps: the budget, the number of steps of every solve.
        g: an optional hypernet (any convention of :mod:`.hypernets`), the correction ``dt**(p+1) g``.
        convention: g's convention, read from g when omitted.

    Calling it calls g (it is the hypersolver's g). :func:`~.io.load` rebuilds it from its ``config``
    when g is absent or one of :mod:`.hypernets`; with a user's g, pass
    ``load(path, g=NonStationaryCoefficients(base, steps, g=YourG(...)))``.
    """

    def __init__(self, base: BaseLike, steps: int, g: Optional[nn.Module] = None, convention: Optional[str] = None):
        super().__init__()
        self.tableau: ButcherTableau = resolve_base(base)
        self.steps = check_int(steps, "steps")
        s = self.tableau.stages
        self.sizes = (s * (s - 1) // 2, s, s - 1)
        like = next((p for p in g.parameters() if p.is_floating_point()), None) if isinstance(g, nn.Module) else None
        placed = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.deltas = nn.Parameter(torch.zeros(self.steps, sum(self.sizes), **placed))  # in g's dtype, on its device
        self.g = g
        if g is None and convention is not None:
            raise ValueError(f"convention={convention!r} was given without a g to call")
        self.g_convention = None if g is None else check_convention(convention) if convention else detect_convention(g)
        self.__dict__["_tables"] = {}  # the base and the weight projection, per (dtype, device)

    @property
    def hypernet_convention(self) -> str:
        """How the hypersolver calls this module (g's convention; ``'dt_t_z_dz'`` without a g)."""
        return self.g_convention or "dt_t_z_dz"

    @property
    def config(self) -> Dict[str, Any]:
        """Plain data to rebuild it (:func:`~.io.load` does): the base (a package tableau's name, else the
        tableau as data), ``steps``, g's ``convention`` and g's record: ``class``, ``module`` and, for this
        package's hypernets, their ``config`` (None for a user's g, which load cannot rebuild)."""
        t = self.tableau
        return {
            "base": t.name if TABLEAUS.get(t.name) == t else tableau_record(t),
            "steps": self.steps,
            "convention": self.g_convention,
            "g": None if self.g is None else _hypernet_record(self.g),
        }

    def forward(self, *args: Any) -> Tensor:
        if self.g is None:
            raise RuntimeError("this non-stationary solver has no g: its steps have no correction to compute")
        return self.g(*args)

    def coefficients(self, k: Tensor) -> Tuple[Tensor, ...]:
        """Step ``k``'s (a ``[1]`` long tensor) coefficients, as 0-dim tensors: A's lower entries row by
        row, then ``b``, then ``c[1:]``. One gather and one small product, on the device."""
        base, projection = self._tables_like(self.deltas)
        return (base + self.deltas.index_select(0, k)[0] @ projection).unbind(0)

    def tableau_at(self, k: int) -> ButcherTableau:
        """Step ``k``'s coefficients as a :class:`~.tableaus.ButcherTableau`, to read them (a host copy; its
        ``order`` is the base's, which fitted coefficients need not keep)."""
        k = check_int(k, "k", minimum=0)
        if k >= self.steps:
            raise ValueError(f"step k={k} is outside the {self.steps} steps of this solver")
        with torch.no_grad():
            values = [float(v) for v in self.coefficients(torch.tensor([k], device=self.deltas.device))]
        m, s, _ = self.sizes
        rows, start = [], 0
        for i in range(1, s):
            rows.append(tuple(values[start : start + i]))
            start += i
        b, c = tuple(values[m : m + s]), (0.0, *values[m + s :])
        return ButcherTableau(f"{self.tableau.name}[{k}]", self.tableau.order, tuple(rows), b, c)

    def _tables_like(self, like: Tensor) -> Tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        tables = self.__dict__["_tables"].get(key)
        if tables is None:
            t, (m, s, _) = self.tableau, self.sizes
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: training saves them for backward
                base = torch.tensor([v for row in t.a for v in row] + list(t.b) + list(t.c[1:]), dtype=like.dtype)
                projection = torch.eye(len(base), dtype=like.dtype)
                projection[m : m + s, m : m + s] -= 1.0 / s  # b's deltas less their mean: sum(b_k) stays 1
                tables = self.__dict__["_tables"][key] = (base.to(like.device), projection.to(like.device))
        return tables


def _hypernet_record(g: nn.Module) -> Dict[str, Any]:
    """g's class, module and, for a hypernet of :mod:`.hypernets` (not a subclass), its constructor arguments."""
    ours = type(g).__module__ == hypernets.__name__ and isinstance(getattr(g, "config", None), dict)
    return {
        "class": type(g).__name__,
        "module": type(g).__module__,
        "config": copy.deepcopy(g.config) if ours else None,
    }


class _SolveMesh(threading.local):
    """Each thread's current solve's step boundaries (the midpoints between the steps' start times), in
    one tensor per device and dtype that every solve overwrites: a compiled step sees the same tensor at
    every solve, and a CUDA graph's replay reads the replayed solve's mesh."""

    def __init__(self) -> None:
        self.edges: Optional[Tensor] = None
        self.buffers: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}

    def record(self, mesh: Tensor) -> None:
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, whatever the caller's mode
            mesh = -mesh if len(mesh) > 1 and mesh[1] < mesh[0] else mesh  # steps see forward time (torchdyn's)
            edges = (mesh[:-2] + mesh[1:-1]) / 2
            key = (edges.device, edges.dtype)
            buffer = self.buffers.get(key)
            if buffer is None or buffer.shape != edges.shape:
                buffer = self.buffers[key] = edges.clone()
            else:
                buffer.copy_(edges)
        self.edges = buffer

    def __deepcopy__(self, memo) -> _SolveMesh:
        return _SolveMesh()

    def __reduce__(self):
        return (_SolveMesh, ())


class NonStationarySolver(HyperSolver):
    """A solver for a budget of ``steps`` steps whose every step has its own learned Butcher coefficients.

    ``NonStationarySolver(base, steps)`` is exactly ``base`` until fitted (``fit_budget``); with a g,
    ``NonStationarySolver(base, steps, g=...)`` also adds the correction ``dt**(p+1) g(...)``, as the
    hypersolver on ``base`` would. A torchdyn solver as any other (``NeuralODE(f, solver=hs)``,
    ``hs.solve(f, z0, t_span)``) for a ``t_span`` of ``steps`` steps: after ``fit_budget``, the fitted
    one is ``hs.time_grid``. While solving torchdyn's adjoint it steps with the base tableau.

    Args:
        base: the base tableau every step starts from (``'midpoint'``, ``'heun'``, ``'rk4'``, ...).
        steps: the number of steps of every solve.
        g: an optional hypernet; ``convention``: its convention, read from g when omitted.
    """

    def __init__(
        self,
        base: BaseLike,
        steps: int,
        g: Optional[nn.Module] = None,
        convention: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        nn.Module.__init__(self)
        coefficients = NonStationaryCoefficients(base, steps, g, convention)
        self._setup(coefficients.tableau, coefficients, dtype, coefficients.hypernet_convention)

    def _setup(self, tableau: ButcherTableau, hypernet, dtype, convention: Optional[str]) -> None:
        if not isinstance(hypernet, NonStationaryCoefficients):
            raise TypeError(
                f"{type(self).__name__} needs its NonStationaryCoefficients, got {type(hypernet).__name__}: "
                "load(path, g=NonStationaryCoefficients(base, steps, g=...))"
            )
        if hypernet.tableau != tableau:
            raise ValueError(
                f"the coefficients start from base {hypernet.tableau.name!r}, not from the solver's {tableau.name!r}"
            )
        if convention is not None and convention != hypernet.hypernet_convention:
            raise ValueError(
                f"the coefficients' g is called under {hypernet.hypernet_convention!r}, not {convention!r}"
            )
        super()._setup(tableau, hypernet, dtype, hypernet.hypernet_convention)
        self.__dict__["_solve_mesh"] = _SolveMesh()

    @property
    def coefficients(self) -> NonStationaryCoefficients:
        """The learned coefficients (and g): the module saved and loaded as the hypersolver's g."""
        return self.hypernet

    @property
    def steps(self) -> int:
        """The budget: every solve has this many steps."""
        return self.hypernet.steps

    @property
    def fitted_by_trajectory(self) -> bool:
        """True once the coefficients moved from the base: residual targets are the base step's, so
        only ``fit(..., method='trajectory')`` or :func:`~.budget.fit_budget` fit such a solver."""
        return bool(self.hypernet.deltas.detach().ne(0).any())

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """As :meth:`~.solvers.HyperSolver.check_inputs`, and refuse a ``t_span`` of another step count than
        the solver's; records the solve's mesh (each step finds its index on it)."""
        t_span = check_t_span(t_span)
        if len(t_span) - 1 != self.steps:
            raise ValueError(
                f"{type(self).__name__} has coefficients for {self.steps} steps, but t_span has "
                f"{len(t_span) - 1} steps ({len(t_span)} points); solve over {self.steps + 1} points, e.g. "
                "hs.time_grid after fit_budget"
            )
        net = self.hypernet
        if net.g is not None:
            dtype = parameter_dtype(net.g)
            if dtype is not None and dtype != net.deltas.dtype:
                raise TypeError(
                    f"g has {dtype} parameters and the coefficients {net.deltas.dtype}: cast with hs.to(...)"
                )
            check_hypernet_input(net.g, self.convention, x, self.tableau.stages)
        super().check_inputs(x, t_span)
        net._tables_like(net.deltas)  # made here, not inside a (compiled) step
        self.__dict__["_solve_mesh"].record(t_span.detach().to(x.device))

    def step_index(self, t: Tensor) -> Tensor:
        """The index (a ``[1]`` long tensor, on the device) of the step of the current solve that starts at ``t``."""
        edges = self.__dict__["_solve_mesh"].edges
        if edges is None:
            raise RuntimeError(
                f"{type(self).__name__} finds each step on the solve's mesh, but none was recorded: solve with "
                "hs.solve / torchdyn's odeint, or call hs.check_inputs(z0, t_span) before step()"
            )
        return torch.searchsorted(edges.to(t.dtype), t.detach().reshape(1))

    def step_parts(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None) -> StepParts:
        """Step ``k``'s pieces: the increment of its own tableau, its stages (``k_1 = f(t, x)`` first) and
        g's correction (zero without a g)."""
        net = self.hypernet
        m, s, _ = net.sizes
        coefficients = net.coefficients(self.step_index(t))
        a, b, c = coefficients[:m], coefficients[m : m + s], coefficients[m + s :]
        rows = tuple(a[i * (i - 1) // 2 : i * (i + 1) // 2] for i in range(1, s))
        psi, stages = rk_stages(StepCoefficients(rows, b, (0.0, *c)), f, t, x, dt, k1)
        if net.g is None:
            return StepParts(psi, tuple(stages), torch.zeros_like(x))
        if self.reads_stages:
            g = self.correction(dt, t, x, stages[0], stages, _recorded_z0(self))
        else:
            g = self.correction(dt, t, x, stages[0])
        return StepParts(psi, tuple(stages), dt ** (self.order + 1) * g)

    def extra_repr(self) -> str:
        g = "none" if self.hypernet.g is None else type(self.hypernet.g).__name__
        return f"base={self.tableau.name}, steps={self.steps}, g={g}"
