"""Argument checks shared by the public functions: each refusal names the argument and its value."""

from __future__ import annotations

import math
import numbers
from typing import List, Tuple

import torch

__all__ = ["check_int", "check_positive_real", "nonfinite_rows"]


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool) of at least ``minimum``; else a
    ``ValueError`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_positive_real(value, name: str) -> float:
    """``value`` as a float if it is a finite real number above zero (not a bool); else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def nonfinite_rows(z) -> Tuple[List[int], str]:
    """The rows of ``z`` (``[N, ...]``) holding nan or inf, and the first ten as text (``'[3, 5]'``);
    ``([], '')`` for an integer tensor."""
    if not (z.is_floating_point() or z.is_complex()):
        return [], ""
    bad = (~torch.isfinite(z.reshape(len(z), -1))).any(dim=1).nonzero().flatten().tolist()
    return bad, f"{bad[:10]}"[:-1] + (", ...]" if len(bad) > 10 else "]")
