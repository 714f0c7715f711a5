"""Harvests split into shards across the ranks of a ``torch.distributed`` job: resumable and streamed.

:func:`harvest_shards` cuts the inputs into shards of ``shard_size`` trajectories; shard ``k`` is solved
by rank ``k % world_size`` with :func:`~.harvest.harvest` itself and written to ``folder`` atomically with
a record of the request it was made from. A harvest started again after a failure (a killed rank, a lost
machine) skips the shards that are complete and were made by the same request. The shards stay on disk:
:class:`ShardedTrajectories` reads them one at a time (``fit(hs, sharded)`` computes the residual targets
shard by shard) or joins them (``.load()``) into the :class:`~.harvest.Trajectories` a single-process
harvest of the same inputs gives, bit for bit when the shards hold whole batches.

Without an initialised process group everything runs in this process. :func:`split_across_ranks` (or
:func:`take_turns`) and :func:`gather_fitted` share out other work (fitting candidates) and give every rank
the results.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_int
from ._files import read_plain, write_atomic, write_text_atomic
from ._model_identity import update_digest
from ._optimisation import fitting, resolve_recipe
from ._reference import Reference
from ._solver_names import resolve_base
from ._user_model import owned_modules, preserved, resolve_model
from ._workers import claim_next
from .fit import (
    FitReport,
    ResidualData,
    _balance,
    _check_compatible,
    _check_finite,
    _optimise,
    _placed,
    _residual_errors,
    _target_noise,
    _warn_noise,
    residual_data,
    residual_loss,
)
from .harvest import (
    _FINGERPRINT_TEXT,
    Trajectories,
    _fingerprint,
    _harvest_times,
    _initial_states,
    _reference_settings,
    harvest,
)
from .solvers import HyperSolver
from .validity import Validity

__all__ = [
    "ShardedTrajectories",
    "fit_shards",
    "gather_fitted",
    "harvest_across_ranks",
    "harvest_shards",
    "owners",
    "rank_and_world_size",
    "split_across_ranks",
    "take_turns",
]

_FORMAT = 1
INDEX = "harvest-index.pt"


def rank_and_world_size() -> Tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if rank_and_world_size()[1] > 1:
        dist.barrier()


def _shard_path(folder: Union[str, os.PathLike], k: int) -> str:
    """The file of shard ``k``; its record is the same name ending in ``.json``."""
    return os.path.join(os.fspath(folder), f"shard-{k:05d}.pt")


def _record_path(folder, k: int) -> str:
    return _shard_path(folder, k)[: -len(".pt")] + ".json"


@dataclass
class _Request:
    """What every rank computes before solving: the tolerances (chosen once, on the first batch of all the
    inputs, as a plain harvest chooses them), the fingerprint of the whole harvest and of every shard."""

    f: Callable
    reference: Reference
    t: Tensor
    meshes: Dict[int, Tensor]
    fingerprint: Dict[str, str]
    bounds: List[Tuple[int, int]]
    shard_prints: List[Dict[str, str]]


def _request(model, inputs, t_span, steps, reference, batch_size: int, shard_size: int, base, tolerances) -> _Request:
    f, initial_state, module = resolve_model(model)
    chosen = Reference.of(reference, **tolerances)
    tableau = resolve_base(base) if base is not None else None
    t, meshes = _harvest_times(t_span, steps)
    owned = owned_modules(model)
    with preserved(*owned), torch.no_grad():
        z0s, digest = _initial_states(inputs, initial_state, module, batch_size, None)
        field, atol, rtol = _reference_settings(f, z0s, t, meshes, tableau, chosen.atol, chosen.rtol)
        if tableau is not None and None in (chosen.atol, chosen.rtol) and rank_and_world_size()[1] > 1:
            chosen_tolerances = [(atol, rtol)]  # rank 0's choice on every rank (GPUs need not agree to the bit)
            dist.broadcast_object_list(chosen_tolerances, src=0)
            field, atol, rtol = _reference_settings(f, z0s, t, meshes, tableau, *chosen_tolerances[0])
        whole = _fingerprint(f, owned, z0s, digest, field, chosen.full_name, atol, rtol, t, meshes)
    counts = [z0.shape[0] for z0 in z0s]
    if sum(counts) != inputs.shape[0] or any(
        c != inputs[i : i + batch_size].shape[0] for i, c in zip(range(0, inputs.shape[0], batch_size), counts)
    ):
        raise ValueError(
            f"the model maps {inputs.shape[0]} inputs to {sum(counts)} initial states: a sharded harvest needs "
            "one initial state per input row"
        )
    per_shard = shard_size // batch_size
    bounds, prints = [], []
    for first in range(0, len(z0s), per_shard):
        group = z0s[first : first + per_shard]
        h = hashlib.sha256()
        for z0 in group:
            update_digest(h, z0)
        start = first * batch_size
        bounds.append((start, start + sum(z.shape[0] for z in group)))
        prints.append(dict(whole, inputs=h.hexdigest(), trajectories=str(bounds[-1][1] - start)))
    used = Reference(chosen.solver, atol=atol, rtol=rtol)
    return _Request(f, used, t.to(z0s[0].dtype if field is None else torch.float64), meshes, whole, bounds, prints)


def harvest_shards(
    model,
    inputs: Tensor,
    t_span,
    folder: Union[str, os.PathLike],
    shard_size: Optional[int] = None,
    steps: Optional[Sequence[int]] = None,
    reference: Union[str, Reference] = "dopri5",
    batch_size: int = 256,
    base=None,
    **tolerances: Optional[float],
) -> ShardedTrajectories:
    """:func:`~.harvest.harvest` the inputs shard by shard into ``folder``, across the ranks of the
    process group (every rank calls it with the same arguments; alone, this process does all).

    Shard ``k`` holds inputs ``[k * shard_size, (k + 1) * shard_size)`` and is solved by rank
    ``k % world_size`` (the model where each rank placed it); it is written atomically, then its record
    (``shard-0000k.json``: the fingerprint of the request, as a harvest cache holds it). A shard whose
    record matches the request is skipped, not solved again: after a failure, run the same command
    again. A record of another request is recomputed with a ``UserWarning`` saying what differs; one of
    other meshes is refused (``ValueError``), as ``harvest(cache=...)`` does. The tolerances not given
    are chosen once, on the first batch of all the inputs, as a plain harvest chooses them.

    Args:
        inputs: a tensor (``N`` rows: one initial state per row after the layers before the ODE).
        folder: where the shards go (created if missing; on a file system every rank sees).
        shard_size: trajectories per shard, a multiple of ``batch_size`` (default ``batch_size``):
            the shards then solve exactly the batches a plain harvest solves.
        model, t_span, steps, reference, batch_size, base, atol, rtol: as :func:`~.harvest.harvest`.

    Returns:
        a :class:`ShardedTrajectories` view of the folder, on every rank, once every shard is written.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"harvest_shards takes the inputs as a tensor, got a {type(inputs).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"harvest_shards got no inputs (a tensor of shape {tuple(inputs.shape)})")
    batch_size = check_int(batch_size, "batch_size")
    shard_size = batch_size if shard_size is None else check_int(shard_size, "shard_size")
    if shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size})")
    os.makedirs(folder, exist_ok=True)
    request = _request(model, inputs, t_span, steps, reference, batch_size, shard_size, base, tolerances)
    _check_same_request(request.fingerprint)
    rank, world = rank_and_world_size()
    stale = {k: why for k, prints in enumerate(request.shard_prints) if (why := _stale(folder, k, prints)) is not None}
    _barrier()  # every rank has read the records (and refused the same folders) before any is rewritten
    index = os.path.join(os.fspath(folder), INDEX)
    if rank == 0 and stale:
        _warn_stale(folder, stale)
        if os.path.exists(index):
            os.remove(index)  # until every shard is this request's, the folder is an unfinished harvest
    for k in stale:
        if k % world == rank:
            _solve_shard(folder, k, request, model, inputs, t_span, steps, batch_size, base)
    _barrier()
    if rank == 0:
        _write_index(folder, request)
    _barrier()
    return ShardedTrajectories(folder, f=request.f)


