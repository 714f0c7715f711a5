"""The user's model as the package sees it: its vector field, the layers that make z(0),
and a guard that leaves it exactly as it was."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchdyn.core import NeuralODE
from torchdyn.core.defunc import DEFunc, DEFuncBase

__all__ = [
    "resolve_model",
    "uncounted_field",
    "preserved",
    "module_device",
    "owned_modules",
    "closure_state",
    "check_vector_field",
    "check_field_output",
]


class _ReachedNeuralODE(Exception):
    """Raised by a pre-hook to stop a forward pass at the NeuralODE's input."""


def _takes_time(fn: Callable) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) == 2


def resolve_model(model) -> Tuple[Callable, Callable[[Tensor], Tensor], Optional[nn.Module]]:
    """``(f, initial_state, module)`` for a NeuralODE, a module holding exactly one, or a vector field.

    ``initial_state(x)`` maps model inputs to z(0): the identity for a NeuralODE or a bare
    vector field; for a larger module, the layers that run before its NeuralODE (e.g.
    ``BatchNorm2d`` and an ``Augmenter``), captured by stopping the forward pass there.
    """
    if isinstance(model, NeuralODE):
        return model.vf, _identity, model
    if isinstance(model, nn.Module):
        nodes = [m for m in model.modules() if isinstance(m, NeuralODE)]
        if len(nodes) > 1:
            names = [name for name, m in model.named_modules() if isinstance(m, NeuralODE)]
            raise ValueError(
                f"{type(model).__name__} contains {len(nodes)} NeuralODEs ({', '.join(names)}); "
                "harvest needs exactly one: pass the NeuralODE itself or a module around one"
            )
        if len(nodes) == 1:
            return nodes[0].vf, _prefix_of(model, nodes[0]), model
        if _takes_time(model):
            return model, _identity, model
        raise ValueError(
            f"{type(model).__name__} contains no NeuralODE and is not a vector field f(t, z); "
            "pass a NeuralODE, a module that contains one, or a vector field"
        )
    if callable(model):
        check_vector_field(model)
        return model, _identity, None
    raise TypeError(f"cannot harvest from {type(model).__name__}")


