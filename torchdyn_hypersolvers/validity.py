"""Where a hypersolver's g was fitted: step sizes, interval, direction, state shape and range.

g learns the base solver's residual on the meshes and states it was fitted on; elsewhere its
correction is an extrapolation. ``fit`` (and ``load``) put a :class:`Validity` record on the
hypersolver. Every solve checks it once, never per step, and warns with
:class:`OutsideFitWarning` outside it; :func:`outside_fit_ignored` silences the check for a
block of code. :class:`~.guard.Guarded` reads the state range per sample. The record is plain
data: ``save`` writes it, ``load`` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._model_identity import weights_digest
from ._outside_fit import TOLERANCE, OutsideFitWarning, outside_fit_ignored
from ._records import validity_fields, validity_record

__all__ = ["Validity", "OutsideFitWarning", "outside_fit_ignored", "describe"]


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
        model: a digest of the weights of the model g was fitted on; a solve with another model
            warns once per model object. None when unknown (a field without modules, older records).
    """

    dt_min: float
    dt_max: float
    state_shape: Tuple[int, ...]
    description: str = ""
    t0: Optional[float] = None
    t1: Optional[float] = None
    state_min: Optional[Tuple[float, ...]] = None
    state_max: Optional[Tuple[float, ...]] = None
    model: Optional[str] = None

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
        lo, hi = _bounds(self, real.dtype, x.device, margin)
        return ((real < lo) | (real > hi)).any(1)

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
        :class:`~.harvest.Trajectories`' ``[T, N, ...]``) as where g was fitted in state space."""
        states = torch.as_tensor(states).detach()
        if states.is_complex():
            states = states.real
        flat = states.reshape(-1, math.prod(self.state_shape))
        if flat.shape[0] == 0:
            return self
        lo, hi = flat.amin(0).double().cpu(), flat.amax(0).double().cpu()
        return dataclasses.replace(self, state_min=tuple(lo.tolist()), state_max=tuple(hi.tolist()))

    @classmethod
    def of_trajectories(cls, trajectories, how: Optional[str] = None, report=None) -> Validity:
        """The record for a fit on ``trajectories`` (a :class:`~.harvest.Trajectories`), described as ``how``
        (``'residual fit'``, or a fit report's ``describe()``).

        ``report=`` (a fit report, also accepted in ``how``'s place: the form of earlier versions) is
        described with its ``describe()``."""
        texts = [x if isinstance(x, str) else x.describe() for x in (report, how) if x is not None]
        how = texts[0] if texts else None
        dts = []
        for n in trajectories.steps:
            t_span, _ = trajectories.mesh(n)
            dts.append((t_span[1:] - t_span[:-1]).abs())
        start, end = float(trajectories.t[0]), float(trajectories.t[-1])
        what = f"{how} on " if how else "fitted on "
        text = (
            f"{what}{len(trajectories)} trajectories with states of shape {trajectories.state_shape}, "
            f"meshes of {trajectories.steps} steps from t={start:g} to t={end:g}, reference {trajectories.reference} "
            f"(atol={trajectories.atol:g}, rtol={trajectories.rtol:g})"
        )
        record = cls.of_steps(torch.cat(dts), trajectories.state_shape, text, start, end)
        model = weights_digest(trajectories.f) if trajectories.f is not None else None
        return dataclasses.replace(record.with_state_range(trajectories.states), model=model)

    def to_dict(self) -> Dict[str, Any]:
        """Deprecated: the file schema lives in :mod:`.io` (``save`` writes this record)."""
        warnings.warn("Validity.to_dict is deprecated; save() writes the record", DeprecationWarning, stacklevel=2)
        return validity_record(self)

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> Validity:
        """Deprecated: the file schema lives in :mod:`.io` (``load`` reads this record)."""
        warnings.warn("Validity.from_dict is deprecated; load() reads the record", DeprecationWarning, stacklevel=2)
        return cls(**validity_fields(record))

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


def _bounds(record: Validity, dtype: torch.dtype, device: torch.device, margin: float) -> Tuple[Tensor, Tensor]:
    """The widened state range as tensors, made once per (dtype, device, margin) and kept on the record
    (not a field: eq, repr and replace ignore it)."""
    cache = record.__dict__.get("_bounds_cache")
    if cache is None:
        cache = {}
        object.__setattr__(record, "_bounds_cache", cache)
    key = (dtype, device, float(margin))
    if key not in cache:
        with torch.inference_mode(False), torch.no_grad():
            lo = torch.tensor(record.state_min, dtype=dtype, device=device)
            hi = torch.tensor(record.state_max, dtype=dtype, device=device)
            pad = margin * (hi - lo)
            cache[key] = (lo - pad, hi + pad)
    return cache[key]


def describe(hs) -> str:
    """Deprecated: ``hs.describe()`` (the text is :func:`~.solvers.describe`'s)."""
    warnings.warn(
        "torchdyn_hypersolvers.validity.describe is deprecated; call hs.describe() "
        "(or torchdyn_hypersolvers.solvers.describe(hs))",
        DeprecationWarning,
        stacklevel=2,
    )
    return hs.describe()