def _check_same_request(fingerprint: Dict[str, str]) -> None:
    """Refuse ranks that were given different requests (inputs drawn at random on each rank, other weights)."""
    rank, world = rank_and_world_size()
    if world == 1:
        return
    prints: List[Optional[Dict[str, str]]] = [None] * world
    dist.all_gather_object(prints, fingerprint)
    differ = [r for r, other in enumerate(prints) if other != prints[0]]
    if differ:
        what = [text for key, text in _FINGERPRINT_TEXT.items() if prints[differ[0]].get(key) != prints[0].get(key)]
        raise ValueError(
            f"the ranks {differ} were given another request than rank 0 (they differ in {', '.join(what)}): every "
            "rank must call harvest_shards with the same model weights, inputs and settings"
        )


def _stale(folder, k: int, expected: Dict[str, str]) -> Optional[str]:
    """None when shard ``k`` was written for this request (its record says so); else why it is solved:
    ``''`` when it is missing, what differs when its record is of another request (other meshes: a
    ``ValueError``)."""
    record_path = _record_path(folder, k)
    if not (os.path.exists(record_path) and os.path.exists(_shard_path(folder, k))):
        return ""
    try:
        with open(record_path, encoding="utf-8") as handle:
            stored = json.load(handle)["fingerprint"]
        stored = dict(stored)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its record is unreadable ({err})"
    if stored == expected:
        return None
    if stored.get("mesh") != expected["mesh"]:
        raise ValueError(
            f"{record_path} records a shard of other meshes than the requested ones; pick another folder, "
            "or delete its shards"
        )
    differ = [text for key, text in _FINGERPRINT_TEXT.items() if stored.get(key) != expected.get(key)]
    return f"the request differs from the one it was made from in {', '.join(differ) or 'its settings'}"


