"""Fitting a hypersolver's g: residual fitting, trajectory fitting, adversarial search.

Residual fitting (the paper's main method) regresses g's predicted residuals on the base
solver's residuals along reference trajectories. Because f is frozen, its evaluations
and the targets are computed once, before the first iteration; an iteration is then
one batched call of g over every step of a batch of trajectories (``torch.func.vmap``
over time), never a Python loop over steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._checks import check_int
from ._mesh import map_steps, step_times
from ._optimisation import (
    FitDivergedError,
    LastFinite,
    Recipe,
    clip_gradients,
    diverged,
    fitting,
    optimizer_and_schedule,
    resolve_recipe,
)
from ._precision import cast_floating, in_float64, parameter_dtype
from ._progress import progress_bar
from ._reference import reference_solve
from ._residuals import base_residuals, correction_inputs, map_stage_corrections, predicted_residuals, residual_targets
from ._solver_names import resolve_adaptive
from ._user_model import module_device, owned_modules, preserved
from .harvest import Trajectories
from .solvers import HyperSolver
from .validity import Validity

__all__ = [
    "Adversarial",
    "FitDivergedError",
    "FitReport",
    "Recipe",
    "ResidualData",
    "base_residuals",
    "correction_inputs",
    "fit",
    "mesh_balance",
    "predicted_residuals",
    "residual_data",
    "residual_loss",
    "residual_targets",
    "trajectory_loss",
]

METHODS = ("residual", "trajectory")

NOISE_LIMIT = 0.1
"""Estimated reference noise, as a fraction of the residual targets, above which ``fit`` warns."""


@dataclass
class ResidualData:
    """Everything residual fitting needs, per step (all meshes concatenated along steps).

    ``t``, ``dt``: ``[S]`` in the forward-time frame; ``z``, ``dz = f(t, z)`` and ``target``
    (the base solver's residuals): ``[S, N, ...]``; ``mesh_steps``: ``[S]``, the step count
    of the mesh each step belongs to (``.steps`` in earlier versions). Only for a stage-aware g (the ``'stages'`` and
    ``'concat_stages'`` conventions): ``stages``, every stage of the base step ``(k_1, ..., k_s)``,
    each ``[S, N, ...]`` (``k_1`` is ``dz``), and ``z0``, each trajectory's first state ``[N, ...]``.
    """

    t: Tensor
    dt: Tensor
    z: Tensor
    dz: Tensor
    target: Tensor
    mesh_steps: Tensor
    stages: Optional[Tuple[Tensor, ...]] = None
    z0: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.z.shape[1]

    @property
    def steps(self) -> Tensor:
        """Deprecated: ``mesh_steps`` (not :attr:`~.harvest.Trajectories.steps`, the meshes' sorted step counts)."""
        warnings.warn("ResidualData.steps is now ResidualData.mesh_steps", DeprecationWarning, stacklevel=2)
        return self.mesh_steps

    def replace(self, **changes) -> ResidualData:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def select(self, index: Optional[Tensor]) -> ResidualData:
        """The steps of a subset of the trajectories (all of them for ``None``)."""
        if index is None:
            return self
        stages = None if self.stages is None else tuple(k[:, index] for k in self.stages)
        return self.replace(
            z=self.z[:, index],
            dz=self.dz[:, index],
            target=self.target[:, index],
            stages=stages,
            z0=None if self.z0 is None else self.z0[index],
        )

    def to(self, device) -> ResidualData:
        """The same data on ``device``."""
        stages = None if self.stages is None else tuple(k.to(device) for k in self.stages)
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stages"}
        return ResidualData(**{k: v if v is None else v.to(device) for k, v in moved.items()}, stages=stages)

    def extend(self, other: ResidualData) -> ResidualData:
        """The same steps with ``other``'s trajectories appended."""
        stages = None
        if self.stages is not None:
            stages = tuple(torch.cat([a, b], 1) for a, b in zip(self.stages, other.stages))
        return self.replace(
            z=torch.cat([self.z, other.z], 1),
            dz=torch.cat([self.dz, other.dz], 1),
            target=torch.cat([self.target, other.target], 1),
            stages=stages,
            z0=None if self.z0 is None else torch.cat([self.z0, other.z0], 0),
        )


def residual_data(hs: HyperSolver, trajectories: Trajectories, f: Optional[Callable] = None) -> ResidualData:
    """Targets and g-inputs on every mesh of ``trajectories`` (no gradient); all stages of
    the base step and the trajectories' first states only when g reads them.

    Float64 trajectories (``harvest(..., base=...)``) give float64 targets and f values (f in
    float64: a copy of a module), cast to g's dtype at the end."""
    f = f if f is not None else trajectories.f
    if trajectories.states.dtype == torch.float64:
        f = in_float64(f)  # the residual arithmetic in float64; the user's module is not touched
    parts, stage_parts = [], []
    with torch.no_grad():
        for n in trajectories.steps:
            t_span, states = trajectories.mesh(n)
            target, stages = residual_targets(hs, f, states, t_span, with_stages=True)
            t, dt = step_times(t_span)
            parts.append((t, dt, states[:-1], stages[0], target, torch.full_like(t, n, dtype=torch.long)))
            if hs.reads_stages:  # memory: stages x states, kept only for a g that reads them
                stage_parts.append(stages)
    data = ResidualData(*(torch.cat(items, 0) for items in zip(*parts)))
    if hs.reads_stages:
        stages = tuple(torch.cat(items, 0) for items in zip(*stage_parts))
        data = data.replace(dz=stages[0], stages=stages, z0=trajectories.states[0])
    return cast_floating(data, parameter_dtype(hs))  # float64 targets cast back for fitting


def _predicted(hs: HyperSolver, data: ResidualData) -> Tensor:
    """g's residuals at every step of ``data``, in one batched call of g."""
    if not hs.reads_stages:
        return map_steps(hs.correction, data.dt, data.t, data.z, data.dz)
    if data.stages is None:
        raise ValueError(
            f"g reads all stages of the base step and z0 (the {hs.convention!r} convention) but this ResidualData "
            "holds only f(t, z): make it with residual_data(hs, trajectories) for this hypersolver"
        )
    return map_stage_corrections(hs, data.dt, data.t, data.z, data.stages, data.z0)


def residual_loss(
    hs: HyperSolver, data: ResidualData, index: Optional[Tensor] = None, weight: Optional[Tensor] = None
) -> Tensor:
    """Mean squared error between g's residuals and the base solver's, in one call of g;
    ``weight`` (``[S]``, one per step, e.g. :func:`mesh_balance`) weighs each step's error."""
    batch = data.select(index)
    error = (_predicted(hs, batch) - batch.target).square()
    if weight is not None:
        error = error * weight.reshape(-1, *([1] * (error.dim() - 1)))
    return error.mean()


def mesh_balance(data: ResidualData) -> Tensor:
    """Per-step weights ``1 / mean(R**2)`` of the step's mesh: the loss becomes each mesh's error
    *relative to its own residuals*, so meshes whose residuals are large (coarse meshes of a
    high-order base) do not starve those whose residuals are small, and tiny residuals (a
    high-order base on a smooth field) are not lost below the optimiser's epsilon."""
    per_step = data.target.flatten(1).square().mean(1)
    weight = torch.ones_like(per_step)
    for n in data.mesh_steps.unique():
        mask = data.mesh_steps == n
        weight[mask] = 1.0 / per_step[mask].mean().clamp_min(torch.finfo(per_step.dtype).tiny)
    return weight


def trajectory_loss(hs: HyperSolver, trajectories: Trajectories, f: Optional[Callable] = None) -> Tensor:
    """Mean squared error of the unrolled hypersolver against the reference, over every
    mesh point of every mesh (supplement C.1)."""
    f = f if f is not None else trajectories.f
    dtype = parameter_dtype(hs)
    total = 0.0
    for n in trajectories.steps:
        t_span, reference = trajectories.mesh(n)
        reference = reference if dtype is None else reference.to(dtype)  # float64 references: g's dtype
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
    target_noise: Dict[int, float] = field(default_factory=dict)
    """Per mesh, the reference solver's error in the residual targets as a fraction of them,
    ``mean |R - R_tight| / mean |R_tight|`` on a few trajectories re-solved at 100x tighter
    tolerances in float64; empty when not estimated (trajectory fitting, unknown reference)."""

    @property
    def relative_residual_error(self) -> Dict[int, float]:
        """Mean ``|g - R| / |R|`` per mesh: ``residual_error / base_residual_error`` (1 is g = 0;
        compare it with ``target_noise``, the floor below which g cannot be checked)."""
        return {
            n: error / self.base_residual_error[n] if self.base_residual_error.get(n) else math.inf
            for n, error in self.residual_error.items()
        }

    def summary(self) -> str:
        relative = self.relative_residual_error
        meshes = ", ".join(
            f"{n} steps: {self.residual_error[n]:.3g} (base {self.base_residual_error[n]:.3g}, "
            f"|g - R| / |R| {relative[n]:.2%})"
            for n in sorted(self.residual_error)
        )
        text = (
            f"{self.method} fit, {self.iterations} iterations in {self.wall_time:.1f} s, "
            f"final loss {self.loss_history[-1]:.3g}; mean |g - R| per mesh: {meshes}"
        )
        if self.target_noise:
            noise = ", ".join(f"{n} steps: {self.target_noise[n]:.2%}" for n in sorted(self.target_noise))
            text += f"; target noise per mesh: {noise}"
        return text

    def describe(self) -> str:
        """The fit in a phrase, for the validity record it leaves on the hypersolver: ``'residual fit
        (300 iterations) [mean |g - R|: 10 steps 0.0123 (base 0.31)]'``."""
        text = f"{self.method} fit ({self.iterations} iterations)"
        if self.adversarial_worst:
            text += f" with {len(self.adversarial_worst)} adversarial rounds"
        if self.residual_error:
            errors = ", ".join(
                f"{n} steps {self.residual_error[n]:.3g} (base {self.base_residual_error[n]:.3g})"
                for n in sorted(self.residual_error)
            )
            text += f" [mean |g - R|: {errors}]"
        return text


def _check_compatible(hs: HyperSolver, data: ResidualData) -> None:
    probe = data.select(torch.arange(min(2, len(data)), device=data.z.device))
    probe = probe.replace(t=probe.t[:1], dt=probe.dt[:1], z=probe.z[:1], dz=probe.dz[:1], target=probe.target[:1])
    if probe.stages is not None:
        probe = probe.replace(stages=tuple(k[:1] for k in probe.stages))
    try:
        with torch.no_grad():
            _predicted(hs, probe)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"the trajectories hold states of shape {tuple(data.z.shape[2:])} (batches {tuple(data.z.shape[1:])}), "
            f"which the hypersolver's g ({type(hs.g).__name__}) does not accept: {err}"
        ) from err


def _check_finite(trajectories: Trajectories, data: ResidualData) -> None:
    """Refuse non-finite states, f values or targets, with their count and where they are."""
    states = trajectories.states
    per_point = ~torch.isfinite(states.reshape(states.shape[0], states.shape[1], -1))
    count = int(per_point.sum())
    what = "states"
    if count == 0:
        per_point = ~(torch.isfinite(data.dz) & torch.isfinite(data.target)).reshape(*data.z.shape[:2], -1)
        count = int(per_point.sum())
        what = "values of f or residual targets (f(t, z) is nan or inf there, or the targets overflow)"
    if count == 0:
        return
    where = per_point.any(2)
    rows = where.any(0).nonzero().flatten().tolist()
    times = where.any(1).nonzero().flatten().tolist()
    raise ValueError(
        f"the trajectories hold {count} non-finite (nan or inf) {what}, in {len(rows)} trajectories: "
        f"{rows[:10]}{' (the first 10)' if len(rows) > 10 else ''}, at time points {times[:10]} (indices into "
        "trajectories.t); fitting on them gives a nan loss: harvest again (tighter tolerances, a smaller "
        "interval) or drop them, e.g. trajectories.select(mask)"
    )


def _target_noise(hs: HyperSolver, trajectories: Trajectories, data: ResidualData, f: Callable, sample: int):
    """Per mesh, ``mean |R - R_tight| / mean |R_tight|`` on the first ``sample`` trajectories,
    where ``R_tight`` are the residual targets of a re-solve at 100x tighter tolerances in
    float64 (in the trajectories' dtype when f does not run in float64)."""
    if sample < 1 or trajectories.fingerprint is None:
        return {}  # made by hand: the reference that produced them is unknown
    try:
        reference = resolve_adaptive(trajectories.reference, role="reference")
    except (ValueError, TypeError):
        return {}
    count = min(sample, len(trajectories))
    z0 = trajectories.states[0, :count]
    atol, rtol = max(trajectories.atol / 100, 1e-14), max(trajectories.rtol / 100, 1e-14)
    with torch.no_grad():
        try:
            field64 = in_float64(f)
            tight = reference_solve(field64, z0.double(), trajectories.t.double(), reference, atol, rtol)
            tight_f, t = field64, trajectories.t.double()
        except (RuntimeError, TypeError):  # f runs only in its own dtype
            tight = reference_solve(f, z0, trajectories.t, reference, atol, rtol)
            tight_f, t = f, trajectories.t
        noise = {}
        for n in trajectories.steps:
            idx = trajectories.meshes[n].to(tight.device)
            exact, _ = residual_targets(hs, tight_f, tight[idx], t[idx])
            noisy = data.target[data.mesh_steps == n][:, :count]
            scale = float(exact.abs().mean())
            error = float((noisy.to(exact.dtype) - exact).abs().mean())
            noise[int(n)] = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
    return noise


def _warn_noise(noise: Dict[int, float], trajectories: Trajectories, sample: int) -> None:
    noisy = {n: v for n, v in noise.items() if not v <= NOISE_LIMIT}
    if not noisy:
        return
    meshes = ", ".join(f"{v:.0%} on the {n}-step mesh" for n, v in sorted(noisy.items()))
    warnings.warn(
        f"the residual targets are dominated by noise from the reference solver: its error is {meshes} "
        f"(more than {NOISE_LIMIT:.0%}; estimated by re-solving {min(sample, len(trajectories))} trajectories at "
        f"100x tighter tolerances in float64). The targets are divided by dt**(p+1), which amplifies the error of "
        f"{trajectories.reference} at atol={trajectories.atol:g}, rtol={trajectories.rtol:g} in "
        f"{trajectories.states.dtype}; g would learn that noise and can end up worse than its base solver. "
        "Harvest with base=<the hypersolver> (harvest then picks the tolerance and float64 for its order), "
        "or with tighter tolerances (e.g. atol=rtol=1e-9) and in float64.",
        UserWarning,
        stacklevel=3,
    )


def _perturbed(f: nn.Module, noise: float, generator: Optional[torch.Generator]) -> nn.Module:
    """A copy of f with its parameters perturbed by ``noise`` (relative); f is not touched."""
    copied = copy.deepcopy(f)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=generator).to(p))
    return copied


