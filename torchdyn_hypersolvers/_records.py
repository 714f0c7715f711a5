"""The plain-data records of the package's files, written and checked field by field.

A file holds tensors, dicts, lists, strings and numbers only (read with ``weights_only=True``).
Each record here has a writer (an object to plain data) and a reader that checks every field and
names the one that is missing or ill-typed (``ValueError``); what to build from the fields is the
caller's business, so this module depends on no class of the package but the tableau.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict

from .tableaus import ButcherTableau

__all__ = [
    "CONSISTENCY",
    "tableau_record",
    "tableau_of",
    "validity_record",
    "validity_fields",
    "trajectories_record",
    "report_record",
]

CONSISTENCY = 1e-9
"""How far ``sum(b)`` may be from 1 and a row sum of ``a`` from its node ``c``, in a loaded tableau."""


def _finite_numbers(value, what: str) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ValueError(f"{what} must be a list of finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _finite_number(record: Dict[str, Any], key: str, what: str) -> float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what}'s {key} must be a finite number, got {value!r}")
    return float(value)


def tableau_record(tableau: ButcherTableau) -> Dict[str, Any]:
    return {
        "name": tableau.name,
        "order": int(tableau.order),
        "a": [[float(v) for v in row] for row in tableau.a],
        "b": [float(v) for v in tableau.b],
        "c": [float(v) for v in tableau.c],
    }


def tableau_of(record: Dict[str, Any], where: str) -> ButcherTableau:
    """The saved tableau, checked: well-typed fields, order an int >= 1, finite coefficients, and
    the consistency conditions ``sum(b) == 1``, ``c[0] == 0`` and row sums of ``a`` equal to ``c``.
    ``where`` starts every message (``'<path> is corrupt'``)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: its tableau must be a dict, got {type(record).__name__} {record!r}")
    missing = [k for k in ("name", "order", "a", "b", "c") if k not in record]
    if missing:
        raise ValueError(f"{where}: its tableau lacks the fields {missing}")
    name, order = record["name"], record["order"]
    if not isinstance(name, str):
        raise ValueError(f"{where}: the tableau's name must be a str, got {name!r}")
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise ValueError(f"{where}: the tableau's order must be an int >= 1, got {order!r}")
    if not isinstance(record["a"], (list, tuple)):
        raise ValueError(f"{where}: the tableau's a must be a list of rows, got {record['a']!r}")
    a = tuple(_finite_numbers(row, f"{where}: the tableau's row {i + 1} of a") for i, row in enumerate(record["a"]))
    b = _finite_numbers(record["b"], f"{where}: the tableau's b")
    c = _finite_numbers(record["c"], f"{where}: the tableau's c")
    try:
        tableau = ButcherTableau(name, int(order), a, b, c)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if abs(math.fsum(b) - 1.0) > CONSISTENCY:
        raise ValueError(f"{where}: the tableau's weights b = {list(b)} sum to {math.fsum(b)!r}, not 1")
    for i, row in enumerate(a):
        if abs(math.fsum(row) - c[i + 1]) > CONSISTENCY:
            raise ValueError(
                f"{where}: row {i + 1} of the tableau's a sums to {math.fsum(row)!r}, not to its node "
                f"c[{i + 1}] = {c[i + 1]!r}"
            )
    return tableau


def validity_record(validity) -> Dict[str, Any]:
    """A :class:`~.validity.Validity` as plain types."""
    record = {
        "dt_min": float(validity.dt_min),
        "dt_max": float(validity.dt_max),
        "state_shape": list(validity.state_shape),
        "description": str(validity.description),
    }
    if validity.t0 is not None:
        record.update(t0=float(validity.t0), t1=float(validity.t1))
    if validity.state_min is not None:
        record.update(state_min=list(validity.state_min), state_max=list(validity.state_max))
    if validity.model is not None:
        record.update(model=str(validity.model))
    return record


def validity_fields(record: Dict[str, Any]) -> Dict[str, Any]:
    """The checked constructor arguments of a :class:`~.validity.Validity` from its record (records
    without ``t0``/``t1`` or the state range load with them unknown; a ``grid`` key, written by
    version 0.2, is not part of the record: :func:`~.io.load` reads it as the time grid)."""
    what = "the validity record"
    if not isinstance(record, dict):
        raise ValueError(f"{what} must be a dict, got {type(record).__name__}")
    missing = [k for k in ("dt_min", "dt_max", "state_shape") if k not in record]
    if missing:
        raise ValueError(f"{what} lacks the fields {missing} (it holds {sorted(record)})")
    shape = record["state_shape"]
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"{what}'s state_shape must be a list of sizes, got {shape!r}")
    description = record.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{what}'s description must be a str, got {type(description).__name__}")
    fields = {
        "dt_min": _finite_number(record, "dt_min", what),
        "dt_max": _finite_number(record, "dt_max", what),
        "state_shape": tuple(shape),
        "description": description,
    }
    for key in ("t0", "t1"):
        if record.get(key) is not None:
            fields[key] = _finite_number(record, key, what)
    for key in ("state_min", "state_max"):
        if record.get(key) is not None:
            fields[key] = _finite_numbers(record[key], f"{what}'s {key}")
    if record.get("model") is not None:
        if not isinstance(record["model"], str):
            raise ValueError(f"{what}'s model must be a str (a digest), got {record['model']!r}")
        fields["model"] = record["model"]
    return fields


def trajectories_record(trajectories) -> Dict[str, Any]:
    """What a file keeps of the :class:`~.harvest.Trajectories` g was fitted on (not the states)."""
    step_sizes = {}
    for n in trajectories.steps:
        t_span, _ = trajectories.mesh(n)
        dts = (t_span[1:] - t_span[:-1]).abs()
        step_sizes[int(n)] = [float(dts.min()), float(dts.max())]
    return {
        "steps": [int(n) for n in trajectories.steps],
        "t": trajectories.t.detach().cpu().clone(),
        "meshes": {int(n): idx.detach().cpu().clone() for n, idx in trajectories.meshes.items()},
        "step_sizes": step_sizes,
        "state_shape": [int(n) for n in trajectories.state_shape],
        "count": len(trajectories),
        "dtype": str(trajectories.states.dtype),
        "reference": str(trajectories.reference),
        "atol": float(trajectories.atol),
        "rtol": float(trajectories.rtol),
    }


def report_record(report) -> Dict[str, Any]:
    """What a file keeps of the :class:`~.fit.FitReport` of g's fit (its summary numbers)."""
    return {
        "method": str(report.method),
        "iterations": int(report.iterations),
        "wall_time": float(report.wall_time),
        "residual_error": {int(n): float(v) for n, v in report.residual_error.items()},
        "base_residual_error": {int(n): float(v) for n, v in report.base_residual_error.items()},
        "final_loss": float(report.loss_history[-1]) if report.loss_history else None,
        "adversarial_worst": [float(v) for v in report.adversarial_worst],
        "target_noise": {int(n): float(v) for n, v in getattr(report, "target_noise", {}).items()},
    }
