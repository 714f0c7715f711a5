"""Reference trajectories harvested from a user's model, the data a hypersolver is fitted on."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import check_int
from ._files import check_folder, read_plain, write_atomic
from ._mesh import check_t_span, mesh_union
from ._model_identity import update_digest
from ._precision import FLOAT64_BELOW, float64_field, precise_tolerance
from ._reference import NonFiniteSolveError, Reference, reference_solve
from ._solver_names import resolve_base
from ._user_model import closure_state, module_device, owned_modules, preserved, resolve_model

__all__ = ["NonFiniteSolveError", "Reference", "Trajectories", "harvest", "reference_solve"]

_FORMAT = 1


@dataclass
class Trajectories:
    """Reference solutions on one or several meshes.

    Attributes:
        t: ``[T]`` the union of all meshes' time points, in the order of integration.
        states: ``[T, N, ...]`` the reference states at ``t`` for ``N`` trajectories.
        meshes: step count -> indices into ``t`` of that mesh's points.
        f: the vector field ``f(t, z)`` that generated them (not saved to disk).
        reference, atol, rtol: how they were solved; ``states.dtype`` is the reference's
            precision (float64 when ``harvest(..., base=...)`` chose it for the base's order).
        fingerprint: what :func:`harvest` made them from (digests of f's parameters and buffers
            and of the initial states; reference, tolerances, dtype, state shape, meshes), or
            None for trajectories made by hand. ``harvest(cache=...)`` reuses a file only when
            its fingerprint matches, and ``fit`` checks the targets' noise only when it is set
            (the reference solver is then known).
    """

    t: Tensor
    states: Tensor
    meshes: Dict[int, Tensor]
    f: Optional[Callable] = field(default=None, repr=False)
    reference: str = "torchdiffeq:dopri5"
    atol: float = 1e-6
    rtol: float = 1e-6
    fingerprint: Optional[Dict[str, str]] = field(default=None, repr=False)

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

    def replace(self, **changes) -> Trajectories:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def select(self, index: Union[slice, Tensor]) -> Trajectories:
        """A subset of the trajectories (e.g. a held-out split)."""
        states = self.states[:, index]
        return self.replace(states=states, fingerprint=_derived(self.fingerprint, "a subset", states.shape[1]))

    def to(self, device) -> Trajectories:
        """The same trajectories on ``device``."""
        return self.replace(t=self.t.to(device), states=self.states.to(device))

    def extend(self, other: Trajectories) -> Trajectories:
        """These trajectories followed by ``other``'s (same time points); this one's f."""
        if other.states.shape[0] != self.states.shape[0] or other.state_shape != self.state_shape:
            raise ValueError(
                f"cannot join trajectories of shape {tuple(other.states.shape)} to {tuple(self.states.shape)}"
            )
        states = torch.cat([self.states, other.states.to(self.states)], 1)
        return self.replace(states=states, fingerprint=_derived(self.fingerprint, "an extension", states.shape[1]))

    def save(self, path: Union[str, os.PathLike], force: bool = False) -> None:
        """Write to ``path`` atomically (the vector field is not saved; a symlink is followed; a replaced
        file keeps its permissions, a read-only one is refused unless ``force``)."""
        write_atomic(
            {
                "format": _FORMAT,
                "t": self.t.cpu(),
                "states": self.states.cpu(),
                "meshes": {int(k): v.cpu() for k, v in self.meshes.items()},
                "reference": self.reference,
                "atol": self.atol,
                "rtol": self.rtol,
                "fingerprint": dict(self.fingerprint) if self.fingerprint is not None else None,
            },
            path,
            force=force,
        )

    @classmethod
    def load(cls, path: Union[str, os.PathLike], f: Optional[Callable] = None, map_location=None) -> Trajectories:
        """Read a file written by :meth:`save`; pass the vector field ``f`` to fit on it.

        Raises:
            ValueError: the file is truncated, corrupt, or not a trajectories file."""
        blob = read_plain(path, map_location, "a trajectories file")
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!s} is not a trajectories file of format {_FORMAT}")
        fields = {
            "t": Tensor,
            "states": Tensor,
            "meshes": dict,
            "reference": str,
            "atol": numbers.Real,
            "rtol": numbers.Real,
        }
        wrong = [k for k, kind in fields.items() if not isinstance(blob.get(k), kind)]
        if wrong:
            raise ValueError(f"{os.fspath(path)!s} is corrupt: its fields {wrong} are missing or ill-typed")
        fingerprint = blob.get("fingerprint")
        if not (isinstance(fingerprint, dict) and all(isinstance(v, str) for v in fingerprint.values())):
            fingerprint = None
        return cls(
            blob["t"], blob["states"], blob["meshes"], f, blob["reference"], blob["atol"], blob["rtol"], fingerprint
        )


def _derived(fingerprint: Optional[Dict[str, str]], how: str, count: int) -> Optional[Dict[str, str]]:
    """The fingerprint of trajectories derived from harvested ones: same f, reference and
    tolerances, other initial states (so a cache never mistakes them for the harvest)."""
    if fingerprint is None:
        return None
    return dict(fingerprint, inputs=f"{how} of {fingerprint.get('inputs')}", trajectories=str(count))


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
    reference: Union[str, Reference] = "dopri5",
    max_trajectories: Optional[int] = None,
    batch_size: int = 256,
    device=None,
    cache: Union[str, os.PathLike, None] = None,
    base=None,
    **tolerances: Optional[float],
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
        reference: an accurate adaptive solver by name (``'dopri5'``, ``'torchdyn:tsit5'``, ...; see
            docs/solver-names.md) or a :class:`Reference` with its tolerances.
        atol, rtol: (keywords) the reference's tolerances; those not given are 1e-6 without ``base``
            and chosen for the base with it.
        base: the hypersolver to be fitted, or its base solver (a name, a tableau, a solver). Its
            residual targets are divided by ``dt**(p+1)``, and so is the reference's error: with
            ``base`` known, a tolerance not given is chosen to keep the reference error about 1% of
            the targets on the finest mesh (about ``1e-3 * dt_min**(p+1) * |R| / (1 + |z|)``, ``|R|``
            estimated by step doubling, clamped to ``[1e-12, 1e-6]``), and the reference is solved in
            float64 (f on a float64 copy, never the user's model) when that tolerance is below 1e-7 or
            the order is 2 or more. The trajectories are then float64; ``fit`` casts what g sees back.
        max_trajectories: stop after this many trajectories (a positive integer).
        batch_size: how many initial states are solved together (a positive integer).
        device: where the trajectories are kept (default: where the model computes).
        cache: a file; reused when it exists and was made from the same request (a
            fingerprint of f's parameters and buffers, the initial states, reference,
            tolerances, dtype, state shape and meshes); recomputed and overwritten, with a
            ``UserWarning`` saying what differs, otherwise. A file holding other meshes, or one
            that cannot be read, is refused (``ValueError``). A shuffling ``DataLoader``
            gives other inputs every time: pass ``shuffle=False`` to reuse a cache.

    The model's training mode, solver setting, parameters and NFE counter are left as they were.
    A module is the preferred form of ``f``: a plain callable is called as ``f(t, z)``, and the
    modules it reaches (closure cells, a bound method's object, ``functools.partial``
    arguments, module-level names in its code) are frozen in eval mode and restored the same
    way, but a module held elsewhere is invisible to harvest.

    Raises:
        ValueError: non-finite initial states (naming the batch and rows), an empty tensor of
            inputs, ``max_trajectories`` or ``batch_size`` below 1, step counts that are not
            positive integers, a cache holding other meshes or that cannot be read.
        TypeError: initial states that are not float32 / float64 (integers, bool, complex,
            float16, bfloat16), or a callable that cannot be called as ``f(t, z)``.
    """
    f, initial_state, module = resolve_model(model)
    chosen = Reference.of(reference, **tolerances)
    reference, atol, rtol = chosen.full_name, chosen.atol, chosen.rtol
    batch_size = check_int(batch_size, "batch_size")
    if max_trajectories is not None:
        max_trajectories = check_int(max_trajectories, "max_trajectories")
    tableau = resolve_base(base) if base is not None else None
    t, meshes = _harvest_times(t_span, steps)
    if cache is not None:
        check_folder(cache)  # before the solves, not after
    if isinstance(inputs, Tensor) and inputs.numel() == 0:
        raise ValueError(f"harvest got an empty tensor of inputs (shape {tuple(inputs.shape)}): no initial states")
    owned = owned_modules(model)
    with preserved(*owned), torch.no_grad():
        z0s, inputs_digest = _initial_states(inputs, initial_state, module, batch_size, max_trajectories)
        field, atol, rtol = _reference_settings(f, z0s, t, meshes, tableau, atol, rtol)
        fingerprint = _fingerprint(f, owned, z0s, inputs_digest, field, reference, atol, rtol, t, meshes)
        if cache is not None and os.path.exists(cache):
            loaded = _read_cache(cache, f, device, t, meshes, fingerprint)
            if loaded is not None:
                return loaded
        kept: List[Tensor] = []
        for z0 in z0s:
            if field is None:
                states = reference_solve(f, z0, t, reference, atol, rtol)
            else:
                states = reference_solve(field, z0.double(), t, reference, atol, rtol)
            kept.append(states if device is None else states.to(device))
    states = torch.cat(kept, dim=1)
    result = Trajectories(t.to(states), states, meshes, f, reference, atol, rtol, fingerprint)
    if cache is not None:
        result.save(cache)
    return result


def _fingerprint(f, owned, z0s: List[Tensor], inputs_digest: str, field, reference: str, atol, rtol, t, meshes):
    """What a harvest is made from: digests of f and the initial states; reference, tolerances,
    dtype, state shape, count and meshes (``Trajectories.fingerprint``)."""
    return {
        "f": _model_digest(f, owned),
        "inputs": inputs_digest,
        "reference": reference,
        "atol": repr(atol),
        "rtol": repr(rtol),
        "dtype": str(z0s[0].dtype if field is None else torch.float64),
        "state_shape": str(tuple(z0s[0].shape[1:])),
        "trajectories": str(sum(z0.shape[0] for z0 in z0s)),
        "mesh": _mesh_digest(t, meshes),
    }


def _harvest_times(t_span, steps: Optional[Sequence[int]]) -> Tuple[Tensor, Dict[int, Tensor]]:
    """The times a harvest solves at (float64) and each mesh's indices into them: ``t_span`` itself
    without ``steps``, else the union of the uniform meshes of ``steps`` steps over its ends."""
    t_span = check_t_span(t_span)
    if steps is None:
        return t_span.to(torch.float64), {len(t_span) - 1: torch.arange(len(t_span))}
    return mesh_union(float(t_span[0]), float(t_span[-1]), steps)


def _reference_settings(f, z0s: List[Tensor], t: Tensor, meshes, tableau, atol, rtol):
    """``(float64 f or None, atol, rtol)``: today's 1e-6 without a base; with one, the
    tolerances not given follow the precision rule (1% of the residual targets) and the reference is
    solved in float64 (f in float64: the first item) when the base needs it."""
    if tableau is None:
        return None, 1e-6 if atol is None else atol, 1e-6 if rtol is None else rtol
    field = None
    if z0s[0].dtype != torch.float64:
        field = float64_field(f, float(t[0]), z0s[0][:2])
    probe_f, probe_z = (f, z0s[0]) if field is None else (field, z0s[0].double())
    tol = None
    if atol is None or rtol is None:
        tol, _ = precise_tolerance(probe_f, probe_z, t, meshes, tableau)
    atol, rtol = tol if atol is None else atol, tol if rtol is None else rtol
    if field is not None and not (min(atol, rtol) < FLOAT64_BELOW or tableau.order >= 2):
        field = None  # the base's own precision is enough: keep the model's dtype
    return field, atol, rtol


_FINGERPRINT_TEXT = {
    "f": "the vector field's parameters or buffers (or the vector field itself)",
    "inputs": "the inputs",
    "reference": "the reference solver",
    "atol": "atol",
    "rtol": "rtol",
    "dtype": "the dtype",
    "state_shape": "the state shape",
    "trajectories": "the number of trajectories",
    "mesh": "the meshes",
}


def _read_cache(cache, f, device, t: Tensor, meshes, fingerprint: Dict[str, str]) -> Optional[Trajectories]:
    """The cached trajectories when they were made from the same request; None (with a
    ``UserWarning`` saying what differs) when they must be recomputed."""
    try:
        loaded = Trajectories.load(cache, f=f, map_location=device)
    except ValueError as err:
        raise ValueError(f"cache {os.fspath(cache)!s} cannot be used: {err}; delete it or pick another file") from err
    if set(loaded.meshes) != set(meshes) or loaded.t.shape != t.shape or not torch.allclose(loaded.t.double(), t):
        raise ValueError(
            f"cache {cache} holds meshes {loaded.steps} on [{float(loaded.t[0])}, {float(loaded.t[-1])}], "
            f"not the requested {sorted(meshes)} on [{float(t[0])}, {float(t[-1])}]; delete it or pick another file"
        )
    stored = loaded.fingerprint
    if stored == fingerprint:
        return loaded
    if stored is None:
        why = "it records no fingerprint of what it was made from (written by an older version)"
    else:
        differ = [text for key, text in _FINGERPRINT_TEXT.items() if stored.get(key) != fingerprint.get(key)]
        why = f"this request differs from the one it was made from in {', '.join(differ) or 'its settings'}"
    warnings.warn(f"harvest cache {os.fspath(cache)!s} is recomputed and overwritten: {why}", UserWarning, stacklevel=3)
    return None


_HARVEST_DTYPES = (torch.float32, torch.float64)


def _initial_states(inputs, initial_state, module, batch_size: int, max_trajectories: Optional[int]):
    """The initial states of every batch (at most ``max_trajectories`` in all), each checked
    (dtype, finite), and a digest of them all."""
    digest = hashlib.sha256()
    z0s: List[Tensor] = []
    count = 0
    for b, x in enumerate(_batches(inputs, batch_size)):
        if not isinstance(x, Tensor):
            raise TypeError(f"harvest reads batches of tensors, got a {type(x).__name__} in batch {b}")
        x = x.to(module_device(module, x.device))
        z0 = initial_state(x)
        if max_trajectories is not None:
            z0 = z0[: max_trajectories - count]
        if z0.dim() == 0 or z0.shape[0] == 0:
            continue
        if z0.dtype not in _HARVEST_DTYPES:
            why = (
                "an adaptive reference solver cannot reach its tolerances in half precision"
                if z0.is_floating_point()
                else "an ODE's states must be real floating-point numbers"
            )
            raise TypeError(
                f"harvest needs initial states of dtype float32 or float64, got {z0.dtype} (batch {b}): {why}; "
                "cast the inputs (x.float() or x.double())"
            )
        bad = ~torch.isfinite(z0.reshape(z0.shape[0], -1)).all(1)
        if bool(bad.any()):  # one check per batch, before anything is solved
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"harvest got non-finite (nan or inf) initial states in batch {b} (counting from 0, batches of "
                f"{batch_size}): rows {rows[:10]} of that batch (rows {[count + r for r in rows[:10]]} counting "
                f"all inputs), {len(rows)} in all; an adaptive reference solver cannot integrate them: "
                "remove or repair those inputs"
            )
        update_digest(digest, z0)
        z0s.append(z0)
        count += z0.shape[0]
        if max_trajectories is not None and count >= max_trajectories:
            break
    if not z0s:
        raise ValueError("harvest got no inputs")
    return z0s, digest.hexdigest()