def _adversarial_round(hs, trajectories: Trajectories, f, spec: Adversarial, generator):
    """The ``spec.keep`` worst candidates as trajectories, their f, and the worst error."""
    z0 = trajectories.states[0]
    pick = torch.randint(z0.shape[0], (spec.candidates,), generator=generator).to(z0.device)
    noise = torch.randn((spec.candidates, *z0.shape[1:]), generator=generator).to(z0)
    candidates = z0[pick] + spec.scale * z0.std(0, keepdim=True) * noise
    fc = _perturbed(f, spec.param_noise, generator) if spec.param_noise > 0 else f
    fc_ref = in_float64(fc) if z0.dtype == torch.float64 else fc  # float64 references need f in float64
    dtype = parameter_dtype(hs) or z0.dtype  # the hypersolver runs in g's dtype
    with torch.no_grad():
        states = reference_solve(
            fc_ref, candidates, trajectories.t, trajectories.reference, trajectories.atol, trajectories.rtol
        )
        pool = trajectories.replace(states=states, f=fc)
        error = torch.zeros(spec.candidates, device=z0.device, dtype=z0.dtype)
        for n in pool.steps:
            t_span, ref = pool.mesh(n)
            final = hs.solve(fc, ref[0].to(dtype), t_span, return_trajectory=False).to(ref)
            error = torch.maximum(error, (final - ref[-1]).flatten(1).norm(dim=1).nan_to_num(nan=float("inf")))
        # a diverging hypersolver is the worst case; a candidate whose reference diverged is unusable
        error[~torch.isfinite(states.flatten(2)).all(2).all(0)] = -float("inf")
        worst = error.topk(spec.keep).indices
    return pool.select(worst), fc, float(error[worst[0]])