def check_vector_field(fn: Callable) -> None:
    """Refuse (``TypeError``) a callable that cannot be called as ``f(t, z)`` (a module: its ``forward``)."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin or C extension without a signature: nothing to check
    try:
        signature.bind(0.0, 0.0)
    except TypeError:
        name = f"{type(fn).__name__}.forward" if isinstance(fn, nn.Module) else getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"{name}{signature} is not a vector field f(t, z): it is called with two arguments, the time t "
            "and the state z (write it as def f(t, z) or lambda t, z: net(z), or pass a NeuralODE, which wraps "
            "a module that takes the state only)"
        ) from None


def closure_state(fn: Callable, depth: int = 3) -> Tuple[List[nn.Module], List[Tensor]]:
    """The modules and tensors a callable reaches: its closure cells, a bound method's object, a
    ``functools.partial``'s function and arguments, the attributes of a callable object, and the
    module-level names its code refers to (searched ``depth`` levels deep, through functions)."""
    modules: Dict[int, nn.Module] = {}
    tensors: Dict[int, Tensor] = {}
    seen = set()

    def visit(obj, depth: int) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            modules[id(obj)] = obj
            return
        if isinstance(obj, Tensor):
            tensors[id(obj)] = obj
            return
        if depth < 0:
            return
        if isinstance(obj, (list, tuple)):
            for item in obj[:64]:
                visit(item, depth - 1)
        elif isinstance(obj, dict):
            for item in list(obj.values())[:64]:
                visit(item, depth - 1)
        elif isinstance(obj, functools.partial):
            for item in (obj.func, *obj.args, *obj.keywords.values()):
                visit(item, depth - 1)
        elif inspect.ismethod(obj):
            visit(obj.__self__, depth - 1)
            visit(obj.__func__, depth)
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth - 1)
                except ValueError:  # an empty cell
                    pass
            scope = obj.__globals__
            for name in obj.__code__.co_names:
                value = scope.get(name)
                if isinstance(value, (nn.Module, Tensor, functools.partial)) or inspect.isfunction(value):
                    visit(value, depth - 1)
        elif callable(obj) and hasattr(obj, "__dict__") and not inspect.isclass(obj) and not inspect.ismodule(obj):
            for item in list(vars(obj).values())[:64]:
                visit(item, depth - 1)

    visit(fn, depth)
    return list(modules.values()), list(tensors.values())


def owned_modules(model) -> List[nn.Module]:
    """The user's modules behind ``model``: the module itself, or those a callable closes over
    (see :func:`closure_state`), for :func:`preserved` to freeze and restore."""
    if isinstance(model, nn.Module):
        return [model]
    if callable(model):
        return closure_state(model)[0]
    return []


def module_device(module, default: torch.device) -> torch.device:
    """Where a module's parameters (or buffers) live; ``default`` for anything else."""
    if isinstance(module, nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return default


def _identity(x: Tensor) -> Tensor:
    return x


def _prefix_of(model: nn.Module, node: NeuralODE) -> Callable[[Tensor], Tensor]:
    def initial_state(x: Tensor) -> Tensor:
        captured = {}

        def hook(_module, args):
            captured["z0"] = args[0]
            raise _ReachedNeuralODE

        handle = node.register_forward_pre_hook(hook)
        try:
            model(x)
        except _ReachedNeuralODE:
            pass
        except Exception as err:  # the user's layers rejected x: say which shape
            raise ValueError(
                f"the layers before the NeuralODE rejected inputs of shape {tuple(x.shape)}: {err}"
            ) from err
        finally:
            handle.remove()
        if "z0" not in captured:
            raise ValueError(f"{type(model).__name__}.forward finished without calling its NeuralODE")
        return captured["z0"]

    return initial_state


@contextlib.contextmanager
def preserved(*modules: Optional[nn.Module], freeze: bool = True, restore: bool = False) -> Iterator[None]:
    """Within the block: eval mode, parameters frozen (no gradient), torchdyn NFE counters
    untouched. On exit every training flag, ``requires_grad`` and counter is restored; with
    ``restore``, every parameter and buffer is also put back to its value on entry (a copy is kept),
    so that nothing run inside can leave the user's model changed."""
    modules = [m for m in modules if isinstance(m, nn.Module)]
    training = [(m, m.training) for mod in modules for m in mod.modules()]
    grads = [(p, p.requires_grad) for mod in modules for p in mod.parameters()] if freeze else []
    counters = [(m, m.nfe) for mod in modules for m in mod.modules() if hasattr(m, "nfe")]
    saved = _saved_tensors(modules) if restore else []
    try:
        for mod in modules:
            mod.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in training:
            m.train(flag)
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, nfe in counters:
            m.nfe = nfe
        with torch.no_grad():
            for tensor, value in saved:
                if tensor.shape == value.shape and not torch.equal(tensor, value):
                    tensor.copy_(value)


def _saved_tensors(modules: List[nn.Module]) -> List[Tuple[Tensor, Tensor]]:
    """Every parameter and buffer of ``modules`` (each once) with a copy of its value."""
    seen: Dict[int, Tensor] = {}
    for mod in modules:
        for tensor in (*mod.parameters(), *mod.buffers()):
            seen.setdefault(id(tensor), tensor)
    with torch.no_grad():
        return [(tensor, tensor.detach().clone()) for tensor in seen.values()]


def uncounted_field(f: Callable) -> Tuple[Callable, Tuple[nn.Module, ...]]:
    """``f`` without torchdyn's wrappers (``DEFunc``, ``DEFuncBase``: a ``NeuralODE``'s ``vf``) where all they
    do is count their calls, and those wrappers; ``(f, ())`` for anything else.

    The count is a float attribute, ``nfe``, which ``torch.compile`` guards on: a compiled solve of the
    wrapped field would compile again at every call, and after the recompile limit run eagerly. A solve
    through the unwrapped field adds its calls to the wrappers' ``nfe`` itself. A ``DEFunc`` that does more
    (higher order, an integral loss, depth-variable modules that read ``t``) is kept as it is."""
    wrappers: List[nn.Module] = []
    while (isinstance(f, DEFunc) and _only_counts(f)) or isinstance(f, DEFuncBase):
        wrappers.append(f)
        f = f.vf
    if not wrappers:
        return f, ()
    last = wrappers[-1]
    if isinstance(last, DEFuncBase) and not last.has_time_arg:
        return (lambda t, x: f(x)), tuple(wrappers)
    return (lambda t, x: f(t, x, args={})), tuple(wrappers)  # as the innermost wrapper calls it


def _only_counts(wrapper: DEFunc) -> bool:
    """Whether a ``DEFunc`` only counts and calls its field (first order, no integral loss, no module that
    reads the depth variable ``t``, which it would set at every call)."""
    if wrapper.order != 1 or wrapper.integral_loss is not None:
        return False
    return not (isinstance(wrapper.vf, nn.Module) and any(hasattr(m, "t") for m in wrapper.vf.modules()))


def check_field_output(f: Callable, t: Tensor, z: Tensor) -> None:
    """Refuse (``ValueError``, with both shapes) a vector field whose ``f(t, z)`` is not a tensor shaped like ``z``."""
    dz = f(t.to(z), z)
    if isinstance(dz, Tensor) and dz.shape == z.shape:
        return
    got = f"shape {tuple(dz.shape)}" if isinstance(dz, Tensor) else f"a {type(dz).__name__}"
    raise ValueError(
        f"the vector field returned {got} for states of shape {tuple(z.shape)}: f(t, z) must return dz/dt, "
        "a tensor shaped like z (check the width of its last layer, or that the state is what it expects)"
    )
