"""Fitting a hypersolver's g: residual fitting, trajectory fitting, adversarial search.

Residual fitting (the paper's main method) regresses g's predicted residuals on the base
solver's residuals along reference trajectories. Because f is frozen, its evaluations
and the targets are computed once, before the first iteration; an iteration is then
one batched call of g over every step of a batch of trajectories (``torch.func.vmap``
over time), never a Python loop over steps.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .harvest import Trajectories
from .mesh import map_steps, step_times
from .models import module_device, preserved
from .reference import reference_solve
from .solvers import HyperSolver
from .validity import Validity

__all__ = [
    "Adversarial",
    "FitDivergedError",
    "FitReport",
    "ResidualData",
    "fit",
    "residual_data",
    "residual_loss",
    "trajectory_loss",
]

METHODS = ("residual", "trajectory")


class FitDivergedError(FloatingPointError):
    """The fitting loss or its gradient stopped being finite; g keeps its last finite weights."""


@dataclass
class ResidualData:
    """Everything residual fitting needs, per step (all meshes concatenated along steps).

    ``t``, ``dt``: ``[S]`` in the forward-time frame; ``z``, ``dz = f(t, z)`` and ``target``
    (the base solver's residuals): ``[S, N, ...]``; ``steps``: ``[S]``, the step count
    of the mesh each step belongs to.
    """

    t: Tensor
    dt: Tensor
    z: Tensor
    dz: Tensor
    target: Tensor
    steps: Tensor

    def __len__(self) -> int:
        return self.z.shape[1]

    def extend(self, other: ResidualData) -> ResidualData:
        """The same steps with ``other``'s trajectories appended."""
        return ResidualData(
            self.t,
            self.dt,
            torch.cat([self.z, other.z], 1),
            torch.cat([self.dz, other.dz], 1),
            torch.cat([self.target, other.target], 1),
            self.steps,
        )


def residual_data(hs: HyperSolver, trajectories: Trajectories, f: Optional[Callable] = None) -> ResidualData:
    """Targets and g-inputs on every mesh of ``trajectories`` (no gradient)."""
    f = f if f is not None else trajectories.f
    parts = []
    with torch.no_grad():
        for n in trajectories.steps:
            t_span, states = trajectories.mesh(n)
            target, dz = hs.residual_targets(f, states, t_span)
            t, dt = step_times(t_span)
            parts.append((t, dt, states[:-1], dz, target, torch.full_like(t, n, dtype=torch.long)))
    return ResidualData(*(torch.cat(items, 0) for items in zip(*parts)))


def residual_loss(hs: HyperSolver, data: ResidualData, index: Optional[Tensor] = None) -> Tensor:
    """Mean squared error between g's residuals and the base solver's, in one call of g."""
    z, dz, target = (
        (data.z, data.dz, data.target)
        if index is None
        else (data.z[:, index], data.dz[:, index], data.target[:, index])
    )
    predicted = map_steps(hs.correction, data.dt, data.t, z, dz)
    return (predicted - target).square().mean()


def trajectory_loss(hs: HyperSolver, trajectories: Trajectories, f: Optional[Callable] = None) -> Tensor:
    """Mean squared error of the unrolled hypersolver against the reference, over every
    mesh point of every mesh (supplement C.1)."""
    f = f if f is not None else trajectories.f
    total = 0.0
    for n in trajectories.steps:
        t_span, reference = trajectories.mesh(n)
        solution = hs.solve(f, reference[0], t_span)
        total = total + (solution[1:] - reference[1:]).square().mean()
    return total / len(trajectories.steps)


@dataclass
class Adversarial:
    """A bounded search for initial states (and optionally vector-field parameters) where
    the hypersolver fails most, added to the fitting data (supplement B.2).

    In each of ``rounds`` rounds, spread evenly over the fit, ``candidates`` initial states
    are drawn around the harvested ones (Gaussian noise of ``scale`` times the per-entry
    standard deviation of the harvested z(0)); with ``param_noise > 0`` f's parameters
    are also perturbed by that relative amount (on a copy; the model is never touched).
    All candidates are solved with the reference solver and the hypersolver in one
    batched call each, and the ``keep`` with the largest terminal error join the data.
    The budget is ``rounds * candidates`` reference solves.
    """

    rounds: int = 4
    candidates: int = 256
    keep: int = 32
    scale: float = 1.0
    param_noise: float = 0.0

    def __post_init__(self):
        if self.rounds < 1 or self.candidates < 1 or not 1 <= self.keep <= self.candidates:
            raise ValueError(f"Adversarial needs rounds, candidates >= 1 and 1 <= keep <= candidates, got {self}")


@dataclass
class FitReport:
    """What a fit did and how well g matches the residuals it was fitted to."""

    method: str
    iterations: int
    wall_time: float
    loss_history: List[float]
    residual_error: Dict[int, float]
    """Mean ``|g - R|`` per mesh (step count), on the fitting data."""
    base_residual_error: Dict[int, float]
    """Mean ``|R|`` per mesh: the same error with g = 0, i.e. the base solver alone."""
    adversarial_worst: List[float] = field(default_factory=list)
    """Largest terminal error found in each adversarial round."""

    def summary(self) -> str:
        meshes = ", ".join(
            f"{n} steps: {self.residual_error[n]:.3g} (base {self.base_residual_error[n]:.3g})"
            for n in sorted(self.residual_error)
        )
        return (
            f"{self.method} fit, {self.iterations} iterations in {self.wall_time:.1f} s, "
            f"final loss {self.loss_history[-1]:.3g}; mean |g - R| per mesh: {meshes}"
        )


def _check_compatible(hs: HyperSolver, data: ResidualData) -> None:
    probe = (data.dt[0], data.t[0], data.z[0, :2], data.dz[0, :2])
    try:
        with torch.no_grad():
            hs.correction(*probe)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"the trajectories hold states of shape {tuple(data.z.shape[2:])} (batches {tuple(data.z.shape[1:])}), "
            f"which the hypersolver's g ({type(hs.g).__name__}) does not accept: {err}"
        ) from err


