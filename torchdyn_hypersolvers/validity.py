"""A hypersolver's model card: the step sizes and state shape its g was fitted on.

g learns the base solver's residual on the meshes it was fitted on; at other step
sizes or on other states its correction is an extrapolation. ``fit`` (and ``load``)
record a :class:`Validity` on the hypersolver; every solve checks it once (in
``sync_device_dtype`` for torchdyn, in ``fixed_solve`` for the package's own solves,
never per step) and warns outside the fitted range.
"""

from __future__ import annotations

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
    """

    dt_min: float
    dt_max: float
    state_shape: Tuple[int, ...]
    description: str = ""
    t0: Optional[float] = None
    t1: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"Validity needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        object.__setattr__(self, "state_shape", tuple(int(n) for n in self.state_shape))
        if (self.t0 is None) != (self.t1 is None) or (self.t0 is not None and self.t0 == self.t1):
            raise ValueError(f"Validity needs both of t0 != t1 or neither, got t0={self.t0}, t1={self.t1}")

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
        return cls.of_steps(torch.cat(dts), trajectories.state_shape, text, start, end)

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
        try:
            return cls(numbers_["dt_min"], numbers_["dt_max"], tuple(shape), description, t0, t1)
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
    return "\n".join(lines)
