"""The states the solvers integrate, and the check every solve runs on them once."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_state", "state_prototype"]


def check_state(x) -> None:
    """Refuse, by name, a state the fixed-step solvers cannot integrate.

    Any tensor shape is accepted, as by torchdyn's solvers: ``(B, ...)`` batches, a single
    unbatched state ``(D,)`` and the flattened adjoint state torchdyn builds for
    ``sensitivity='adjoint'``. Whether a hypersolver's g can take the shape is g's business
    (:meth:`~.solvers.HyperSolver.check_inputs`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"fixed-step solvers here integrate a single tensor state, got {type(x).__name__}")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"states must be floating point, got a state of dtype {x.dtype}; cast it, e.g. x.float()")


def state_prototype(x) -> Tensor:
    """The tensor that stands for a state's device: the state itself, or a dict state's first value.

    Dict states are accepted where torchdyn's ``SolverTemplate.sync_device_dtype`` accepts them
    (for solvers whose ``step`` handles dicts, e.g. a subclass); every value must be a state."""
    if isinstance(x, dict):
        if not x:
            raise ValueError("got an empty dict state; a dict state needs at least one tensor")
        for key, value in x.items():
            try:
                check_state(value)
            except TypeError as e:
                raise TypeError(f"dict state, key {key!r}: {e}") from None
        return next(iter(x.values()))
    check_state(x)
    return x
