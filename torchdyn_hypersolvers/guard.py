"""A guarded hypersolver: g's correction is checked at every step, per sample, and dropped where
it is estimated to make the step worse than the base solver's.

g is fitted on the states a model visited while harvesting; away from them (other inputs, a
longer horizon, a model changed after the fit) its correction is a guess. :class:`Guarded`
wraps any :class:`~.solvers.HyperSolver` (it is a wrapped solver) and is itself a
torchdyn fixed-step solver::

    NeuralODE(f, solver=Guarded(HyperEuler(g)))

The check costs no extra evaluation of f in the common case. The step's end point
``k' = f(t + dt, z_next)`` is the next step's first stage (first same as last), so it is
evaluated once and reused. With it, the defect of the corrected step against a quadrature of f
over the step, ``D = z_next - z - Q`` (``Q``: the trapezoid rule ``dt/2 (f(t, z) + k')`` on a
solve's first step, the two-step Adams-Moulton rule on ``f(t - dt_prev), f(t, z), k'`` after
it), estimates the corrected step's local error, and ``D - c`` (``c = dt**(p+1) g``, g's
correction) the base step's. For an Euler base on a first step this is Heun's error estimate:
``|D| = |c - dt/2 (k' - f(t, z))|`` is how far g's correction is from Heun's. Where
``|D| > ratio * |D - c| + atol + rtol * |z|`` (per sample; NaN counts as unreliable) the
sample's step is redone with the base solver, exactly, and counted.

The step is read through the hypersolver's :meth:`~.solvers.HyperSolver.step_parts`, so a
:class:`~.multistage.MultiStageHyperSolver` without an inner net is guarded like any hypersolver;
one with an inner net is refused (its stages are not the base tableau's: the fallback would reuse them).

Cost: per step, f at the base's stages and once at the step's end point, which is reused as the
next step's first stage: the base solver's evaluations per step, plus one per solve, when nothing
falls back. A sample that falls back takes the base step exactly; that step's end point is
evaluated once more (one extra call of f, on those samples only unless ``per_sample=False``, only
in steps where some sample fell back). The decision needs one small device-to-host read per step
(whether any sample fell back); CUDA-graph capture is therefore not supported.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._mesh import check_t_span
from ._residuals import per_row
from ._wrapped import WrappedSolver
from .solvers import HyperSolver
from .tableaus import VectorField

__all__ = ["Guarded", "GuardSummary"]


@dataclass(frozen=True)
class GuardSummary:
    """What a :class:`Guarded` solver did in its last solve (read with :meth:`Guarded.summary`).

    Attributes:
        steps: steps taken.
        batch: samples per step (1 for an unbatched state).
        fallbacks: sample-steps redone with the base solver (at most ``steps * batch``).
        per_sample: ``[batch]`` fallbacks of each sample (a CPU tensor).
        nfe: evaluations of f, all samples at once counting as one.
        outside_fitted: how many initial states lay outside the state range g was fitted on
            (widened by the guard's ``margin``); None when the validity record has no range.
    """

    steps: int
    batch: int
    fallbacks: int
    per_sample: Tensor
    nfe: int
    outside_fitted: Optional[int] = None

    @property
    def fraction(self) -> float:
        """``fallbacks / (steps * batch)``: the share of sample-steps g's correction was dropped."""
        return self.fallbacks / max(1, self.steps * self.batch)

    @property
    def nfe_per_step(self) -> float:
        return self.nfe / max(1, self.steps)

    def __str__(self) -> str:
        text = (
            f"{self.steps} steps x {self.batch} samples: {self.fallbacks} fell back to the base solver "
            f"({self.fraction:.1%}); {self.nfe} evaluations of f ({self.nfe_per_step:.3g} per step)"
        )
        if self.outside_fitted is not None:
            text += f"; {self.outside_fitted} of {self.batch} initial states outside the fitted state range"
        return text


class _GuardedSolve:
    """One guarded solve's counters and the first-same-as-last cache (never copied or pickled)."""

    __slots__ = ("total", "index", "batch", "per_sample", "fallbacks", "nfe", "outside", "x_next", "version",
                 "f", "t_next", "k_next", "k_prev", "dt_prev", "weights")

    def __init__(self, total: Optional[int], batch: int, device, outside: Optional[Tensor]) -> None:
        self.total, self.index, self.batch = total, 0, batch
        self.per_sample = torch.zeros(batch, dtype=torch.long, device=device)
        self.fallbacks, self.nfe, self.outside = 0, 0, outside
        self.weights: Optional[Tensor] = None
        self.forget()

    def forget(self) -> None:
        self.x_next = self.version = self.f = self.t_next = self.k_next = self.k_prev = self.dt_prev = None

    def cached_k1(self, f, x: Tensor) -> Optional[Tensor]:
        """f at ``x`` from the previous step, only for the very tensor that step returned, unchanged
        since (its version counter), under the same f, and while the solve's mesh is not exhausted.
        The time is checked after the step (see :meth:`Guarded.step`)."""
        if self.x_next is None or x is not self.x_next or f is not self.f or _version(x) != self.version:
            return None
        if self.total is not None and self.index >= self.total:
            return None
        return self.k_next

    def advance(self, f, x_next: Tensor, k_next: Tensor, t_next: Tensor, k: Tensor, dt: Tensor, nfe: int) -> bool:
        """Count a step that ended at ``x_next`` (with f there, ``k_next``) and started with stage ``k``;
        whether the solve's mesh is exhausted (then the cache is dropped)."""
        self.nfe += nfe
        self.index += 1
        self.x_next, self.version, self.f, self.t_next, self.k_next = x_next, _version(x_next), f, t_next, k_next
        self.k_prev, self.dt_prev = k, dt
        if self.total is not None and self.index >= self.total:
            self.forget()
            return True
        return False

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


class _ThreadRuns:
    """Each thread's current (or last) guarded solve: a guard shared by threads counts each thread's
    solves apart. Copies and pickles of the guard start with none."""

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Optional[_GuardedSolve]:
        return getattr(self._local, "run", None)

    def set(self, run: _GuardedSolve) -> _GuardedSolve:
        self._local.run = run
        return run

    def __deepcopy__(self, memo) -> _ThreadRuns:
        return _ThreadRuns()

    def __reduce__(self):
        return (_ThreadRuns, ())


class _CheckedStep(NamedTuple):
    """One corrected step and the guard's verdict on it."""

    x_next: Tensor
    """The corrected step's end point."""
    k_next: Tensor
    """f at ``x_next``: the next step's first stage."""
    ok: Tensor
    """``[B]`` bool, per sample: g's correction is kept (False also where non-finite)."""
    base: Tensor
    """The base step's end point (for the samples that fall back)."""
    k: Tensor
    """The step's first stage ``f(t, x)``."""
    evaluations: int
    """Evaluations of f in the step."""


class Guarded(WrappedSolver):
    """A hypersolver that falls back to its base solver, per sample and per step, where g's
    correction is estimated to be worse than no correction.

    A torchdyn fixed-step solver (``NeuralODE(f, solver=Guarded(hs))``, ``odeint``) and a package
    solver (``Guarded(hs).solve(f, z0, t_span)``); its cost is in the module's description. After a
    solve, :meth:`summary` says how many sample-steps fell back; a ``UserWarning`` says so at the end
    of a solve when more than ``warn_fraction`` of them did. One guard may be shared by threads that
    solve at once: each solve's counts (and the hypersolver's per-solve state) are its thread's.

    Args:
        hypersolver: the :class:`~.solvers.HyperSolver` to guard (its g, validity record and
            state dict are the guard's: ``Guarded(hs).state_dict()`` keys start with ``hypersolver.``).
        ratio: a sample falls back where its estimated corrected-step error exceeds ``ratio``
            times its estimated base-step error plus ``atol + rtol * |z|``. 1: wherever g is
            estimated to make the step worse by more than the tolerance; larger values trust g
            more. A zero g never falls back for ``ratio >= 1``.
        atol, rtol: the tolerance, per step, on the per-sample error norm (the state's units;
            ``|z|`` the norm of the sample's state at the step's start). It keeps steps where g
            and the base are both accurate (and g loses by a negligible amount) from falling
            back, at a bounded cost: g may lose up to it per step.
        margin: with a number, a sample whose state lies outside the state range g was fitted on
            (``hs.validity``, recorded by ``fit``), widened by ``margin`` times its width on each
            side, also falls back, whatever the estimate says. None (default): the range is only
            reported (``summary().outside_fitted``, for the initial states).
        warn_fraction: warn at the end of a solve where more than this share of sample-steps fell
            back (None: never).
        per_sample: True (default) when f treats the samples of a batch independently, as a Neural
            ODE's vector field does: f is then evaluated again only on the samples that fell back.
            False for a vector field that couples them (batch statistics, state of the batch's
            size kept on f): f is evaluated again on the whole batch.
    """

    def __init__(
        self,
        hypersolver: HyperSolver,
        ratio: float = 1.0,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        margin: Optional[float] = None,
        warn_fraction: Optional[float] = 0.1,
        per_sample: bool = True,
    ):
        if isinstance(hypersolver, Guarded):
            raise TypeError("the hypersolver is already guarded; pass its .hypersolver to guard it differently")
        super().__init__(hypersolver)
        _check_arguments(type(hypersolver), ratio, atol, rtol, margin, warn_fraction)
        if getattr(hypersolver, "corrects_stages", False):
            raise TypeError(
                f"Guarded cannot check {type(hypersolver).__name__}'s inner net: it changes the stages the "
                "fallback would reuse, so a broken inner net would go unnoticed; guard a multi-stage solver "
                "without an inner net (MultiStageHyperNet(outer))"
            )
        self.ratio, self.atol, self.rtol = float(ratio), float(atol), float(rtol)
        self.margin, self.warn_fraction, self.per_sample = margin, warn_fraction, bool(per_sample)
        self.__dict__["_runs"] = _ThreadRuns()

    def describe(self) -> str:
        """The hypersolver's description and the guard's settings."""
        record = self.validity
        margin = (
            f"; samples outside the fitted state range (+{self.margin:g} of its width) fall back"
            if self.margin is not None
            else ""
        )
        if self.margin is not None and (record is None or not record.has_state_range):
            margin += " (no state range recorded: fit(...) records one)"
        return (
            f"{super().describe()}\n"
            f"Guarded: a sample's step falls back to {self.tableau.name} where the estimate of its "
            f"corrected error exceeds {self.ratio:g} x the base step's + {self.atol:g} + {self.rtol:g} |z|{margin}."
        )

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio:g}, atol={self.atol:g}, rtol={self.rtol:g}, margin={self.margin}, "
            f"warn_fraction={self.warn_fraction}, per_sample={self.per_sample}"
        )

    def sync_device_dtype(self, x, t_span: Tensor) -> Tuple[Tensor, Tensor]:
        """torchdyn hook (once per solve): the hypersolver's checks, then a fresh count."""
        x, t_span = self.hypersolver.sync_device_dtype(x, t_span)
        if isinstance(x, Tensor) and self.hypersolver.correcting:
            self._start(x, t_span)
        return x, t_span

    def check_inputs(self, x: Tensor, t_span: Tensor) -> None:
        """The fast path's once-per-solve hook: the hypersolver's checks, then a fresh count."""
        self.hypersolver.check_inputs(x, t_span)
        self._start(x, check_t_span(t_span))

    def _start(self, x: Tensor, t_span: Tensor) -> None:
        record = self.validity
        outside, samples = None, _per_sample(x)
        if record is not None and record.has_state_range and samples.shape[1] == len(record.state_min):
            outside = record.outside(x, self.margin or 0.0).sum() if samples.shape[0] else torch.tensor(0)
        run = _runs(self).set(_GuardedSolve(t_span.numel() - 1, samples.shape[0], x.device, outside))
        if x.device.type != "cpu":  # the quadrature weights of every step at once: no per-step scalar kernels
            with torch.no_grad():
                run.weights = _mesh_weights(t_span.to(x.device))

    def solve(self, f: VectorField, z0: Tensor, t_span, return_trajectory: bool = True, **fast) -> Tensor:
        """Integrate over ``t_span`` with the package's fast loop (``cuda_graph`` is refused: each
        step's fallback decision is read back from the device)."""
        if fast.get("cuda_graph"):
            raise ValueError("Guarded cannot run as a CUDA graph: each step reads how many samples fell back")
        return super().solve(f, z0, t_span, return_trajectory, **fast)

    def summary(self) -> GuardSummary:
        """What the calling thread's last solve (or the steps since it began) did: fallbacks and
        evaluations of f."""
        run = _runs(self).get()
        if run is None:
            raise RuntimeError("Guarded.summary(): no solve yet (in this thread); solve with this solver first")
        outside = int(run.outside) if run.outside is not None else None
        return GuardSummary(run.index, run.batch, run.fallbacks, run.per_sample.detach().cpu(), run.nfe, outside)

    def step(self, f: VectorField, x: Tensor, t: Tensor, dt: Tensor, k1: Optional[Tensor] = None, args=None):
        """One guarded step; returns ``(f(t + dt, x_next), x_next, None)`` (torchdyn reads ``x_next``)."""
        hs = self._modules["hypersolver"]
        if not hs.correcting or not isinstance(x, Tensor):  # torchdyn's adjoint solve, a dict state
            return hs.step(f, x, t, dt, k1, args)
        runs = _runs(self)
        run = runs.get()  # this thread's solve
        batch = x.shape[0] if x.dim() > 1 else 1
        if run is None or run.batch != batch:  # a step outside a solve
            run = runs.set(_GuardedSolve(None, batch, x.device, None))
        cached = run.cached_k1(f, x) if k1 is None else None
        t_next = t + dt
        if cached is None:
            step = _checked_step(self, hs, f, x, t, dt, k1, None)
            any_fell, moved = _read(step.ok, t, None, dt)
        else:
            step = _checked_step(self, hs, f, x, t, dt, cached, run)
            any_fell, moved = _read(step.ok, t, run.t_next, dt)  # the step's one device-to-host read
        evaluations = step.evaluations
        if moved:  # t is not where the previous step ended: redo the step without the cached stage
            step = _checked_step(self, hs, f, x, t, dt, None, None)
            evaluations += step.evaluations
            any_fell, _ = _read(step.ok, t, None, dt)
        x_next, k_next = step.x_next, step.k_next
        if any_fell:  # redo those samples' steps with the base solver and evaluate f at their end points
            x_next, k_next, fell = _fall_back(step, f, x, t_next, self.per_sample)
            evaluations += 1
            run.per_sample = run.per_sample + fell
            run.fallbacks += int(fell.sum())
        if run.advance(f, x_next, k_next, t_next, step.k, dt, evaluations):
            _warn_fallbacks(self, run)
        return k_next, x_next, None


