"""Reference trajectories harvested from a user's model, the data a hypersolver is fitted on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .mesh import check_t_span
from .models import module_device, preserved, resolve_model
from .reference import check_reference, reference_solve

__all__ = ["Trajectories", "harvest", "mesh_union"]

_FORMAT = 1


@dataclass
class Trajectories:
    """Reference solutions on one or several meshes.

    Attributes:
        t: ``[T]`` the union of all meshes' time points, in the order of integration.
        states: ``[T, N, ...]`` the reference states at ``t`` for ``N`` trajectories.
        meshes: step count -> indices into ``t`` of that mesh's points.
        f: the vector field ``f(t, z)`` that generated them (not saved to disk).
        reference, atol, rtol: how they were solved.
    """

    t: Tensor
    states: Tensor
    meshes: Dict[int, Tensor]
    f: Optional[Callable] = field(default=None, repr=False)
    reference: str = "torchdiffeq:dopri5"
    atol: float = 1e-6
    rtol: float = 1e-6

    def __len__(self) -> int:
        return self.states.shape[1]

    @property
    def state_shape(self) -> Tuple[int, ...]:
        """Shape of one state, ``states.shape[2:]``."""
        return tuple(self.states.shape[2:])

    @property
    def steps(self) -> List[int]:
        """The step counts of the meshes, ascending."""
        return sorted(self.meshes)

    def mesh(self, steps: int) -> Tuple[Tensor, Tensor]:
        """``(t_span, states)`` of the mesh with ``steps`` steps: ``[steps+1]``, ``[steps+1, N, ...]``."""
        if steps not in self.meshes:
            raise KeyError(f"no mesh with {steps} steps; harvested meshes: {self.steps}")
        idx = self.meshes[steps].to(self.states.device)
        return self.t[idx], self.states[idx]

    def select(self, index: Union[slice, Tensor]) -> Trajectories:
        """A subset of the trajectories (e.g. a held-out split)."""
        return Trajectories(self.t, self.states[:, index], self.meshes, self.f, self.reference, self.atol, self.rtol)

    def to(self, device) -> Trajectories:
        return Trajectories(
            self.t.to(device), self.states.to(device), self.meshes, self.f, self.reference, self.atol, self.rtol
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write to ``path`` with ``torch.save`` (the vector field is not saved)."""
        torch.save(
            {
                "format": _FORMAT,
                "t": self.t.cpu(),
                "states": self.states.cpu(),
                "meshes": {int(k): v.cpu() for k, v in self.meshes.items()},
                "reference": self.reference,
                "atol": self.atol,
                "rtol": self.rtol,
            },
            path,
        )

    @classmethod
    def load(cls, path: Union[str, os.PathLike], f: Optional[Callable] = None, map_location=None) -> Trajectories:
        """Read a file written by :meth:`save`; pass the vector field ``f`` to fit on it."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a trajectories file of format {_FORMAT}")
        return cls(blob["t"], blob["states"], blob["meshes"], f, blob["reference"], blob["atol"], blob["rtol"])


def mesh_union(t0: float, t1: float, steps: Sequence[int]) -> Tuple[Tensor, Dict[int, Tensor]]:
    """The union of the uniform meshes with the given step counts on ``[t0, t1]``.

    Points shared by several meshes are stored once (fractions are compared exactly).
    """
    steps = sorted({int(n) for n in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    fractions = sorted({Fraction(i, n) for n in steps for i in range(n + 1)})
    position = {fr: k for k, fr in enumerate(fractions)}
    t = torch.tensor([t0 + float(fr) * (t1 - t0) for fr in fractions], dtype=torch.float64)
    meshes = {n: torch.tensor([position[Fraction(i, n)] for i in range(n + 1)]) for n in steps}
    return t, meshes


def _batches(inputs, batch_size: int) -> Iterable[Tensor]:
    if isinstance(inputs, Tensor):
        yield from inputs.split(batch_size)
        return
    for batch in inputs:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]  # (inputs, labels): labels are ignored
        elif isinstance(batch, dict):
            raise TypeError("harvest reads batches that are tensors or (inputs, labels) pairs, got a dict")
        yield batch


def harvest(
    model,
    inputs,
    t_span,
    steps: Optional[Sequence[int]] = None,
    reference: str = "dopri5",
    atol: float = 1e-6,
    rtol: float = 1e-6,
    max_trajectories: Optional[int] = None,
    batch_size: int = 256,
    device=None,
    cache: Union[str, os.PathLike, None] = None,
) -> Trajectories:
    """Solve the model's ODE accurately from its inputs and keep the trajectories.

    Args:
        model: a torchdyn ``NeuralODE``; a module containing exactly one (the layers that
            run before it map inputs to z(0)); or a vector field ``f(t, z)`` (then
            ``inputs`` are the initial states).
        inputs: a tensor, or an iterable of batches (a ``DataLoader``; labels ignored).
        t_span: the mesh to fit on; with ``steps``, only its endpoints are used and the
            meshes are uniform with those step counts (one g can then serve all of them).
            A decreasing ``t_span`` harvests backward trajectories.
        reference: an accurate adaptive solver, see :data:`REFERENCE_SOLVERS`.
        max_trajectories: stop after this many trajectories.
        device: where the trajectories are kept (default: where the model computes).
        cache: a file; loaded when it exists (it must match the request), written otherwise.

    The model's training mode, solver setting, parameters and NFE counter are left as they were.
    """
    f, initial_state, module = resolve_model(model)
    reference = check_reference(reference)
    t_span = check_t_span(t_span)
    if steps is None:
        t, meshes = t_span.to(torch.float64), {len(t_span) - 1: torch.arange(len(t_span))}
    else:
        t, meshes = mesh_union(float(t_span[0]), float(t_span[-1]), steps)
    if cache is not None and os.path.exists(cache):
        loaded = Trajectories.load(cache, f=f, map_location=device)
        if set(loaded.meshes) != set(meshes) or not torch.allclose(loaded.t.double(), t):
            raise ValueError(
                f"cache {cache} holds meshes {loaded.steps} on [{float(loaded.t[0])}, {float(loaded.t[-1])}], "
                f"not the requested {sorted(meshes)} on [{float(t[0])}, {float(t[-1])}]; delete it or pick another file"
            )
        return loaded

    kept: List[Tensor] = []
    count = 0
    with preserved(module), torch.no_grad():
        for x in _batches(inputs, batch_size):
            x = x.to(module_device(module, x.device))
            z0 = initial_state(x)
            if max_trajectories is not None:
                z0 = z0[: max_trajectories - count]
            states = reference_solve(f, z0, t, reference, atol, rtol)
            kept.append(states if device is None else states.to(device))
            count += z0.shape[0]
            if max_trajectories is not None and count >= max_trajectories:
                break
    if not kept:
        raise ValueError("harvest got no inputs")
    states = torch.cat(kept, dim=1)
    result = Trajectories(t.to(states), states, meshes, f, reference, atol, rtol)
    if cache is not None:
        result.save(cache)
    return result