def _warn_stale(folder, stale: Dict[int, str]) -> None:
    """One warning for the shards of another request that are recomputed."""
    why = {k: text for k, text in stale.items() if text}
    if why:
        first = min(why)
        warnings.warn(
            f"{len(why)} shards of {os.fspath(folder)!s} (shard {first} first) are recomputed and overwritten: "
            f"{why[first]}",
            UserWarning,
            stacklevel=3,
        )


def _solve_shard(folder, k: int, request: _Request, model, inputs, t_span, steps, batch_size: int, base) -> None:
    """Solve shard ``k`` with :func:`~.harvest.harvest` and write it, then its record (the commit mark)."""
    record_path = _record_path(folder, k)
    if os.path.exists(record_path):
        os.remove(record_path)  # the shard is about to change: never a record of another request beside it
    start, stop = request.bounds[k]
    part = harvest(
        model, inputs[start:stop], t_span, steps=steps, reference=request.reference, batch_size=batch_size, base=base
    )
    if part.fingerprint != request.shard_prints[k]:
        raise RuntimeError(
            f"shard {k}: the model gave other initial states for inputs {start}:{stop} alone than with all the "
            "inputs (layers before the ODE that mix the rows of a batch?); a sharded harvest cannot split it"
        )
    part.save(_shard_path(folder, k))
    record = {"format": _FORMAT, "shard": k, "start": start, "stop": stop, "fingerprint": request.shard_prints[k]}
    write_text_atomic(json.dumps(record, indent=1), record_path)


def _write_index(folder, request: _Request) -> None:
    write_atomic(
        {
            "format": _FORMAT,
            "t": request.t,
            "meshes": {int(n): idx for n, idx in request.meshes.items()},
            "reference": request.reference.full_name,
            "atol": request.reference.atol,
            "rtol": request.reference.rtol,
            "fingerprint": request.fingerprint,
            "bounds": [list(b) for b in request.bounds],
            "shards": request.shard_prints,
        },
        os.path.join(os.fspath(folder), INDEX),
    )


