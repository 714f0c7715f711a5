"""A hypersolver's model card: the step sizes and state shape its g was fitted on.

g learns the base solver's residual on the meshes it was fitted on; at other step
sizes or on other states its correction is an extrapolation. ``fit`` (and ``load``)
record a :class:`Validity` on the hypersolver; every solve checks it once (in
``sync_device_dtype`` for torchdyn, in ``fixed_solve`` for the package's own solves,
never per step) and warns outside the fitted range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["TOLERANCE", "Validity", "check_solve", "describe"]

TOLERANCE = 0.05
"""Relative slack beyond the fitted step-size range before a solve warns."""


@dataclass(frozen=True)
class Validity:
    """Where a fitted hypersolver can be trusted.

    Args:
        dt_min, dt_max: the smallest and largest ``|dt|`` of the meshes g was fitted on.
        state_shape: the shape of one state (batch dimension excluded).
        description: what it was fitted on, in a sentence.
        t0, t1: the interval g was fitted on, in the direction of integration (``t0 > t1``:
            fitted backward); None when unknown (records written before they were kept).
        state_min, state_max: per feature (the state flattened), the smallest and largest value
            of the states g was fitted on; None when unknown (records written before they were kept).
        grid: the time grid (every point of the ``t_span``, in the direction of integration) that
            :func:`~.tuning.tune` chose for the hypersolver, learned or uniform; None after a plain fit.
    """

    dt_min: float
    dt_max: float
    state_shape: Tuple[int, ...]
    description: str = ""
    t0: Optional[float] = None
    t1: Optional[float] = None
    state_min: Optional[Tuple[float, ...]] = None
    state_max: Optional[Tuple[float, ...]] = None
    grid: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"Validity needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        object.__setattr__(self, "state_shape", tuple(int(n) for n in self.state_shape))
        if (self.t0 is None) != (self.t1 is None) or (self.t0 is not None and self.t0 == self.t1):
            raise ValueError(f"Validity needs both of t0 != t1 or neither, got t0={self.t0}, t1={self.t1}")
        if (self.state_min is None) != (self.state_max is None):
            raise ValueError("Validity needs both of state_min and state_max or neither")
        if self.state_min is not None:
            lo, hi = tuple(float(v) for v in self.state_min), tuple(float(v) for v in self.state_max)
            if len(lo) != len(hi) or any(not a <= b for a, b in zip(lo, hi)):
                raise ValueError(
                    f"Validity needs state_min <= state_max feature by feature, got {len(lo)} and {len(hi)} values"
                )
            object.__setattr__(self, "state_min", lo)
            object.__setattr__(self, "state_max", hi)
        if self.grid is not None:
            grid = tuple(float(v) for v in self.grid)
            steps = [b - a for a, b in zip(grid, grid[1:])]
            if len(grid) < 2 or not all(math.isfinite(v) for v in grid) or not (
                all(d > 0 for d in steps) or all(d < 0 for d in steps)
            ):
                raise ValueError(f"Validity needs a grid of at least two finite, strictly monotonic times, got {grid}")
            object.__setattr__(self, "grid", grid)

    @property
    def has_state_range(self) -> bool:
        """Whether the record knows the range of the states g was fitted on."""
        return self.state_min is not None

    def outside(self, x: Tensor, margin: float = 0.0) -> Tensor:
        """Per sample of ``x`` (``[B, ...]``), whether any feature lies outside the fitted state range
        widened by ``margin`` times its width on each side: a bool tensor ``[B]`` on ``x``'s device,
        computed without host synchronisation. All False when the record has no state range."""
        batch = x.shape[0] if x.dim() > 1 else 1
        if self.state_min is None:
            return torch.zeros(batch, dtype=torch.bool, device=x.device)
        flat = x.detach().reshape(batch, -1)
        if flat.shape[1] != len(self.state_min):
            raise ValueError(
                f"the fitted state range has {len(self.state_min)} features, the state has {flat.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )
        real = flat.real if flat.is_complex() else flat
        lo = torch.tensor(self.state_min, dtype=real.dtype, device=x.device)
        hi = torch.tensor(self.state_max, dtype=real.dtype, device=x.device)
        pad = margin * (hi - lo)
        return ((real < lo - pad) | (real > hi + pad)).any(1)

    @property
    def direction(self) -> Optional[str]:
        """``'forward'`` (increasing t), ``'backward'``, or None when the interval is unknown."""
        if self.t0 is None:
            return None
        return "forward" if self.t1 > self.t0 else "backward"

    @classmethod
    def of_steps(
        cls,
        dts: Tensor,
        state_shape: Sequence[int],
        description: str = "",
        t0: Optional[float] = None,
        t1: Optional[float] = None,
    ) -> Validity:
        """The record for step sizes ``dts`` (any sign) and states of ``state_shape``, fitted on
        the interval from ``t0`` to ``t1`` when given."""
        dts = torch.as_tensor(dts).detach().abs().double().cpu()
        return cls(float(dts.min()), float(dts.max()), tuple(state_shape), description, t0, t1)

    def with_state_range(self, states: Tensor) -> Validity:
        """This record with the per-feature range of ``states`` (``[..., N, *state_shape]``, e.g. a
        :class:`Trajectories`' ``[T, N, ...]``) as where g was fitted in state space."""
        states = torch.as_tensor(states).detach()
        if states.is_complex():
            states = states.real
        flat = states.reshape(-1, math.prod(self.state_shape))
        if flat.shape[0] == 0:
            return self
        lo, hi = flat.amin(0).double().cpu(), flat.amax(0).double().cpu()
        return dataclasses.replace(self, state_min=tuple(lo.tolist()), state_max=tuple(hi.tolist()))

    @classmethod
    def of_trajectories(cls, trajectories, report=None, how: Optional[str] = None) -> Validity:
        """The record for a fit on ``trajectories`` (a :class:`Trajectories`), described with
        ``report`` (a :class:`FitReport`) when given, or ``how`` (e.g. ``'residual fit'``)."""
        dts = []
        for n in trajectories.steps:
            t_span, _ = trajectories.mesh(n)
            dts.append((t_span[1:] - t_span[:-1]).abs())
        start, end = float(trajectories.t[0]), float(trajectories.t[-1])
        if report is not None:
            how = f"{report.method} fit ({report.iterations} iterations)"
        what = f"{how} on " if how else "fitted on "
        text = (
            f"{what}{len(trajectories)} trajectories with states of shape {trajectories.state_shape}, "
            f"meshes of {trajectories.steps} steps from t={start:g} to t={end:g}, reference {trajectories.reference} "
            f"(atol={trajectories.atol:g}, rtol={trajectories.rtol:g})"
        )
        if report is not None and report.residual_error:
            errors = ", ".join(
                f"{n} steps {report.residual_error[n]:.3g} (base {report.base_residual_error[n]:.3g})"
                for n in sorted(report.residual_error)
            )
            text += f"; mean |g - R|: {errors}"
        if report is not None and report.adversarial_worst:
            text += f"; {len(report.adversarial_worst)} adversarial rounds"
        record = cls.of_steps(torch.cat(dts), trajectories.state_shape, text, start, end)
        return record.with_state_range(trajectories.states)

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (what ``torch.load(..., weights_only=True)`` reads back)."""
        record = {
            "dt_min": float(self.dt_min),
            "dt_max": float(self.dt_max),
            "state_shape": list(self.state_shape),
            "description": str(self.description),
        }
        if self.t0 is not None:
            record.update(t0=float(self.t0), t1=float(self.t1))
        if self.state_min is not None:
            record.update(state_min=list(self.state_min), state_max=list(self.state_max))
        if self.grid is not None:
            record.update(grid=list(self.grid))
        return record

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> Validity:
        """The record :meth:`to_dict` wrote (records without ``t0``/``t1`` load with the interval
        unknown). A missing or ill-typed field is a ``ValueError`` naming it."""
        if not isinstance(record, dict):
            raise ValueError(f"the validity record must be a dict, got {type(record).__name__}")
        missing = [k for k in ("dt_min", "dt_max", "state_shape") if k not in record]
        if missing:
            raise ValueError(f"the validity record lacks the fields {missing} (it holds {sorted(record)})")
        numbers_ = {k: _real(record, k) for k in ("dt_min", "dt_max")}
        shape = record["state_shape"]
        if not isinstance(shape, (list, tuple)) or not all(_is_int(n) and n >= 0 for n in shape):
            raise ValueError(f"the validity record's state_shape must be a list of sizes, got {shape!r}")
        description = record.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"the validity record's description must be a str, got {type(description).__name__}")
        t0 = _real(record, "t0") if record.get("t0") is not None else None
        t1 = _real(record, "t1") if record.get("t1") is not None else None
        ranges = {}
        for key in ("state_min", "state_max", "grid"):
            values = record.get(key)
            if values is None:
                continue
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
            ):
                raise ValueError(f"the validity record's {key} must be a list of finite numbers")
            ranges[key] = tuple(float(v) for v in values)
        try:
            return cls(numbers_["dt_min"], numbers_["dt_max"], tuple(shape), description, t0, t1, **ranges)
        except ValueError as err:
            raise ValueError(f"the validity record is inconsistent: {err}") from err

    def range_text(self) -> str:
        interval = ""
        if self.t0 is not None:
            interval = f", {self.direction} on the interval from t={self.t0:.4g} to t={self.t1:.4g}"
        return (
            f"step sizes |dt| in [{self.dt_min:.4g}, {self.dt_max:.4g}] (+-{TOLERANCE:.0%}){interval} and states "
            f"of shape {self.state_shape} (any batch size)"
        )

    def state_range_text(self) -> str:
        """Where g was fitted in state space, in a sentence ('' when unknown)."""
        if self.state_min is None:
            return ""
        n = len(self.state_min)
        if n <= 8:
            ranges = ", ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in zip(self.state_min, self.state_max))
            return f"harvested states per feature in {ranges}"
        return (
            f"harvested states in [{min(self.state_min):.4g}, {max(self.state_max):.4g}] over {n} features "
            "(per-feature ranges recorded)"
        )

    def check(self, x: Tensor, t_span, name: str = "hypersolver") -> None:
        """Warn (``UserWarning``) when a solve of ``x`` over ``t_span`` leaves the fitted range.

        One host synchronisation when ``t_span`` lives on an accelerator; call it once per solve.
        """
        t_span = torch.as_tensor(t_span)
        if t_span.dim() != 1 or t_span.numel() < 2:
            return  # the solver itself refuses such a mesh
        dts = (t_span[1:] - t_span[:-1]).abs()
        lo, hi, start, end = torch.stack([dts.min(), dts.max(), t_span[0], t_span[-1]]).tolist()
        problems = []
        if lo < self.dt_min * (1 - TOLERANCE) or hi > self.dt_max * (1 + TOLERANCE):
            problems.append(f"with step sizes |dt| in [{lo:.4g}, {hi:.4g}]")
        if self.t0 is not None:
            direction = "forward" if end > start else "backward"
            if direction != self.direction:
                problems.append("backward in time (t decreasing)" if direction == "backward" else "forward in time")
            fitted_lo, fitted_hi = min(self.t0, self.t1), max(self.t0, self.t1)
            slack = TOLERANCE * (fitted_hi - fitted_lo)
            if min(start, end) < fitted_lo - slack or max(start, end) > fitted_hi + slack:
                text = f"over the interval from t={start + 0.0:.4g} to t={end + 0.0:.4g}"
                if fitted_lo - slack <= -max(start, end) and -min(start, end) <= fitted_hi + slack:
                    text += " (a backward solve as torchdyn runs it: -f(-t, z) on the negated t_span)"
                problems.append(text)
        shape = tuple(x.shape[1:])
        if shape != self.state_shape:
            problems.append(f"with states of shape {shape}")
        if problems:
            warnings.warn(
                f"{name} is solving {' and '.join(problems)}, outside where its g was fitted: "
                f"{self.range_text()}. Its correction is an extrapolation there; describe() says more.",
                UserWarning,
                stacklevel=3,
            )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(record: Dict[str, Any], key: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"the validity record's {key} must be a finite number, got {value!r}")
    return float(value)


def check_solve(solver, x: Tensor, t_span) -> None:
    """``solver.validity.check(...)`` when the solver carries a record; nothing otherwise."""
    validity: Optional[Validity] = getattr(solver, "validity", None)
    if validity is not None:
        validity.check(x, t_span, type(solver).__name__)


def _hypernet_text(g) -> str:
    config = getattr(g, "config", None)
    if isinstance(config, dict):
        return f"{type(g).__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())})"
    return type(g).__name__


def describe(hs) -> str:
    """What a hypersolver is, what it was fitted on, and where it is valid."""
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
        if validity.grid is not None:
            points = ", ".join(f"{v:.4g}" for v in validity.grid)
            lines.append(
                f"Tuned for a time grid of {len(validity.grid) - 1} steps: t = [{points}] "
                "(hs.time_grid; pass it as the t_span)."
            )
    return "\n".join(lines)