def fit(
    hs: HyperSolver,
    trajectories: Trajectories,
    method: str = "residual",
    recipe: Optional[Recipe] = None,
    adversarial: Optional[Adversarial] = None,
    device=None,
    progress: bool = True,
    seed: Optional[int] = None,
    noise_sample: int = 8,
    **overrides,
) -> FitReport:
    """Fit the hypersolver's g on harvested trajectories; only g's parameters change.

    ``trajectories`` may be a sharded harvest on disk (:class:`~.shards.ShardedTrajectories`): residual
    fitting then reads one shard at a time (:func:`~.shards.fit_shards`).

    Args:
        method: ``'residual'`` (targets precomputed, one call of g per iteration) or
            ``'trajectory'`` (unroll the hypersolver over each mesh and match the reference).
        recipe: the optimisation (a :class:`Recipe`: iterations, batch schedule, AdamW and its
            cosine schedule, clipping, refinement, mesh balancing); its fields can also be given as
            keywords, ``fit(hs, trajectories, iterations=300, lr=5e-3)``, over ``recipe``'s.
        adversarial: an :class:`Adversarial` search, or None.
        device: where to fit (g is moved there; the vector field is copied if it lives elsewhere).
        progress: show a tqdm progress bar with the loss.
        seed: makes batch sampling and the adversarial search reproducible.
        noise_sample: how many trajectories residual fitting re-solves (at 100x tighter
            tolerances, in float64) to estimate the reference solver's noise in its targets,
            ``FitReport.target_noise``; above 10% of the targets it warns. 0 skips the estimate,
            as do trajectories not made by :func:`~.harvest.harvest` (their reference is unknown).

    With ``balance_meshes`` (see :class:`Recipe`), ``hs.residual_scale`` is set to the targets' root
    mean square unless g scales its own output (``g.scales_output``: ``MLPHyperNet(scaled=True)``).
    At the end, ``hs.validity`` records the step sizes, state shape, interval and direction fitted on.

    Gradients are taken with respect to g's parameters only: f never gets a ``.grad``. f is best an
    ``nn.Module``; the modules a plain callable reaches (closure cells, a bound method's object,
    ``functools.partial`` arguments, module-level names in its code) are frozen during the fit.

    Raises:
        ValueError: non-finite states, f values or targets in the trajectories (with their count
            and the first trajectories holding them), and the other bad arguments named.
        TypeError: a keyword that is neither an argument nor a field of :class:`Recipe`.
        FitDivergedError: the loss or gradient became non-finite; g keeps its last finite weights.
    """
    streamed = getattr(trajectories, "_fit_streamed", None)
    if streamed is not None:  # a sharded harvest on disk (shards.ShardedTrajectories): one shard in memory at a time
        options = dict(method=method, recipe=recipe, adversarial=adversarial, device=device, progress=progress)
        return streamed(hs, seed=seed, noise_sample=noise_sample, **options, **overrides)
    recipe = resolve_recipe(recipe, overrides, "fit", positional="iterations")
    _check_arguments(hs, trajectories, method, adversarial, noise_sample)
    trajectories, f, params = _placed(hs, trajectories, device)
    start = time.perf_counter()
    with preserved(*owned_modules(f)):
        data = residual_data(hs, trajectories, f)
        _check_finite(trajectories, data)
        _check_compatible(hs, data)
        noise = _target_noise(hs, trajectories, data, f, noise_sample) if method == "residual" else {}
        _warn_noise(noise, trajectories, noise_sample)
        batches = _Batches(hs, f, method, recipe, data, trajectories, adversarial=adversarial, seed=seed)
        with fitting(hs, keep=owned_modules(f)):
            history = _optimise(params, batches.loss_at, recipe, method, progress)
            if recipe.refine:
                history += _refine(hs, batches.trajectories, f, params, recipe, progress)
        residual_error, base_error = _residual_errors(hs, batches.data)
    elapsed = time.perf_counter() - start
    report = FitReport(method, recipe.iterations, elapsed, history, residual_error, base_error, batches.worst, noise)
    hs.validity = Validity.of_trajectories(batches.trajectories, how=report.describe())
    return report


