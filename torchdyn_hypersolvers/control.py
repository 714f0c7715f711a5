"""Controlled systems ``dx/dt = f(t, x, u)``: the control rides in the state, held over each step.

The convention: a solver integrates ``z = [x, u]`` (the control's ``m`` channels last, states
``(B, n + m)``) under the vector field of :class:`ControlledSystem`,
``dz/dt = [f(t, x, u), 0]``. Over one solver step the control is held (a zero-order hold,
as a digital controller applies it), so

* g reads the control with the state: a :class:`~.hypernets.MLPHyperNet` built with
  ``control_dim=m`` sees ``[x, u]``, ``[f(t, x, u), 0]`` and ``dt``, and never changes ``u``;
* the hypersolver, its base solver, torchdyn's ``odeint`` / ``NeuralODE`` and an accurate
  adaptive solver all integrate the same ODE, so a reference trajectory holds exactly the
  control the hypersolver will see; ``harvest``, ``fit``, ``save`` and ``load`` work on it
  unchanged, with no side channel between f and g.

:func:`rollout` closes the loop: at each control instant ``t_k`` a controller ``u = pi(t_k, x_k)``
(or a tensor of sampled inputs) sets ``u``, then the solver integrates one control interval
(``substeps`` fixed steps, or one accurate adaptive solve). Its :meth:`Rollout.pairs` are the
``(state, control)`` pairs visited, the initial states to :func:`~.harvest.harvest` one
control interval from (``t_span = [0, dt]``): that is how a hypersolver is fitted across a
distribution of controls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor, nn

from ._checks import check_int
from ._reference import reference_solve
from .registry import resolve_solver

__all__ = ["ControlledSystem", "Rollout", "rollout"]

Controller = Union[Callable[[Tensor, Tensor], Tensor], Tensor]


class ControlledSystem(nn.Module):
    """The vector field ``dz/dt = [dynamics(t, x, u), 0]`` of a controlled system on ``z = [x, u]``.

    Args:
        dynamics: ``dynamics(t, x, u) -> dx/dt`` for states ``x`` ``(B, n)`` and controls ``u``
            ``(B, m)`` (an ``nn.Module`` is registered as a submodule).
        control_dim: ``m``, the number of control channels at the end of the state.
    """

    def __init__(self, dynamics: Callable[[Tensor, Tensor, Tensor], Tensor], control_dim: int):
        super().__init__()
        self.dynamics = dynamics
        self.control_dim = check_int(control_dim, "control_dim")

    def split(self, z: Tensor):
        """``(x, u)`` of a state ``z = [x, u]``."""
        if z.shape[-1] <= self.control_dim:
            raise ValueError(
                f"a controlled state [x, u] has more than control_dim={self.control_dim} channels; got {tuple(z.shape)}"
            )
        return z[..., : -self.control_dim], z[..., -self.control_dim :]

    def join(self, x: Tensor, u) -> Tensor:
        """The state ``[x, u]``; ``u`` (a number, ``(m,)`` or ``(..., m)``) is broadcast over ``x``'s batch."""
        if isinstance(u, Tensor) and u.shape[:-1] == x.shape[:-1] and u.shape[-1] == self.control_dim:
            return torch.cat([x, u.to(x)], dim=-1)  # the common case, one batch of controls: no broadcast
        u = torch.as_tensor(u, dtype=x.dtype, device=x.device)
        if u.dim() == 0:
            u = u.expand(self.control_dim)
        if u.shape[-1] != self.control_dim:
            raise ValueError(f"the control has {u.shape[-1]} channels, the system control_dim={self.control_dim}")
        return torch.cat([x, u.expand(*x.shape[:-1], self.control_dim)], dim=-1)

    def forward(self, t: Tensor, z: Tensor, args=None) -> Tensor:  # torchdyn passes args=
        x, u = self.split(z)
        dx = self.dynamics(t, x, u)
        return torch.cat([dx, torch.zeros_like(u)], dim=-1)

    def extra_repr(self) -> str:
        return f"control_dim={self.control_dim}"


@dataclass
class Rollout:
    """A closed-loop solve: ``t`` ``[K+1]`` control instants, ``x`` ``[K+1, B, n]`` states at them,
    ``u`` ``[K, B, m]`` the control held over each interval."""

    t: Tensor
    x: Tensor
    u: Tensor

    def pairs(self) -> Tensor:
        """The ``(state, control)`` pairs visited, as states ``[x_k, u_k]``: ``[K * B, n + m]``."""
        return torch.cat([self.x[:-1], self.u], dim=-1).reshape(-1, self.x.shape[-1] + self.u.shape[-1])


def _control_at(controller: Controller, k: int, t: Tensor, x: Tensor) -> Tensor:
    if not isinstance(controller, Tensor):
        return controller(t, x)
    if controller.dim() == 3:  # sampled inputs, one per interval
        return controller[k]
    return controller  # one input held for the whole rollout