class ShardedTrajectories:
    """The trajectories of a :func:`harvest_shards` folder, read from disk a shard at a time.

    ``len`` (trajectories), ``t``, ``meshes``, ``steps``, ``state_shape``, ``dtype``, ``fingerprint`` (the
    one a plain harvest of the same inputs records) are those of the whole harvest; ``shard(k)`` and
    iteration give each shard as a :class:`~.harvest.Trajectories` (checked against the index: a shard
    written by another request is a ``ValueError``); ``load()`` joins them. ``fit(hs, sharded)`` fits on
    them shard by shard (:func:`fit_shards`).
    """

    def __init__(self, folder: Union[str, os.PathLike], f: Optional[Callable] = None):
        self.folder, self.f = os.fspath(folder), f
        path = os.path.join(self.folder, INDEX)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} does not exist: the sharded harvest in {self.folder} is not complete; "
                "run harvest_shards again with the same arguments"
            )
        index = read_plain(path, None, "a sharded harvest's index")
        if not isinstance(index, dict) or index.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a sharded harvest index of format {_FORMAT}")
        self.t: Tensor = index["t"]
        self.meshes: Dict[int, Tensor] = index["meshes"]
        self.reference, self.atol, self.rtol = index["reference"], index["atol"], index["rtol"]
        self.fingerprint: Dict[str, str] = index["fingerprint"]
        self.bounds: List[Tuple[int, int]] = [tuple(b) for b in index["bounds"]]
        self._prints: List[Dict[str, str]] = index["shards"]

    def __len__(self) -> int:
        return self.bounds[-1][1]

    @property
    def num_shards(self) -> int:
        """How many shards the harvest has."""
        return len(self.bounds)

    @property
    def steps(self) -> List[int]:
        """The step counts of the meshes, ascending."""
        return sorted(self.meshes)

    @property
    def state_shape(self) -> Tuple[int, ...]:
        """Shape of one state."""
        return tuple(int(n) for n in self.fingerprint["state_shape"].strip("(),").split(",") if n.strip())

    @property
    def dtype(self) -> torch.dtype:
        """The states' dtype."""
        return self.t.dtype

    def shard(self, k: int, map_location=None) -> Trajectories:
        """Shard ``k`` (with this view's ``f``), read from disk."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range: the harvest has {self.num_shards} shards")
        part = Trajectories.load(_shard_path(self.folder, k), f=self.f, map_location=map_location)
        if part.fingerprint != self._prints[k]:
            raise ValueError(
                f"{_shard_path(self.folder, k)} was written by another request than the index of {self.folder}: "
                "run harvest_shards again with the arguments you mean"
            )
        return part

    def __iter__(self) -> Iterator[Trajectories]:
        for k in range(self.num_shards):
            yield self.shard(k)

    def load(self, map_location=None) -> Trajectories:
        """All the shards as one :class:`~.harvest.Trajectories` (in memory), equal to a plain harvest."""
        states = None
        for k, part in enumerate(self):
            if states is None:  # one allocation, filled shard by shard: never twice the harvest in memory
                states = torch.empty((part.states.shape[0], len(self), *part.state_shape), dtype=part.states.dtype)
            start, stop = self.bounds[k]
            states[:, start:stop] = part.states
        t = self.t.to(states)
        result = Trajectories(
            t, states, dict(self.meshes), self.f, self.reference, self.atol, self.rtol, dict(self.fingerprint)
        )
        return result if map_location is None else result.to(map_location)

    def _outline(self) -> Trajectories:
        """Shard 0's first trajectory standing for the whole harvest (its length is the harvest's): for
        what reads only the count, shapes and meshes (the validity record)."""
        first = self.shard(0)
        return _Outline(
            first.t,
            first.states[:, :1].clone(),
            first.meshes,
            first.f,
            first.reference,
            first.atol,
            first.rtol,
            dict(self.fingerprint),
            count=len(self),
        )

    def _fit_streamed(self, hs: HyperSolver, **arguments) -> FitReport:
        return fit_shards(hs, self, **arguments)

    def __repr__(self) -> str:
        return (
            f"ShardedTrajectories({self.folder!r}: {len(self)} trajectories in {self.num_shards} shards, "
            f"meshes {self.steps}, states {self.state_shape} {self.dtype})"
        )


@dataclass
class _Outline(Trajectories):
    count: int = 0

    def __len__(self) -> int:
        return self.count


def harvest_across_ranks(
    model, inputs: Tensor, t_span, folder: Union[str, os.PathLike, None] = None, **options
) -> Trajectories:
    """:func:`~.harvest.harvest` (same arguments in ``options``) solved across the ranks of the process group
    when one is initialised, every rank getting the whole result; a plain harvest otherwise.

    Across ranks, the inputs are cut into ``world_size`` shards or more of at most ``batch_size``
    trajectories (batches other than a plain harvest's: equal to it within the reference's tolerance),
    written to ``folder`` (default: a temporary folder, removed after; on several machines, pass a folder
    that every machine sees)."""
    rank, world = rank_and_world_size()
    if world == 1:
        return harvest(model, inputs, t_span, **options)
    unsupported = sorted(set(options) & {"cache", "max_trajectories"})
    if unsupported:
        raise ValueError(f"harvest_across_ranks does not take {unsupported} across ranks")
    device = options.pop("device", None)
    batch = min(options.pop("batch_size", 256), max(1, math.ceil(len(inputs) / world)))
    temporary = folder is None
    if temporary:
        if int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world:
            raise ValueError("harvest_across_ranks on several machines needs a folder that every machine sees")
        names = [tempfile.mkdtemp(prefix="harvest-shards-") if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        folder = names[0]
    sharded = harvest_shards(model, inputs, t_span, folder, shard_size=batch, batch_size=batch, **options)
    result = sharded.load(map_location=device)
    _barrier()
    if temporary and rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def owners(count: int, costs: Optional[Sequence[float]] = None) -> List[int]:
    """The rank that does each of ``count`` items: ``i % world_size``, or with ``costs`` (one estimate per
    item) the costliest first, each to the rank with the least work so far (the same on every rank)."""
    world = rank_and_world_size()[1]
    if costs is None:
        return [i % world for i in range(count)]
    if len(costs) != count:
        raise ValueError(f"owners needs one cost per item: {count} items, {len(costs)} costs")
    load, owner = [0.0] * world, [0] * count
    for i in sorted(range(count), key=lambda i: -costs[i]):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def split_across_ranks(items: Sequence, costs: Optional[Sequence[float]] = None) -> List:
    """This rank's share of ``items`` (all of them alone), as :func:`owners` assigns them."""
    rank = rank_and_world_size()[0]
    items = list(items)
    return [item for item, owner in zip(items, owners(len(items), costs)) if owner == rank]