def _check_arguments(hs: HyperSolver, trajectories: Trajectories, method: str, adversarial, noise_sample) -> None:
    """fit's refusals of a bad method, sample size, field-less trajectories or adversarial setting."""
    if method not in METHODS:
        raise ValueError(f"unknown fitting method {method!r}; expected one of {METHODS}")
    if method == "residual" and getattr(hs, "fitted_by_trajectory", False):
        warnings.warn(
            f"{type(hs).__name__}'s steps are not its base tableau's (an inner net or learned per-step "
            "coefficients), which residual fitting cannot reach (its residuals do not separate): only g is "
            "fitted; use method='trajectory' or budget.fit_budget",
            UserWarning,
            stacklevel=3,
        )
    check_int(noise_sample, "noise_sample", minimum=0)
    if trajectories.f is None:
        raise ValueError("the trajectories carry no vector field; load them with Trajectories.load(path, f=...)")
    if adversarial is not None and adversarial.param_noise > 0 and method != "residual":
        raise ValueError("adversarial perturbation of f's parameters needs method='residual'")


def _placed(hs: HyperSolver, trajectories: Trajectories, device) -> Tuple[Trajectories, Callable, List[nn.Parameter]]:
    """g and the trajectories moved to ``device`` (default: the trajectories'), their f there (a copy of
    a module that lives elsewhere: the user's model stays where it is), and g's trainable parameters (not f's,
    when g holds f)."""
    device = torch.device(device) if device is not None else trajectories.states.device
    hs.to(device)
    trajectories = trajectories.to(device)
    f = trajectories.f
    if isinstance(f, nn.Module) and module_device(f, device) != device:
        f = copy.deepcopy(f).to(device)
    fields = {id(p) for m in (*owned_modules(trajectories.f), *owned_modules(f)) for p in m.parameters()}
    params = [p for p in hs.parameters() if p.requires_grad and id(p) not in fields]  # never f's, if g holds f
    if not params:
        raise ValueError(f"the hypersolver's g ({type(hs.g).__name__}) has no trainable parameters")
    return trajectories, f, params