def _check_arguments(cls: type, ratio, atol, rtol, margin, warn_fraction) -> None:
    if cls.step is not HyperSolver.step:
        raise TypeError(
            f"Guarded takes a step of HyperSolver apart (its step_parts) to check it; {cls.__name__} "
            "steps differently (it overrides step: override step_parts instead) and cannot be guarded"
        )
    for name, value in (("ratio", ratio), ("atol", atol), ("rtol", rtol)):
        if not _number(value) or not 0 <= value < float("inf"):
            raise ValueError(f"Guarded needs a finite {name} >= 0, got {name}={value!r}")
    if margin is not None and (not _number(margin) or not 0 <= margin < float("inf")):
        raise ValueError(f"Guarded needs margin=None or a finite number >= 0, got margin={margin!r}")
    if warn_fraction is not None and (not _number(warn_fraction) or not 0 <= warn_fraction <= 1):
        raise ValueError(f"Guarded needs warn_fraction=None or in [0, 1], got warn_fraction={warn_fraction!r}")


def _checked_step(guard: Guarded, hs: HyperSolver, f, x: Tensor, t: Tensor, dt: Tensor, k1, run) -> _CheckedStep:
    """The corrected step, f at its end point, and the per-sample fallback decision. With ``run`` (a
    continued trajectory), its previous step's stage makes the estimate third order."""
    parts = hs.step_parts(f, x, t, dt, k1)
    k = parts.stages[0]
    increment = dt * parts.increment
    base = x + increment
    x_next = base + parts.correction
    k_next = f(t + dt, x_next)
    previous = run.k_prev if run is not None else None
    dt_prev = run.dt_prev if previous is not None else None
    if previous is not None and run.weights is not None and run.index < run.weights.shape[0]:
        weights = run.weights[run.index].unbind(0)  # this step's, precomputed (t is checked after the step)
    else:
        weights = _quadrature(dt, dt_prev)
    ok = _keeps_correction(guard, x, increment, parts.correction, k, k_next, previous, weights)
    return _CheckedStep(x_next, k_next, ok, base, k, hs.tableau.stages - (0 if k1 is None else 1) + 1)