def _model_digest(f: Callable, owned: List[torch.nn.Module]) -> str:
    """A digest of the vector field: its type or code, and the names and bytes of the parameters
    and buffers of the modules (and tensors) it is made of."""
    digest = hashlib.sha256()
    code = getattr(f, "__code__", None)
    digest.update(f"{type(f).__module__}.{type(f).__qualname__}:{getattr(f, '__qualname__', '')}".encode())
    if code is not None:
        _update_code(digest, code)
    for value in _plain_values(f):
        digest.update(repr(value).encode())
    tensors = closure_state(f)[1] if not isinstance(f, torch.nn.Module) else []
    for module in owned:
        digest.update(f"module {type(module).__qualname__}".encode())
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            digest.update(name.encode())
            update_digest(digest, tensor)
    for tensor in tensors:
        update_digest(digest, tensor)
    return digest.hexdigest()


_PLAIN = (int, float, complex, str, bool, type(None))


def _plain_values(f: Callable) -> List:
    """The numbers and strings a callable closes over or is partially applied to (a
    ``lambda t, z: -k * z`` is another field for another ``k``)."""
    if isinstance(f, functools.partial):
        return [v for v in (*f.args, *f.keywords.values()) if isinstance(v, _PLAIN)] + _plain_values(f.func)
    values = []
    for cell in getattr(f, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _PLAIN):
            values.append(value)
    return values


def _update_code(digest, code) -> None:
    """A function's bytecode, constants and names (nested code objects by content, not address)."""
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _update_code(digest, const)
        else:
            digest.update(repr(const).encode())


def _mesh_digest(t: Tensor, meshes: Dict[int, Tensor]) -> str:
    digest = hashlib.sha256()
    update_digest(digest, t.double())
    for n in sorted(meshes):
        digest.update(str(n).encode())
        update_digest(digest, meshes[n])
    return digest.hexdigest()
