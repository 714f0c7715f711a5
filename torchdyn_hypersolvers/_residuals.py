"""What g is fitted to: the base step's residuals on a trajectory, and g's predictions of them.

The paper's template methods (supplement B.1), vectorised over all steps of a trajectory: one
batched call of f (and of g) per stage instead of one per step. They are functions of a
hypersolver (anything with ``tableau``, ``order``, ``reads_stages`` and ``correction``), used by
fitting and evaluation; the methods ``hs.base_residuals``, ``hs.residual_targets``,
``hs.hypersolver_residuals`` and ``hs.correction_inputs`` of earlier versions still call them, with a
``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

from torch import Tensor

from ._mesh import check_t_span, forward_time, map_steps, step_times
from .tableaus import VectorField, rk_stages

__all__ = [
    "residual_targets",
    "base_residuals",
    "predicted_residuals",
    "map_stage_corrections",
    "correction_inputs",
    "per_row",
    "ResidualMethods",
]


def per_row(values: Tensor, like: Tensor) -> Tensor:
    """A ``[N]`` tensor (one value per step, or per sample) shaped to broadcast against ``[N, ...]``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def residual_targets(
    hs, f: VectorField, traj: Tensor, t_span, with_stages: bool = False
) -> Tuple[Tensor, Union[Tensor, Tuple[Tensor, ...]]]:
    """``(base residuals, f(t_k, z[k]))`` on a trajectory ``[T, B, ...]``: what g is fitted to, and its input.

    The residuals are ``(z[k+1] - z[k] - dt psi(t_k, z[k])) / dt**(p+1)``, ``[T-1, B, ...]``. With
    ``with_stages=True`` the second item is the tuple of all the base step's stage evaluations
    ``(k_1, ..., k_s)``, each ``[T-1, B, ...]`` (what a stage-aware g reads)."""
    t, dt, z, z_next, f = _steps_of(f, traj, t_span)
    psi, stages = _base_stages(hs, f, t, dt, z)
    dt_b = per_row(dt, z)
    return (z_next - z - dt_b * psi) / dt_b ** (hs.order + 1), stages if with_stages else stages[0]


def base_residuals(hs, f: VectorField, traj: Tensor, t_span) -> Tensor:
    """The base solver's residuals on a trajectory ``[T, B, ...]``: ``[T-1, B, ...]`` (see :func:`residual_targets`)."""
    return residual_targets(hs, f, traj, t_span)[0]


def predicted_residuals(
    hs,
    f: VectorField,
    traj: Tensor,
    t_span,
    dz: Optional[Tensor] = None,
    stages: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """g's predicted residuals at every step of a trajectory, in one batched call of g.

    ``dz`` (``f`` at the trajectory's points) is recomputed when not given; so are the base
    step's ``stages`` when g reads them (then ``z0`` is the trajectory's first state)."""
    t, dt, z, _, f = _steps_of(f, traj, t_span)
    if not hs.reads_stages:
        if dz is None:
            dz = map_steps(f, t, z)
        return map_steps(hs.correction, dt, t, z, dz)
    if stages is None:
        _, stages = _base_stages(hs, f, t, dt, z)
    return map_stage_corrections(hs, dt, t, z, tuple(stages), traj[0])


def map_stage_corrections(hs, dt: Tensor, t: Tensor, z: Tensor, stages: Sequence[Tensor], z0: Tensor) -> Tensor:
    """A stage-aware g's residuals at every step ``[S, N, ...]`` in one batched call; ``stages``
    each ``[S, N, ...]``, ``z0`` the trajectories' initial states ``[N, ...]`` (the same at every step)."""

    def at_step(dt_: Tensor, t_: Tensor, z_: Tensor, *stages_: Tensor) -> Tensor:
        return hs.correction(dt_, t_, z_, stages_[0], stages_, z0)

    return map_steps(at_step, dt, t, z, *stages)


def correction_inputs(hs, f: VectorField, t: Tensor, z: Tensor, dt: Tensor, z0: Optional[Tensor] = None) -> tuple:
    """The arguments of ``hs.correction`` at one step from ``z`` (``z0`` defaults to ``z``):
    ``(dt, t, z, f(t, z))``, plus the base step's stages and ``z0`` when g reads them."""
    if not hs.reads_stages:
        return dt, t, z, f(t, z)
    _, stages = rk_stages(hs.tableau, f, t, z, dt)
    return dt, t, z, stages[0], stages, z if z0 is None else z0


def _base_stages(hs, f: Callable, t: Tensor, dt: Tensor, z: Tensor) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """The base step's increment and stages at every step, in one batched call per stage."""
    psi, stages = map_steps(lambda t_, dt_, z_: rk_stages(hs.tableau, f, t_, z_, dt_), t, dt, z)
    return psi, tuple(stages)


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


def _deprecated(method: str, function: str) -> None:
    warnings.warn(
        f"HyperSolver.{method} is deprecated and will be removed: residuals and g's inputs belong to fitting "
        f"and evaluation; call torchdyn_hypersolvers.fit.{function}(hs, ...) instead",
        DeprecationWarning,
        stacklevel=3,
    )


class ResidualMethods:
    """The residual methods of earlier versions' :class:`~.solvers.HyperSolver`, deprecated (it inherits them)."""

    def base_residuals(self, f: VectorField, traj: Tensor, t_span) -> Tensor:
        """Deprecated: :func:`base_residuals`."""
        _deprecated("base_residuals", "base_residuals")
        return base_residuals(self, f, traj, t_span)

    def residual_targets(self, f: VectorField, traj: Tensor, t_span, with_stages: bool = False):
        """Deprecated: :func:`residual_targets`."""
        _deprecated("residual_targets", "residual_targets")
        return residual_targets(self, f, traj, t_span, with_stages)

    def hypersolver_residuals(
        self, f: VectorField, traj: Tensor, t_span, dz: Optional[Tensor] = None, stages: Optional[Sequence] = None
    ) -> Tensor:
        """Deprecated: :func:`predicted_residuals`."""
        _deprecated("hypersolver_residuals", "predicted_residuals")
        return predicted_residuals(self, f, traj, t_span, dz, stages)

    def correction_inputs(self, f: VectorField, t: Tensor, z: Tensor, dt: Tensor, z0: Optional[Tensor] = None) -> tuple:
        """Deprecated: :func:`correction_inputs`."""
        _deprecated("correction_inputs", "correction_inputs")
        return correction_inputs(self, f, t, z, dt, z0)