def _keeps_correction(guard: Guarded, x, increment, c, k, k_next, previous, weights) -> Tensor:
    """Per sample, whether g's correction is kept: ``[B]`` bool (False also where non-finite)."""
    with torch.no_grad():  # a decision: nothing here is differentiated
        defect = _defect(increment, k, k_next, previous, weights)
        stacked = torch.stack((defect + c, defect, x))
        stacked = stacked.flatten(2) if x.dim() > 1 else stacked.reshape(3, 1, -1)
        norms = torch.linalg.vector_norm(stacked, dim=2)
        # |corrected| - ratio |base| - rtol |z| <= atol
        ok = _coefficients(guard, norms) @ norms <= guard.atol
        if guard.margin is not None and ok.numel():
            record = guard.validity
            if record is not None and record.has_state_range:
                ok = ok & ~record.outside(x, guard.margin)
    return ok


def _defect(increment: Tensor, k: Tensor, k_next: Tensor, previous: Optional[Tensor], weights) -> Tensor:
    """The base step's defect ``z_next - z - (f integrated over the step)``, linearised: the corrected
    step's is ``defect + c``. The integral: the trapezoid rule on a first step, else the two-step
    Adams-Moulton rule on ``f(t - dt_prev), f(t), f(t + dt)`` (third order)."""
    if isinstance(weights[0], float):  # on the CPU: fused multiply-adds with the weights as numbers
        defect = torch.add(increment, k_next, alpha=-weights[0]).add_(k, alpha=-weights[1])
        if previous is not None:
            defect.add_(previous, alpha=-weights[2])
    else:
        defect = torch.addcmul(increment, k_next, weights[0], value=-1).addcmul_(k, weights[1], value=-1)
        if previous is not None:
            defect.addcmul_(previous, weights[2], value=-1)
    return defect