def _perturbed(f: nn.Module, noise: float, generator: Optional[torch.Generator]) -> Callable:
    params = {
        name: p * (1 + noise * torch.randn(p.shape, generator=generator).to(p)) for name, p in f.named_parameters()
    }
    return lambda t, z: torch.func.functional_call(f, params, (t, z))


def _adversarial_round(hs, trajectories: Trajectories, f, spec: Adversarial, generator):
    """The ``spec.keep`` worst candidates as trajectories, their f, and the worst error."""
    z0 = trajectories.states[0]
    pick = torch.randint(z0.shape[0], (spec.candidates,), generator=generator).to(z0.device)
    noise = torch.randn((spec.candidates, *z0.shape[1:]), generator=generator).to(z0)
    candidates = z0[pick] + spec.scale * z0.std(0, keepdim=True) * noise
    fc = _perturbed(f, spec.param_noise, generator) if spec.param_noise > 0 else f
    with torch.no_grad():
        states = reference_solve(
            fc, candidates, trajectories.t, trajectories.reference, trajectories.atol, trajectories.rtol
        )
        pool = Trajectories(
            trajectories.t,
            states,
            trajectories.meshes,
            fc,
            trajectories.reference,
            trajectories.atol,
            trajectories.rtol,
        )
        error = torch.zeros(spec.candidates, device=z0.device, dtype=z0.dtype)
        for n in pool.steps:
            t_span, ref = pool.mesh(n)
            final = hs.solve(fc, ref[0], t_span, return_trajectory=False)
            error = torch.maximum(error, (final - ref[-1]).flatten(1).norm(dim=1).nan_to_num(nan=float("inf")))
        # a diverging hypersolver is the worst case; a candidate whose reference diverged is unusable
        error[~torch.isfinite(states.flatten(2)).all(2).all(0)] = -float("inf")
        worst = error.topk(spec.keep).indices
    return pool.select(worst), fc, float(error[worst[0]])