def _balance(hs: HyperSolver, data: ResidualData, recipe: Recipe, method: str) -> Optional[Tensor]:
    """The per-step weights of :func:`mesh_balance` when the recipe balances the meshes (by default
    for a base of order 4 or more, residual fitting); then g's output scale is also set to the
    targets' root mean square, unless g scales its own output (``g.scales_output``)."""
    balance = recipe.balance_meshes
    if not (balance or (balance is None and hs.order >= 4 and method == "residual")):
        return None
    if not getattr(hs.g, "scales_output", False):  # one output scale: g's own, or the hypersolver's
        hs.residual_scale = float(data.target.square().mean().sqrt().clamp_min(1e-30))
    return mesh_balance(data)


class _Batches:
    """The fit's data, its loss and its current batch of trajectories: the adversarial rounds (spread
    evenly over the fit) add to the data, and the batch is drawn anew after ``warmup`` iterations, then
    every ``swap_every``. The meshes are weighed as the recipe says (:func:`_balance`)."""

    def __init__(self, hs, f, method: str, recipe: Recipe, data: ResidualData, trajectories, *, adversarial, seed):
        self.hs, self.f, self.method, self.recipe, self.adversarial = hs, f, method, recipe, adversarial
        self.data, self.trajectories = data, trajectories
        self.weight = _balance(hs, data, recipe, method)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.index: Optional[Tensor] = None
        self.batch: Optional[ResidualData] = None  # data.select(index), gathered once per draw
        self.worst: List[float] = []
        n = adversarial.rounds if adversarial is not None else 0
        self.rounds = {recipe.iterations * (k + 1) // (n + 1) for k in range(n)}

    def loss_at(self, i: int) -> Tensor:
        """The loss of iteration ``i`` (after an adversarial round, when one falls on ``i``)."""
        if i in self.rounds:
            found, fc, err = _adversarial_round(self.hs, self.trajectories, self.f, self.adversarial, self.generator)
            self.worst.append(err)
            self.data = self.data.extend(residual_data(self.hs, found, fc))
            self.batch = None
            if self.method == "trajectory":
                self.trajectories = self.trajectories.extend(found).replace(f=self.f)
        recipe = self.recipe
        if self.index is None or (i >= recipe.warmup and (i - recipe.warmup) % recipe.swap_every == 0):
            index = torch.randperm(len(self.data), generator=self.generator)[: recipe.batch_size]
            self.index, self.batch = index.to(self.data.z.device), None
        if self.method == "residual":
            if self.batch is None:
                self.batch = self.data.select(self.index)
            return residual_loss(self.hs, self.batch, None, self.weight)
        return trajectory_loss(self.hs, self.trajectories.select(self.index), self.f)


def _mesh_errors(hs: HyperSolver, trajectories: Trajectories, f: Callable, correct: bool = True) -> Dict[int, Tensor]:
    """Per mesh, the mean ``|z - z_ref|`` over the mesh points of the hypersolver (or of its base
    solver) unrolled from the references' first states, in g's dtype."""
    dtype = parameter_dtype(hs)
    errors = {}
    for n in trajectories.steps:
        t_span, reference = trajectories.mesh(n)
        reference = reference if dtype is None else reference.to(dtype)
        solution = hs.solve(f, reference[0], t_span, correct=correct)
        errors[n] = (solution[1:] - reference[1:]).abs().mean()
    return errors


def _refine(hs, trajectories: Trajectories, f, params, recipe: Recipe, progress: bool) -> List[float]:
    """``recipe.refine`` iterations of trajectory L1 on the meshes fitted, each mesh's error divided
    by the base solver's on it (computed once, on all the trajectories), from ``lr_min`` to ``lr_min / 10``."""
    with torch.no_grad():
        scale = {n: float(e) for n, e in _mesh_errors(hs, trajectories, f, correct=False).items()}
    scale = {n: e if e > 0 and math.isfinite(e) else 1.0 for n, e in scale.items()}
    generator = torch.Generator().manual_seed(0)
    device = trajectories.states.device

    def loss_at(i: int) -> Tensor:
        index = torch.randperm(len(trajectories), generator=generator)[: recipe.batch_size].to(device)
        errors = _mesh_errors(hs, trajectories.select(index), f)
        return sum(errors[n] / scale[n] for n in errors) / len(errors)

    refinement = recipe.replace(iterations=recipe.refine, lr=recipe.lr_min, lr_min=recipe.lr_min / 10)
    return _optimise(params, loss_at, refinement, "refinement", progress)


def _residual_errors(hs: HyperSolver, data: ResidualData, max_elements: int = 2**22):
    """Mean |g - R| and mean |R| per mesh, over all the fitting data, a chunk of
    trajectories at a time (all steps of a chunk hold at most ``max_elements`` numbers)."""
    chunk = max(1, max_elements // max(1, data.z[:, :1].numel()))
    sums, base = torch.zeros(data.t.shape[0]), torch.zeros(data.t.shape[0])
    with torch.no_grad():
        for start in range(0, len(data), chunk):
            index = torch.arange(start, min(start + chunk, len(data)), device=data.z.device)
            chunk_data = data.select(index)
            predicted, target = _predicted(hs, chunk_data), chunk_data.target
            sums += (predicted - target).abs().flatten(1).sum(1).cpu()
            base += target.abs().flatten(1).sum(1).cpu()
    per_step = data.z[0].numel()
    steps = data.mesh_steps.cpu()
    return (
        {int(n): float(sums[steps == n].sum() / (per_step * (steps == n).sum())) for n in steps.unique()},
        {int(n): float(base[steps == n].sum() / (per_step * (steps == n).sum())) for n in steps.unique()},
    )


def _optimise(
    params: List[nn.Parameter], loss_at: Callable[[int], Tensor], recipe: Recipe, method: str, progress: bool
) -> List[float]:
    """The recipe's loop: ``loss_at(i)``, a finite-loss check, gradients with respect to g's
    parameters only, clipping, a step; on divergence g gets back its last finite weights."""
    iterations = recipe.iterations
    optimizer, schedule = optimizer_and_schedule(params, recipe.lr, recipe.lr_min, recipe.weight_decay, iterations)
    history: List[float] = []
    bar = progress_bar(iterations, progress, "fitting g")
    last = LastFinite(params)
    try:
        for i in range(iterations):
            loss = loss_at(i)
            value = loss.item()  # one host sync per iteration, for the check and the history
            if not math.isfinite(value):
                raise diverged(f"the {method} loss became {value}", f"iteration {i}")
            grads = torch.autograd.grad(loss, params, allow_unused=True)  # never into f
            for p, grad in zip(params, grads):
                p.grad = grad
            clip_gradients(params, recipe.clip, f"iteration {i}")
            last.keep()
            optimizer.step()
            schedule.step()
            history.append(value)
            if bar is not None and (i % 10 == 0 or i == iterations - 1):
                bar.set_postfix(loss=f"{value:.3g}", refresh=False)
                bar.update(i + 1 - bar.n)
    except FitDivergedError:
        last.restore_if_nonfinite()
        raise
    finally:
        if bar is not None:
            bar.close()
    return history
