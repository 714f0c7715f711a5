"""Adapters for flow-matching samplers: torchdiffeq's ``odeint`` call, ``flow_matching``'s
``model(x, t, **extras)`` and class-conditional velocity fields.

* :func:`odeint` takes torchdiffeq's arguments and returns its shape, ``[len(t), *y0.shape]``, and
  solves with a (fitted) hypersolver or any fixed-step solver on the package's fast loop: code that
  samples through ``torchdiffeq.odeint`` (torchcfm's FID script, flow_matching's ``ODESolver``)
  changes its ``method=`` only. A tuned hypersolver steps on its own time grid (``hs.time_grid``).
* :class:`VelocityModel` turns flow_matching's ``model(x, t, **extras)`` into the ``f(t, x)``
  that torchdyn and this package call.
* :class:`Conditional` makes a class-conditional sampler (``model(t, x, y)``, or a guided one) a
  vector field of one state: the condition rides in the state, ``z = [x, c]``,
  ``dz/dt = [v(t, x, y), 0]`` (the mechanism of :class:`~.control.ControlledSystem`), so that one
  hypersolver, fitted across labels with a g that reads ``c``, serves every label.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import check_int
from ._loop import fixed_solve
from ._mesh import check_t_span
from ._reference import reference_solve
from .control import ControlledSystem
from .hypernets import MLPHyperNet
from .registry import resolve_solver

__all__ = ["odeint", "VelocityModel", "Conditional"]

_TORCHDIFFEQ_TOLERANCES = (1e-7, 1e-9)
"""torchdiffeq's default ``rtol``, ``atol`` (used for an adaptive solver given by name)."""


def odeint(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t,
    solver: Union[str, nn.Module, None] = None,
    *,
    method: Union[str, nn.Module, None] = None,
    options: Optional[Mapping[str, Any]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    **fast: Any,
) -> Tensor:
    """``torchdiffeq.odeint``'s call for this package's solvers: the states at the times ``t``,
    ``[len(t), *y0.shape]``.

    Args:
        func: the vector field ``func(t, y)`` (``t`` a 0-d tensor, as torchdiffeq passes it).
        y0: the initial states (one tensor). t: the output times, increasing or decreasing.
        solver: a fitted hypersolver, a fixed-step solver (a module or a name, ``'euler'``, ``'rk4'``...),
            or an adaptive solver's name (``'dopri5'``, ``'torchdyn:tsit5'``..., solved at ``rtol``,
            ``atol``: torchdiffeq's defaults 1e-7, 1e-9). ``method=`` is the same argument under
            torchdiffeq's name: give one of the two.
        options: torchdiffeq's fixed-grid option ``{'step_size': h}``: every interval of ``t`` is
            split into ``ceil(|interval| / h)`` equal steps.
        fast: the fast loop's ``compile=`` and ``cuda_graph=`` (see :meth:`~.solvers.HyperSolver.solve`).

    A fixed-step solver steps on: the steps of ``options['step_size']`` if given; else its tuned
    time grid (``hs.time_grid``, from :func:`~.tuning.tune` or a loaded file), which must hold
    every time of ``t``; else the times ``t`` themselves (torchdiffeq's fixed-grid rule).
    """
    chosen = _one_solver(solver, method)
    kind, stepper = resolve_solver(chosen)
    if not isinstance(y0, Tensor):
        raise TypeError(f"odeint integrates one tensor state y0, got {type(y0).__name__}")
    t = check_t_span(torch.as_tensor(t, dtype=y0.dtype, device=y0.device))
    unknown = sorted(set(options or {}) - {"step_size"})
    if unknown:
        raise TypeError(f"odeint: unsupported options {unknown}; a fixed-step solve takes {{'step_size': h}}")
    if kind == "adaptive":
        if options or fast:
            given = sorted({**(options or {}), **fast})
            raise TypeError(f"odeint: {chosen!r} is adaptive: it takes rtol= and atol=, not {given}")
        default_rtol, default_atol = _TORCHDIFFEQ_TOLERANCES
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
        return reference_solve(func, y0, t, stepper, atol, rtol)
    if rtol is not None or atol is not None:
        raise TypeError(
            f"odeint: {type(stepper).__name__} is a fixed-step solver: it has no rtol / atol (got rtol={rtol}, "
            f"atol={atol}); its steps are set by options={{'step_size': h}}, its tuned time grid or t"
        )
    mesh, where = _mesh(stepper, t, (options or {}).get("step_size"))
    if where is None:  # two output times: keep only the final state
        final = fixed_solve(stepper, func, y0, mesh, return_trajectory=False, **fast)
        return torch.stack([y0, final])
    return fixed_solve(stepper, func, y0, mesh, **fast)[where]


def _one_solver(solver, method):
    if solver is None and method is None:
        raise TypeError("odeint needs a solver: odeint(func, y0, t, hs) or odeint(func, y0, t, method=hs)")
    if solver is not None and method is not None:
        raise TypeError(f"odeint got both solver={solver!r} and method={method!r}: they are one argument, give one")
    return solver if solver is not None else method


def _mesh(stepper: nn.Module, t: Tensor, step_size) -> Tuple[Tensor, Optional[Tensor]]:
    """The mesh to step on and the indices of ``t`` in it (None: ``t`` is the mesh's two ends)."""
    if step_size is not None:
        if isinstance(step_size, bool) or not (isinstance(step_size, (int, float)) and step_size > 0):
            raise ValueError(f"options['step_size'] must be a positive number, got {step_size!r}")
        if not math.isfinite(step_size):
            raise ValueError(f"options['step_size'] must be finite, got {step_size!r}")
        ends = t.tolist()
        counts = [max(1, math.ceil(abs(b - a) / step_size - 1e-9)) for a, b in zip(ends[:-1], ends[1:])]
        pieces = [torch.linspace(0, 1, n + 1).to(t) * (b - a) + a for a, b, n in zip(t[:-1], t[1:], counts)]
        mesh = torch.cat([pieces[0]] + [p[1:] for p in pieces[1:]])
        where = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), device=t.device)
        return mesh, (None if t.numel() == 2 else where)
    grid = getattr(stepper, "time_grid", None)
    if grid is None:
        return t, (None if t.numel() == 2 else torch.arange(t.numel(), device=t.device))
    grid = grid.to(t)
    close = (t[:, None] - grid[None, :]).abs() <= 1e-6 * (1.0 + grid.abs().max())
    missing = ~close.any(1)
    if bool(missing.any()) or not (bool(close[0, 0]) and bool(close[-1, -1])):
        raise ValueError(
            f"{type(stepper).__name__} was tuned for the time grid {[round(v, 6) for v in grid.tolist()]}: the "
            f"times t={[round(v, 6) for v in t.tolist()]} must start and end on its ends and lie on it; pass "
            "t on the grid, or options={'step_size': h} to step uniformly"
        )
    return grid, (None if t.numel() == 2 else close.float().argmax(1))