_turns = itertools.count()  # one shared counter per call of take_turns, numbered alike on every rank


def take_turns(items: Sequence, costs: Optional[Sequence[float]] = None) -> Iterator:
    """This rank's share of ``items``, one at a time. In ``tune(..., workers=n)``'s forked workers each
    rank takes the next item (the costliest first, with ``costs``) as soon as it is free, so that a cost
    misjudged leaves no rank idle; under torchrun, :func:`split_across_ranks`' share; alone, every item.
    Every rank must call it for the same items, in the same order; :func:`gather_fitted` then finds out
    which rank did which."""
    items, counter = list(items), f"take_turns/{next(_turns)}"
    if costs is not None and len(costs) != len(items):
        raise ValueError(f"take_turns needs one cost per item: {len(items)} items, {len(costs)} costs")
    k = claim_next(counter) if rank_and_world_size()[1] > 1 else None
    if k is None:  # alone, or not in forked workers (torchrun): a share fixed in advance
        yield from split_across_ranks(items, costs)
        return
    order = sorted(range(len(items)), key=lambda i: -costs[i]) if costs is not None else range(len(items))
    while k < len(items):
        yield items[order[k]]
        k = claim_next(counter)


def gather_fitted(local: Mapping, keys: Sequence, device=None) -> Dict:
    """Every rank's results, on every rank: ``local`` holds this rank's (``key -> object``, e.g. fitted
    hypersolvers) for its share of ``keys`` (:func:`split_across_ranks`, :func:`take_turns`); each object
    is sent by the rank that holds it to all (pickled with ``torch.save``: modules with their weights and
    attributes), its tensors loaded onto ``device`` (default: as they were). A key no rank holds (skipped)
    is left out everywhere. Returns ``key -> object`` in the order of ``keys``."""
    rank, world = rank_and_world_size()
    if world == 1:
        return {key: local[key] for key in keys if key in local}
    held: List[Optional[List[int]]] = [None] * world
    dist.all_gather_object(held, [i for i, key in enumerate(keys) if key in local])
    holder = {i: r for r in reversed(range(world)) for i in held[r]}  # the lowest rank, should two hold one
    gathered = {}
    for i, key in enumerate(keys):
        if i not in holder:
            continue
        owner, payload = holder[i], [None]
        if rank == owner:
            buffer = io.BytesIO()
            torch.save(local[key], buffer)
            payload = [buffer.getvalue()]
        dist.broadcast_object_list(payload, src=owner)
        if rank == owner:
            gathered[key] = local[key]
        else:  # from a rank of this job, not from a file
            gathered[key] = torch.load(io.BytesIO(payload[0]), map_location=device, weights_only=False)
    return gathered


