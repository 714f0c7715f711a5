"""Multi-stage hypersolvers (Berto, Massaroli, Poli, Park, ICLR 2022).

Besides the outer correction ``dt**(p+1) g`` after the step, an inner network h corrects
every stage evaluation of the base step::

    k_i    = f(t_i, z_i) + h(dt, t_i, z_i, f(t_i, z_i))
    z_next = z + dt * sum_i b_i k_i + dt**(p+1) g(dt, t, z, f(t, z))

Still ``tableau.stages`` evaluations of f per step. The stages are the base tableau's own
(:func:`~.tableaus.rk_stages` on a wrapped f). g is the hypersolver's ``correction``, so
residual targets and ``FitReport`` read it as for any hypersolver; the inner net changes
the stages, so its residuals do not separate: fit with ``fit(hs, trajectories, method='trajectory')``.
Save and load as any hypersolver with a user g: ``load(path, g=MultiStageHyperNet(...))``.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from ._precision import parameter_dtype
from .hypernets import STAGE_CONVENTIONS, call_hypernet, check_hypernet_input, detect_convention
from .solvers import HyperSolver, StepParts
from .tableaus import VectorField, rk_stages

__all__ = ["MultiStageHyperNet", "MultiStageHyperSolver"]


def _convention(net: Callable, role: str) -> str:
    convention = detect_convention(net)
    if convention in STAGE_CONVENTIONS:
        raise ValueError(f"the {role} net of a multi-stage hypersolver reads one stage; got convention {convention!r}")
    return convention


def _check_dtypes(outer: Callable, inner: Optional[Callable]) -> None:
    """Refuse outer and inner nets whose parameters differ in dtype (a step runs in one dtype)."""
    outer_dtype, inner_dtype = parameter_dtype(outer), parameter_dtype(inner)
    if outer_dtype is None or inner_dtype is None or outer_dtype == inner_dtype:
        return
    raise TypeError(
        f"the outer net ({type(outer).__name__}) of a multi-stage hypersolver has {outer_dtype} parameters "
        f"and its inner net ({type(inner).__name__}) {inner_dtype}; both step the same state: cast one to the "
        f"other's dtype, e.g. inner.to({outer_dtype}) (or the whole MultiStageHyperNet: net.to(dtype))"
    )


class MultiStageHyperNet(nn.Module):
    """The two networks of a multi-stage hypersolver, as one module (one ``state_dict``).

    Args:
        outer: g, the ``dt**(p+1)`` correction after the step (e.g. an :class:`~.hypernets.MLPHyperNet`).
        inner: h, added to each stage evaluation of f; None for none (then the hypersolver is
            a plain one). Both in the ``'dt_t_z_dz'``, ``'tx'`` or ``'concat'`` convention, and with
            parameters of one dtype (refused otherwise: cast one with ``.to(dtype)``).

    Calling it is calling ``outer`` as ``(dt, t, z, dz)``: it is the hypersolver's g.
    """

    def __init__(self, outer: nn.Module, inner: Optional[nn.Module] = None):
        super().__init__()
        self.outer_convention = _convention(outer, "outer")
        self.inner_convention = _convention(inner, "inner") if inner is not None else None
        _check_dtypes(outer, inner)
        self.outer = outer
        self.inner = inner

    def forward(self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor) -> Tensor:
        return call_hypernet(self.outer, self.outer_convention, dt, t, z, dz)

    def stage_correction(self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor) -> Tensor:
        """h's correction of one stage evaluation ``dz = f(t, z)`` (zero without an inner net)."""
        if self.inner is None:
            return torch.zeros_like(dz)
        out = call_hypernet(self.inner, self.inner_convention, dt, t, z, dz)
        if not isinstance(out, Tensor) or out.shape != dz.shape or out.dtype != dz.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
            want = f"{tuple(dz.shape)} {dz.dtype}"
            raise ValueError(f"the inner net returned {got} for a stage of {want}; they must match")
        return out


class MultiStageHyperSolver(HyperSolver):
    """A hypersolver whose stages are corrected too: ``MultiStageHyperSolver(base, MultiStageHyperNet(g, h))``.

    ``base`` is any explicit base solver (a name, a tableau, a solver). With zero-initialised
    g and h (the package's templates start so) it is exactly its base solver. While solving
    torchdyn's adjoint it steps with the base tableau, as every hypersolver. It overrides
    :meth:`step_parts` only, so it can be guarded (:class:`~.guard.Guarded` checks and drops the outer g).
    """

    def __init__(self, *args: Any, dtype: Optional[torch.dtype] = None, convention: Optional[str] = None):
        super().__init__(*args, dtype=dtype, convention=convention)
        if not isinstance(self.hypernet, MultiStageHyperNet):
            raise TypeError(
                f"{type(self).__name__} needs a MultiStageHyperNet(outer, inner), got {type(self.hypernet).__name__}"
            )
        if self.convention != "dt_t_z_dz":
            raise ValueError(f"a MultiStageHyperNet is called as (dt, t, z, dz), not {self.convention!r}")
        _check_dtypes(self.hypernet.outer, self.hypernet.inner)

    @property
    def fitted_by_trajectory(self) -> bool:
        """True with an inner net: residual fitting would fit the outer net only."""
        return self.hypernet.inner is not None

    @property
    def corrects_stages(self) -> bool:
        """True with an inner net: the step's stages are not the base tableau's, so
        :class:`~.guard.Guarded` cannot fall back to the base step without evaluating f again."""
        return self.hypernet.inner is not None

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """As :meth:`~.solvers.HyperSolver.check_inputs`, for both nets (of one dtype)."""
        net = self.hypernet
        _check_dtypes(net.outer, net.inner)
        super().check_inputs(x, t_span)
        check_hypernet_input(net.outer, net.outer_convention, x)
        if net.inner is not None:
            check_hypernet_input(net.inner, net.inner_convention, x)

    def step_parts(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None) -> StepParts:
        """The step's pieces with corrected stages: ``increment`` is the weighted sum of the corrected
        stages ``f(t_i, z_i) + h(...)``, ``stages`` the evaluations of f (uncorrected, ``k_1 = f(t, x)``
        first), ``correction`` the outer term ``dt**(p+1) g(dt, t, x, f(t, x))``."""
        net = self.hypernet
        if net.inner is None:
            return super().step_parts(f, x, t, dt, k1)
        raw: List[Tensor] = [] if k1 is None else [k1]

        def corrected(ti: Tensor, zi: Tensor) -> Tensor:
            dz = f(ti, zi)
            raw.append(dz)
            return dz + net.stage_correction(dt, ti, zi, dz)

        first = corrected(t, x) if k1 is None else k1 + net.stage_correction(dt, t, x, k1)
        psi, _ = rk_stages(self.tableau, corrected, t, x, dt, first)
        return StepParts(psi, tuple(raw), dt ** (self.order + 1) * self.correction(dt, t, x, raw[0]))
