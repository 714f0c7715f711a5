"""Which model a hypersolver's g was fitted on: a digest of the model's weights, and the check that
warns, once per model object, when a fitted hypersolver solves another model.

g learns the residual of one vector field; with other weights its correction means nothing. The
digest covers the parameters and floating-point buffers of the modules a vector field is made of
(a module, a NeuralODE's ``vf``, the modules a callable closes over), by value, so the same model
wrapped differently (``model``, ``model.vf``, ``lambda t, z: net(z)``) has the same digest. It is
computed once per module object and cached (weakly): a solve pays a dictionary lookup, never a pass
over the weights, and nothing per step.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from ._user_model import owned_modules

__all__ = ["update_digest", "weights_digest", "check_model"]

_DIGESTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_WARNED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
_HOLDERS: weakref.WeakKeyDictionary[nn.Module, List[nn.Module]] = weakref.WeakKeyDictionary()


def update_digest(digest, tensor: Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to a ``hashlib`` digest."""
    tensor = tensor.detach()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.device.type != "meta":
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _module_digest(module: nn.Module) -> str:
    cached = _DIGESTS.get(module)
    if cached is None:
        digest = hashlib.sha256()
        for tensor in _tensors(module):
            update_digest(digest, tensor)
        cached = _DIGESTS[module] = digest.hexdigest()
    return cached


def _modules(f: Callable) -> List[nn.Module]:
    """The outermost modules holding the weights ``f`` is made of (a module inside another one found
    is left out). A module without tensors, such as torchdyn's ``DEFunc`` around a plain function, is
    looked through: the modules its (and its submodules') callable attributes reach count instead.
    Found once per module object (a module's own structure is taken as fixed)."""
    if isinstance(f, nn.Module):
        found = _HOLDERS.get(f)
        if found is None:
            found = _HOLDERS[f] = _search(f)
        return found
    return _search(f)


def _search(f: Callable) -> List[nn.Module]:
    found = []
    for module in owned_modules(f):
        found += _holders(module, depth=3)
    inner = {id(m) for outer in found for m in outer.modules() if m is not outer}
    unique = {id(m): m for m in found if id(m) not in inner}
    return list(unique.values())


def _tensors(module: nn.Module) -> List[Tensor]:
    """A module's floating parameters and buffers, less the placeholder torchdyn adds to a field without
    parameters (``dummy_parameter``, not part of the model)."""
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    return [t for name, t in named if t.is_floating_point() and not name.endswith("dummy_parameter")]


def _holders(module: nn.Module, depth: int) -> List[nn.Module]:
    if _tensors(module):
        return [module]
    if depth == 0:
        return []
    found = []
    for sub in module.modules():
        for value in list(vars(sub).values()):
            if callable(value) and not isinstance(value, nn.Module):
                found += [m for held in owned_modules(value) if held is not sub for m in _holders(held, depth - 1)]
    return found


def weights_digest(f: Callable, cached: bool = False) -> Optional[str]:
    """The digest of the weights ``f`` is made of (None when it holds no module). ``cached``: reuse a
    module's digest computed before (what a solve's check does); fitting computes it afresh."""
    modules = _modules(f)
    if not modules:
        return None
    if not cached:
        for module in modules:
            _DIGESTS.pop(module, None)
    parts = sorted(_module_digest(m) for m in modules)
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()


def check_model(solver, f: Callable) -> Optional[str]:
    """A sentence saying that ``solver``'s g was fitted on another model than ``f`` (warn once per
    model object: None on later calls), or None when it was fitted on this one or nothing is known."""
    validity = getattr(solver, "validity", None)
    fitted = getattr(validity, "model", None)
    if fitted is None:
        return None
    modules = _modules(f)
    if not modules:
        return None
    current = weights_digest(f, cached=True)
    if current == fitted:
        return None
    warned = _WARNED.setdefault(modules[0], set())
    if fitted in warned:
        return None
    warned.add(fitted)
    return (
        f"{type(solver).__name__}'s g was fitted on a model with other weights (digest {fitted[:12]}, this one "
        f"{current[:12]}): its correction is that model's, not this one's; fit g on this model (tune or fit). "
        "(Shown once per model object.)"
    )