def fit_shards(
    hs: HyperSolver,
    sharded: ShardedTrajectories,
    method: str = "residual",
    recipe=None,
    device=None,
    progress: bool = True,
    seed: Optional[int] = None,
    noise_sample: int = 8,
    adversarial=None,
    **overrides,
) -> FitReport:
    """Residual fitting of g on a sharded harvest with one shard in memory at a time (what
    ``fit(hs, sharded)`` runs): its residual targets are computed when it is read.

    A first pass reads every shard once: non-finite values are refused as :func:`~.fit.fit` refuses them,
    and the meshes' weights (``balance_meshes``) and g's output scale are those of all the trajectories.
    Then the batches are drawn shard by shard: the shards in a seeded random order, within a shard its
    trajectories in a random order, ``recipe.batch_size`` at a time, a new batch when :func:`~.fit.fit`
    draws one. The reference's noise is estimated on the first shard. Adversarial search, refinement and
    trajectory fitting need the trajectories in memory: use ``fit(hs, sharded.load())``."""
    recipe = resolve_recipe(recipe, overrides, "fit", positional="iterations")
    if method != "residual" or adversarial is not None or recipe.refine:
        raise ValueError(
            f"a sharded harvest is fitted by residual fitting alone (got method={method!r}, adversarial="
            f"{adversarial!r}, refine={recipe.refine}): use fit(hs, sharded.load()) for the others"
        )
    if sharded.f is None:
        raise ValueError("the sharded trajectories carry no vector field; open with ShardedTrajectories(folder, f)")
    check_int(noise_sample, "noise_sample", minimum=0)
    first, f, params = _placed(hs, sharded.shard(0), device)
    stream = _Stream(hs, sharded, f, first.states.device, recipe, seed)
    with preserved(*owned_modules(f)):
        noise = stream.survey(first, noise_sample)
        _warn_noise(noise, first, noise_sample)
        with fitting(hs, keep=owned_modules(f)):
            history = _optimise(params, stream.loss_at, recipe, method, progress)
        residual_error, base_error = stream.errors()
    report = FitReport(method, recipe.iterations, stream.elapsed(), history, residual_error, base_error, [], noise)
    record = Validity.of_trajectories(sharded._outline(), how=report.describe())
    hs.validity = record.with_state_range(stream.state_range)  # the range of all the shards' states
    return report