class VelocityModel(nn.Module):
    """flow_matching's ``model(x, t, **extras)`` as the vector field ``f(t, x)`` of torchdyn and this package.

    ``VelocityModel(model, **extras)(t, x)`` calls ``model(x=x, t=t, **extras)``, as flow_matching's
    ``ODESolver`` does (``t`` a 0-d tensor); ``extras`` (labels, guidance scales...) are fixed for the
    sampler. For a condition that differs between samples and should be fitted across, see
    :class:`Conditional`.
    """

    def __init__(self, model: Callable[..., Tensor], **extras: Any):
        super().__init__()
        if not callable(model):
            raise TypeError(f"VelocityModel needs a callable model(x, t, **extras), got {type(model).__name__}")
        self.model = model
        self.extras = dict(extras)

    def forward(self, t: Tensor, x: Tensor, args: Any = None) -> Tensor:
        """``model(x=x, t=t, **extras)`` (``args``: what torchdyn's ``NeuralODE`` passes, unused)."""
        return self.model(x=x, t=t, **self.extras)

    def extra_repr(self) -> str:
        return f"extras={sorted(self.extras)}" if self.extras else ""


class Conditional(ControlledSystem):
    """A class-conditional velocity field as one vector field on ``z = [x, c]``: ``dz/dt = [v(t, x, y), 0]``.

    The condition ``c`` rides in the state's last channels and is held (as a control is, see
    :class:`~.control.ControlledSystem`): ``harvest``, ``fit``, ``tune``, ``pareto``, torchdyn's
    ``NeuralODE`` and adaptive solvers all integrate the same ODE, and a g built by
    :meth:`make_hypernet` reads ``c`` (so one hypersolver, fitted across labels, serves every label).

    Args:
        velocity: ``velocity(t, x, y) -> dx/dt`` with ``x`` of shape ``(B, *shape)``: torchcfm's
            class-conditional ``UNetModel`` as it is, ``lambda t, x, y: model(t, x, y)``, a guided
            field, or flow_matching's ``lambda t, x, y: model(x=x, t=t, label=y)``.
        num_classes: labels are integers ``y`` ``(B,)`` in ``[0, num_classes)``, riding as one-hot
            channels; ``velocity`` gets the integer labels back.
        condition_dim: instead of ``num_classes``: a real-valued condition ``(B, condition_dim)``
            (an embedding), given to ``velocity`` as it is.
        shape: the shape of one sample: ``(D,)`` for flat samples; images ``(C, H, W)`` are flattened
            into the state and reshaped for ``velocity``.
    """

    def __init__(
        self,
        velocity: Callable[[Tensor, Tensor, Tensor], Tensor],
        shape: Sequence[int],
        num_classes: Optional[int] = None,
        condition_dim: Optional[int] = None,
    ):
        if (num_classes is None) == (condition_dim is None):
            raise TypeError("Conditional needs one of num_classes= (integer labels) or condition_dim= (embeddings)")
        width = check_int(num_classes if num_classes is not None else condition_dim, "num_classes or condition_dim")
        super().__init__(velocity, width)
        self.one_hot = num_classes is not None
        if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise TypeError(f"shape must be the shape of one sample, a tuple of ints such as (2,), got {shape!r}")
        self.shape = tuple(check_int(s, "shape") for s in shape)

    def condition(self, c: Tensor):
        """What ``velocity`` gets for the condition channels ``c``: integer labels, or ``c`` itself."""
        return c.argmax(-1) if self.one_hot else c

    def forward(self, t: Tensor, z: Tensor, args: Any = None) -> Tensor:
        """``[velocity(t, x, y), 0]`` (``args``: what torchdyn's ``NeuralODE`` passes, unused)."""
        x, c = self.split(z)
        x = x.reshape(x.shape[0], *self.shape)
        dx = self.dynamics(t, x, self.condition(c)).reshape(z.shape[0], -1)
        return torch.cat([dx, torch.zeros_like(c)], dim=-1)

    def initial_state(self, x: Tensor, y: Tensor) -> Tensor:
        """The states ``z = [x, c]`` ``(B, D + m)`` for samples ``x`` ``(B, *shape)`` and conditions ``y``
        (labels ``(B,)``, or ``(B, condition_dim)``)."""
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise TypeError(f"x must be floating-point samples (B, ...), got {getattr(x, 'shape', type(x).__name__)}")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"samples of shape {tuple(x.shape[1:])}, this Conditional was built for {self.shape}")
        y = torch.as_tensor(y, device=x.device)
        if self.one_hot:
            c = self._one_hot(y, x.shape[0]).to(x.dtype)
        else:
            if tuple(y.shape) != (x.shape[0], self.control_dim):
                raise ValueError(f"conditions of shape {tuple(y.shape)}, expected ({x.shape[0]}, {self.control_dim})")
            c = y.to(x.dtype)
        return torch.cat([x.flatten(1), c], dim=1)

    def _one_hot(self, y: Tensor, batch: int) -> Tensor:
        if y.is_floating_point() or y.dtype == torch.bool or tuple(y.shape) != (batch,):
            raise ValueError(f"labels must be integers of shape ({batch},), got {y.dtype} {tuple(y.shape)}")
        if batch and not (0 <= int(y.min()) and int(y.max()) < self.control_dim):
            raise ValueError(
                f"labels must lie in [0, {self.control_dim}), got {int(y.min())}..{int(y.max())}"
            )
        return nn.functional.one_hot(y.long(), self.control_dim)

    def samples(self, z: Tensor) -> Tensor:
        """The samples of states ``z`` ``(..., B, D + m)`` (a final state or a trajectory), the
        condition channels stripped: ``(..., B, *shape)``."""
        x = self.split(z)[0]
        return x.reshape(*x.shape[:-1], *self.shape)

    def labels(self, z: Tensor) -> Tensor:
        """The conditions the states ``z`` carry (labels, or the condition itself)."""
        return self.condition(self.split(z)[1])

    def make_hypernet(self, cls: type, stage_aware: bool = False, hidden: Sequence[int] = (64, 64)) -> MLPHyperNet:
        """A fresh g for hypersolver class ``cls`` that reads the condition and never changes it (time-aware,
        standardised; every stage when ``stage_aware``). Its signature is ``tune``'s ``hypernet=``:
        ``tune(cond, cond.initial_state(x, y), t_span, hypernet=cond.make_hypernet)``."""
        stages = cls.tableau.stages if stage_aware else 1
        width = math.prod(self.shape) + self.control_dim
        return MLPHyperNet(width, hidden=hidden, time=True, stages=stages, control_dim=self.control_dim, scaled=True)

    def extra_repr(self) -> str:
        what = f"num_classes={self.control_dim}" if self.one_hot else f"condition_dim={self.control_dim}"
        return f"shape={self.shape}, {what}"