def fit(
    hs: HyperSolver,
    trajectories: Trajectories,
    method: str = "residual",
    iterations: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-2,
    lr_min: float = 5e-4,
    weight_decay: float = 1e-6,
    warmup: int = 10,
    swap_every: int = 10,
    clip: float = 1.0,
    adversarial: Optional[Adversarial] = None,
    device=None,
    progress: bool = True,
    seed: Optional[int] = None,
) -> FitReport:
    """Fit the hypersolver's g on harvested trajectories; only g's parameters change.

    The schedule is the paper's: ``warmup`` iterations on one batch of ``batch_size``
    trajectories, then a new batch every ``swap_every`` iterations; AdamW with cosine
    annealing from ``lr`` to ``lr_min``; gradient-norm clipping at ``clip``.

    Args:
        method: ``'residual'`` (targets precomputed, one call of g per iteration) or
            ``'trajectory'`` (unroll the hypersolver over each mesh and match the reference).
        adversarial: an :class:`Adversarial` search, or None.
        device: where to fit (g is moved there; the vector field is copied if it lives elsewhere).
        progress: show a tqdm progress bar with the loss.
        seed: makes batch sampling and the adversarial search reproducible.

    At the end, ``hs.validity`` records the step sizes and state shape of the meshes fitted on.

    Raises:
        FitDivergedError: the loss or gradient became non-finite; g keeps its last finite weights.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fitting method {method!r}; expected one of {METHODS}")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be positive, got {iterations}, {batch_size}")
    if trajectories.f is None:
        raise ValueError("the trajectories carry no vector field; load them with Trajectories.load(path, f=...)")
    if adversarial is not None and adversarial.param_noise > 0 and method != "residual":
        raise ValueError("adversarial perturbation of f's parameters needs method='residual'")
    device = torch.device(device) if device is not None else trajectories.states.device
    hs.to(device)
    trajectories = trajectories.to(device)
    f = trajectories.f
    if isinstance(f, nn.Module) and module_device(f, device) != device:
        f = copy.deepcopy(f).to(device)  # the user's model stays where it is
    module = f if isinstance(f, nn.Module) else None
    params = [p for p in hs.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"the hypersolver's g ({type(hs.g).__name__}) has no trainable parameters")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    g_modes = [(m, m.training) for m in hs.modules()]
    start = time.perf_counter()
    history: List[float] = []
    worst: List[float] = []
    with preserved(module):
        data = residual_data(hs, trajectories, f)
        _check_compatible(hs, data)
        rounds = set()
        if adversarial is not None:
            rounds = {iterations * (k + 1) // (adversarial.rounds + 1) for k in range(adversarial.rounds)}
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations, eta_min=lr_min)
        hs.train()
        bar = _progress(iterations, progress)
        index = None
        validity, hs.validity = hs.validity, None  # no validity warnings while g changes
        try:
            for i in range(iterations):
                if i in rounds:
                    found, fc, err = _adversarial_round(hs, trajectories, f, adversarial, generator)
                    worst.append(err)
                    data = data.extend(residual_data(hs, found, fc))
                    if method == "trajectory":
                        trajectories = Trajectories(
                            trajectories.t,
                            torch.cat([trajectories.states, found.states], 1),
                            trajectories.meshes,
                            f,
                            trajectories.reference,
                            trajectories.atol,
                            trajectories.rtol,
                        )
                if index is None or (i >= warmup and (i - warmup) % swap_every == 0):
                    index = torch.randperm(len(data), generator=generator)[:batch_size].to(device)
                if method == "residual":
                    loss = residual_loss(hs, data, index)
                else:
                    loss = trajectory_loss(hs, trajectories.select(index), f)
                value = loss.item()  # one host sync per iteration, for the check and the history
                if not math.isfinite(value):
                    raise FitDivergedError(
                        f"the {method} loss became {value} at iteration {i}; g keeps its weights from before it"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                try:
                    torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=True)
                except RuntimeError as err:
                    raise FitDivergedError(
                        f"the gradient became non-finite at iteration {i}; g keeps its weights from before it"
                    ) from err
                optimizer.step()
                schedule.step()
                history.append(value)
                if bar is not None and (i % 10 == 0 or i == iterations - 1):
                    bar.set_postfix(loss=f"{value:.3g}", refresh=False)
                    bar.update(i + 1 - bar.n)
        finally:
            if bar is not None:
                bar.close()
            for m, flag in g_modes:
                m.train(flag)
            hs.validity = validity
        residual_error, base_error = _residual_errors(hs, data)
    report = FitReport(method, iterations, time.perf_counter() - start, history, residual_error, base_error, worst)
    hs.validity = Validity.of_trajectories(trajectories, report)
    return report


def _residual_errors(hs: HyperSolver, data: ResidualData, max_elements: int = 2**22):
    """Mean |g - R| and mean |R| per mesh, over all the fitting data, a chunk of
    trajectories at a time (all steps of a chunk hold at most ``max_elements`` numbers)."""
    chunk = max(1, max_elements // max(1, data.z[:, :1].numel()))
    sums, base = torch.zeros(data.t.shape[0]), torch.zeros(data.t.shape[0])
    with torch.no_grad():
        for start in range(0, len(data), chunk):
            index = torch.arange(start, min(start + chunk, len(data)), device=data.z.device)
            predicted = map_steps(hs.correction, data.dt, data.t, data.z[:, index], data.dz[:, index])
            target = data.target[:, index]
            sums += (predicted - target).abs().flatten(1).sum(1).cpu()
            base += target.abs().flatten(1).sum(1).cpu()
    per_step = data.z[0].numel()
    steps = data.steps.cpu()
    return (
        {int(n): float(sums[steps == n].sum() / (per_step * (steps == n).sum())) for n in steps.unique()},
        {int(n): float(base[steps == n].sum() / (per_step * (steps == n).sum())) for n in steps.unique()},
    )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc="fitting g", leave=False)