def _coefficients(guard: Guarded, norms: Tensor) -> Tensor:
    """``[1, -ratio, -rtol]`` in the norms' dtype and device, cached on the guard."""
    key = (norms.dtype, norms.device, guard.ratio, guard.rtol)
    cached = guard.__dict__.get("_coefficients_cache")
    if cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            value = torch.tensor([1.0, -guard.ratio, -guard.rtol], dtype=norms.dtype, device=norms.device)
        cached = guard.__dict__["_coefficients_cache"] = (key, value)
    return cached[1]


def _fall_back(step: _CheckedStep, f, x: Tensor, t_next: Tensor, per_sample: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The step with the samples that fell back redone by the base step, f at its end point, and
    which fell back (``[B]``)."""
    fell = ~step.ok
    if x.dim() <= 1:  # one sample
        x_next, k_next = step.base, f(t_next, step.base)
    elif per_sample:  # f on the samples that fell back only
        rows = fell.nonzero().squeeze(1)
        redone = step.base.index_select(0, rows)
        x_next = step.x_next.index_copy(0, rows, redone)
        k_next = step.k_next.index_copy(0, rows, f(t_next, redone))
    else:  # f couples the samples: evaluate it on the whole new batch
        x_next = torch.where(per_row(fell, x), step.base, step.x_next)
        k_next = f(t_next, x_next)
    return x_next, k_next, fell.reshape(-1)


def _warn_fallbacks(guard: Guarded, run: _GuardedSolve) -> None:
    """At the end of a solve: warn where more than ``warn_fraction`` of the sample-steps fell back."""
    if guard.warn_fraction is None or run.fallbacks == 0:
        return
    fraction = run.fallbacks / max(1, run.index * run.batch)
    if fraction > guard.warn_fraction:
        warnings.warn(
            f"Guarded({type(guard.hypersolver).__name__}): {run.fallbacks} of {run.index} steps x {run.batch} "
            f"samples ({fraction:.1%}) fell back to the base solver {guard.tableau.name}: g's correction looked "
            "worse than none there (states or step sizes away from where g was fitted?). summary() has the "
            "counts; describe() says where g was fitted.",
            UserWarning,
            stacklevel=4,
        )


def _per_sample(x: Tensor) -> Tensor:
    """``x`` as ``[B, features]`` (an unbatched state is one sample; a batch may be empty)."""
    return x.flatten(1) if x.dim() > 1 else x.reshape(1, -1)


def _runs(guard: Guarded) -> _ThreadRuns:
    """The guard's per-thread solves (made here for a guard built without ``__init__``)."""
    runs = guard.__dict__.get("_runs")
    return runs if runs is not None else guard.__dict__.setdefault("_runs", _ThreadRuns())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _version(x: Tensor) -> Optional[int]:
    """The tensor's in-place version counter (None for inference tensors, which keep none)."""
    return None if x.is_inference() else x._version


def _read(ok: Tensor, t: Tensor, t_expected: Optional[Tensor], dt: Tensor) -> Tuple[bool, bool]:
    """Whether any sample fell back (is not ``ok``), and whether ``t`` differs from ``t_expected`` (the
    previous step's end time, when its cached stage is about to be reused): one device-to-host read."""
    if t_expected is None:
        return not bool(ok.all()), False
    if ok.device.type == "cpu" and t.device.type == "cpu":  # no device to wait for: read directly
        return not bool(ok.all()), abs(float(t) - float(t_expected)) > 1e-4 * abs(float(dt))
    moved = (t - t_expected).abs() > 1e-4 * dt.abs()
    all_ok, moved = torch.stack([ok.all(), moved.reshape(())]).tolist()
    return not all_ok, bool(moved)


def _quadrature(dt: Tensor, dt_prev: Optional[Tensor]):
    """Weights of ``f(t + dt), f(t), f(t - dt_prev)`` in the integral of f over ``[t, t + dt]``: the
    trapezoid rule without a previous step, else the quadratic through the three (the two-step
    Adams-Moulton rule, third order, any step ratio). Numbers on the CPU, tensors elsewhere."""
    cpu = dt.device.type == "cpu" and (dt_prev is None or dt_prev.device.type == "cpu")
    h = float(dt) if cpu else dt
    if dt_prev is None:
        return 0.5 * h, 0.5 * h, None
    hp = float(dt_prev) if cpu else dt_prev
    total = h + hp
    return h * (2 * h + 3 * hp) / (6 * total), h * (h + 3 * hp) / (6 * hp), -(h**3) / (6 * hp * total)


def _mesh_weights(t_span: Tensor) -> Tensor:
    """The two-step quadrature weights for every step of a mesh, ``[steps, 3]`` (row ``i``: step
    ``i`` after step ``i - 1``; row 0 is never used), in the forward-time frame torchdyn solves in."""
    h = (t_span[1:] - t_span[:-1]).abs()
    hp = torch.cat([h[:1], h[:-1]])
    total = h + hp
    return torch.stack([h * (2 * h + 3 * hp) / (6 * total), h * (h + 3 * hp) / (6 * hp), -(h**3) / (6 * hp * total)], 1)
