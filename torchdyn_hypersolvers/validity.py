"""A hypersolver's model card: the step sizes and state shape its g was fitted on.

g learns the base solver's residual on the meshes it was fitted on; at other step
sizes or on other states its correction is an extrapolation. ``fit`` (and ``load``)
record a :class:`Validity` on the hypersolver; every solve checks it once (in
``sync_device_dtype`` for torchdyn, in ``fixed_solve`` for the package's own solves,
never per step) and warns outside the fitted range.
"""

from __future__ import annotations

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
    """

    dt_min: float
    dt_max: float
    state_shape: Tuple[int, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"Validity needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        object.__setattr__(self, "state_shape", tuple(int(n) for n in self.state_shape))

    @classmethod
    def of_steps(cls, dts: Tensor, state_shape: Sequence[int], description: str = "") -> Validity:
        """The record for step sizes ``dts`` (any sign) and states of ``state_shape``."""
        dts = torch.as_tensor(dts).detach().abs().double().cpu()
        return cls(float(dts.min()), float(dts.max()), tuple(state_shape), description)

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
        return cls.of_steps(torch.cat(dts), trajectories.state_shape, text)

    def to_dict(self) -> Dict[str, Any]:
        """Plain types only (what ``torch.load(..., weights_only=True)`` reads back)."""
        return {
            "dt_min": float(self.dt_min),
            "dt_max": float(self.dt_max),
            "state_shape": list(self.state_shape),
            "description": str(self.description),
        }

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> Validity:
        return cls(record["dt_min"], record["dt_max"], tuple(record["state_shape"]), record.get("description", ""))

    def range_text(self) -> str:
        return (
            f"step sizes |dt| in [{self.dt_min:.4g}, {self.dt_max:.4g}] (+-{TOLERANCE:.0%}) and states of "
            f"shape {self.state_shape} (any batch size)"
        )

    def check(self, x: Tensor, t_span, name: str = "hypersolver") -> None:
        """Warn (``UserWarning``) when a solve of ``x`` over ``t_span`` leaves the fitted range.

        One host synchronisation when ``t_span`` lives on an accelerator; call it once per solve.
        """
        t_span = torch.as_tensor(t_span)
        if t_span.dim() != 1 or t_span.numel() < 2:
            return  # the solver itself refuses such a mesh
        dts = (t_span[1:] - t_span[:-1]).abs()
        lo, hi = torch.stack([dts.min(), dts.max()]).tolist()
        problems = []
        if lo < self.dt_min * (1 - TOLERANCE) or hi > self.dt_max * (1 + TOLERANCE):
            problems.append(f"step sizes |dt| in [{lo:.4g}, {hi:.4g}]")
        shape = tuple(x.shape[1:])
        if shape != self.state_shape:
            problems.append(f"states of shape {shape}")
        if problems:
            warnings.warn(
                f"{name} is solving with {' and '.join(problems)}, outside where its g was fitted: "
                f"{self.range_text()}. Its correction is an extrapolation there; describe() says more.",
                UserWarning,
                stacklevel=3,
            )


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