class _Stream:
    """The shard in memory, its residual data, and the batch drawn from it."""

    def __init__(self, hs: HyperSolver, sharded: ShardedTrajectories, f, device, recipe, seed: Optional[int]):
        self.start = time.perf_counter()
        self.hs, self.sharded, self.f, self.device, self.recipe = hs, sharded, f, device, recipe
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.order: List[int] = []  # shards still to visit in this pass
        self.rows: List[Tensor] = []  # batches of the current shard still to draw
        self.data: Optional[ResidualData] = None
        self.index: Optional[Tensor] = None
        self.batch: Optional[ResidualData] = None
        self.weight: Optional[Tensor] = None
        self.state_range: Optional[Tensor] = None  # [2, features]: the smallest and largest state values

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _read(self, k: int) -> Tuple[Trajectories, ResidualData]:
        self.data = None  # the previous shard is released before the next is read
        part = self.sharded.shard(k, map_location=self.device).replace(f=self.f)
        return part, residual_data(self.hs, part, self.f)

    def survey(self, first: Trajectories, noise_sample: int) -> Dict[int, float]:
        """Every shard once: finite and compatible, the per-step mean square of the targets for the meshes'
        weights and g's scale; the reference's noise on the first shard."""
        squares, noise = None, {}
        for k in range(self.sharded.num_shards):
            part, data = (first, residual_data(self.hs, first, self.f)) if k == 0 else self._read(k)
            try:
                _check_finite(part, data)
            except ValueError as err:
                raise ValueError(f"shard {k} ({_shard_path(self.sharded.folder, k)}): {err}") from err
            if k == 0:
                _check_compatible(self.hs, data)
                noise = _target_noise(self.hs, part, data, self.f, noise_sample)
            flat = part.states.reshape(-1, math.prod(self.sharded.state_shape))
            low, high = flat.amin(0), flat.amax(0)
            if k > 0:
                low, high = torch.minimum(low, self.state_range[0]), torch.maximum(high, self.state_range[1])
            self.state_range = torch.stack([low, high])
            step_sums = data.target.flatten(1).square().sum(1)
            squares = step_sums if squares is None else squares + step_sums
            mesh_steps, count = data.mesh_steps, data.target[0].numel() // len(data) * len(self.sharded)
            del part, data
        # one number per step standing for all trajectories: _balance reads only per-step mean squares
        summary = ResidualData(*(None,) * 4, (squares / count).sqrt().unsqueeze(1), mesh_steps)
        self.weight = _balance(self.hs, summary, self.recipe, "residual")
        return noise

    def _next_batch(self) -> None:
        if not self.rows:
            if not self.order:
                self.order = torch.randperm(self.sharded.num_shards, generator=self.generator).tolist()
            _, self.data = self._read(self.order.pop(0))
            perm = torch.randperm(len(self.data), generator=self.generator)
            self.rows = list(perm.split(self.recipe.batch_size))
        self.index = self.rows.pop(0).to(self.device)
        self.batch = self.data.select(self.index)  # gathered once per draw, not once per iteration

    def loss_at(self, i: int) -> Tensor:
        recipe = self.recipe
        if self.index is None or (i >= recipe.warmup and (i - recipe.warmup) % recipe.swap_every == 0):
            self._next_batch()
        return residual_loss(self.hs, self.batch, None, self.weight)

    def errors(self) -> Tuple[Dict[int, float], Dict[int, float]]:
        """Mean ``|g - R|`` and ``|R|`` per mesh over all the shards, one at a time."""
        total_g: Dict[int, float] = {}
        total_r: Dict[int, float] = {}
        for k in range(self.sharded.num_shards):
            _, data = self._read(k)
            share = len(data) / len(self.sharded)
            g_err, r_err = _residual_errors(self.hs, data, max_elements=2**18)
            for n in g_err:
                total_g[n] = total_g.get(n, 0.0) + share * g_err[n]
                total_r[n] = total_r.get(n, 0.0) + share * r_err[n]
        self.data = None
        return total_g, total_r