def rollout(
    solver,
    system: ControlledSystem,
    controller: Controller,
    x0: Tensor,
    t_span,
    substeps: int = 1,
    atol: float = 1e-7,
    rtol: float = 1e-7,
) -> Rollout:
    """Solve the closed loop with a zero-order hold: ``u_k`` is held over ``[t_k, t_{k+1}]``.

    Args:
        solver: a fixed-step solver or hypersolver (this package's or torchdyn's, or a bare name
            such as ``'rk4'``), run for ``substeps`` steps per control interval; or an adaptive
            solver's name (``'dopri5'``, ``'tsit5'``, ...), run over each interval at ``atol``,
            ``rtol`` (the accurate solve: the held control restarts it at every control instant).
        system: the :class:`ControlledSystem`.
        controller: ``pi(t, x) -> u`` ``(B, m)`` (state feedback, evaluated at each control
            instant), or sampled inputs: a tensor ``[K, B, m]`` (one per interval) or ``(B, m)`` /
            ``(m,)`` (held throughout).
        x0: initial states ``(B, n)``.
        t_span: the control instants ``t_0 < ... < t_K``.

    Gradients flow through every solver (train a controller through it).
    """
    t_span = _control_instants(t_span, x0, substeps)
    _check_sampled(controller, t_span.numel() - 1, x0.shape[0], system.control_dim)
    kind, stepper = resolve_solver(solver)
    x, xs, us = x0, [x0], []
    h = (t_span[1:] - t_span[:-1]) / substeps  # every step's time and size, once (no arithmetic per step)
    step_times = (t_span[:-1, None] + torch.arange(substeps).to(t_span) * h[:, None]).unbind(0)
    check = kind != "adaptive" and hasattr(stepper, "sync_device_dtype")
    for k, (t0, t1, dt, times) in enumerate(zip(t_span[:-1].unbind(0), t_span[1:].unbind(0), h.unbind(0), step_times)):
        z = system.join(x, _control_at(controller, k, t0, x))  # a number or (m,) is broadcast over the batch
        u = system.split(z)[1]
        if kind == "adaptive":
            z = _adaptive_interval(system, z, t0, t1, stepper, atol, rtol)
        else:
            if check and k == 0:  # once: the solver's checks, on the first interval's mesh
                stepper.sync_device_dtype(z, torch.cat([times, t1[None]]))
            for t in times.unbind(0):
                z = stepper.step(system, z, t, dt)[1]
        x = system.split(z)[0]
        xs.append(x)
        us.append(u)
    controls = torch.stack(us)
    _check_finite_controls(controls, t_span)
    return Rollout(t_span, torch.stack(xs), controls)


def _control_instants(t_span, x0: Tensor, substeps: int) -> Tensor:
    """The control instants as a tensor in ``x0``'s (floating) dtype and device, checked."""
    check_int(substeps, "substeps")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        got = x0.dtype if isinstance(x0, Tensor) else type(x0).__name__
        raise TypeError(f"rollout needs floating-point initial states x0, got {got}; cast them, e.g. x0.float()")
    t_span = torch.as_tensor(t_span, dtype=x0.dtype, device=x0.device)
    if t_span.dim() != 1 or t_span.numel() < 2 or not bool((t_span[1:] > t_span[:-1]).all()):
        raise ValueError(f"t_span must be increasing control instants (at least two), got {t_span.tolist()}")
    return t_span


def _check_sampled(controller: Controller, intervals: int, batch: int, control_dim: int) -> None:
    """Refuse sampled controls ``[K, B, m]`` that do not hold one control per interval and sample."""
    if not (isinstance(controller, Tensor) and controller.dim() == 3):
        return
    if controller.shape[0] != intervals:
        raise ValueError(
            f"sampled controls of shape {tuple(controller.shape)} hold {controller.shape[0]} intervals, but t_span "
            f"has {intervals + 1} control instants ({intervals} intervals): give one control per interval"
        )
    if controller.shape[1] not in (1, batch) or controller.shape[2] != control_dim:
        raise ValueError(
            f"sampled controls of shape {tuple(controller.shape)} do not match {batch} initial states and "
            f"control_dim={control_dim}: give them the shape [{intervals}, {batch}, {control_dim}]"
        )


def _check_finite_controls(controls: Tensor, t_span: Tensor) -> None:
    """Refuse, after the loop (one host read per rollout), controls that are nan or inf."""
    bad = ~torch.isfinite(controls.detach().reshape(controls.shape[0], -1)).all(1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(
            f"the controller returned nan or inf at control instant {k} (t={float(t_span[k]):.6g}) and "
            f"{int(bad.sum()) - 1} later ones: the rollout's states are not defined from there"
        )


def _adaptive_interval(system: ControlledSystem, z: Tensor, t0: Tensor, t1: Tensor, solver: str, atol, rtol) -> Tensor:
    """One accurate solve over a control interval, refusing a non-finite control by name (an adaptive
    solver would otherwise shrink its step forever)."""
    u = system.split(z)[1]
    if not bool(torch.isfinite(u).all()):
        raise ValueError(
            f"the controller returned nan or inf at t={float(t0):.6g} for "
            f"{int((~torch.isfinite(u.reshape(-1, u.shape[-1]))).any(1).sum())} of the states; {solver} cannot "
            "solve the interval"
        )
    return reference_solve(system, z, torch.stack([t0, t1]), solver, atol, rtol)[-1]
