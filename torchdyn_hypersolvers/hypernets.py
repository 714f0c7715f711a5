"""How a hypersolver calls its network g, and ready-made g templates.

Three call conventions are real code in the wild and all are supported:

``'concat'``
    ``g(cat([z, f(t, z), dt], dim=1))``: a plain network on the channel-wise
    concatenation, with ``dt`` broadcast to one extra channel. This is how the
    paper's MNIST and CIFAR10 hypernets are written (``nn.Conv2d(32+32+1, ...)``).
``'tx'``
    ``g(t, z)``: the convention of torchdyn's built-in ``HyperEuler`` (its
    tutorials' ``VanillaHyperNet``).
``'explicit'``
    ``g(dt, t, z, dz)``: everything, for custom conditioning. The package's own
    :class:`MLPHyperNet` and :class:`ConvHyperNet` use it.

The convention is read from the number of required positional arguments of
``g.forward`` (1, 2 or 4), or from a ``hypernet_convention`` attribute on g, or
given explicitly to the hypersolver.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CONVENTIONS", "detect_convention", "call_hypernet", "MLPHyperNet", "ConvHyperNet"]

CONVENTIONS = ("concat", "tx", "explicit")
_BY_ARITY = {1: "concat", 2: "tx", 4: "explicit"}


def detect_convention(g: Callable) -> str:
    """Return how ``g`` is to be called: ``'concat'``, ``'tx'`` or ``'explicit'``."""
    declared = getattr(g, "hypernet_convention", None)
    if declared is not None:
        return check_convention(declared)
    fn = g.forward if isinstance(g, nn.Module) else g
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise TypeError(f"cannot read the signature of g ({type(g).__name__}); pass convention=...") from None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"cannot tell how to call g ({type(g).__name__}): its forward takes *args. "
            f"Pass convention= one of {CONVENTIONS} to the hypersolver."
        )
    required = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    try:
        return _BY_ARITY[len(required)]
    except KeyError:
        raise TypeError(
            f"cannot tell how to call g ({type(g).__name__}): its forward takes "
            f"{len(required)} required arguments {tuple(required)}. A hypernet takes 1 "
            "(the concatenation [z, f(t, z), dt] along dim 1), 2 (t, z as for torchdyn's "
            "HyperEuler) or 4 (dt, t, z, dz); or pass convention=... to the hypersolver."
        ) from None


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown hypernet convention {convention!r}; expected one of {CONVENTIONS}")
    return convention


def dt_channel(dt: Tensor, z: Tensor) -> Tensor:
    """``dt`` broadcast to one channel shaped like ``z[:, :1]``."""
    return torch.as_tensor(dt, dtype=z.dtype, device=z.device).expand(z.shape[0], 1, *z.shape[2:])


def concat_inputs(dt: Tensor, z: Tensor, dz: Tensor) -> Tensor:
    """The channel-wise concatenation ``[z, dz, dt]`` that a ``'concat'`` hypernet reads."""
    return torch.cat([z, dz, dt_channel(dt, z)], dim=1)


def call_hypernet(g: Callable, convention: str, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor) -> Tensor:
    """Evaluate ``g`` under ``convention`` at one step; ``dz = f(t, z)``."""
    if convention == "explicit":
        return g(dt, t, z, dz)
    if convention == "tx":
        return g(t, z)
    return g(concat_inputs(dt, z, dz))


_ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "prelu": nn.PReLU,
    "silu": nn.SiLU,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


def _zero_(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLPHyperNet(nn.Module):
    """An MLP hypernet for states ``(B, D)``: ``[z, dz, dt] -> residual``.

    The last layer starts at zero, so an unfitted hypersolver is exactly its base
    solver. ``config`` holds the constructor arguments (used by save/load).
    """

    hypernet_convention = "explicit"

    def __init__(self, state_dim: int, hidden: Sequence[int] = (64, 64), activation: str = "silu"):
        super().__init__()
        if state_dim < 1:
            raise ValueError(f"state_dim must be positive, got {state_dim}")
        self.config = {"state_dim": int(state_dim), "hidden": [int(h) for h in hidden], "activation": activation}
        widths = [2 * state_dim + 1, *self.config["hidden"]]
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), _activation(activation)]
        layers.append(_zero_(nn.Linear(widths[-1], state_dim)))
        self.net = nn.Sequential(*layers)

    def forward(self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.config["state_dim"]:
            raise ValueError(
                f"MLPHyperNet(state_dim={self.config['state_dim']}) expects states (B, "
                f"{self.config['state_dim']}), got {tuple(z.shape)}"
            )
        return self.net(concat_inputs(dt, z, dz))


class ConvHyperNet(nn.Module):
    """A convolutional hypernet for image states ``(B, C, H, W)``, after supplement C.2.

    ``Conv(2C+1 -> hidden) - PReLU - Conv(hidden -> hidden) - PReLU - Conv(hidden -> C)``
    with 3x3 kernels (``layers`` counts the convolutions); the last layer starts at zero.
    """

    hypernet_convention = "explicit"

    def __init__(self, channels: int, hidden: int = 32, layers: int = 3, activation: str = "prelu"):
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"ConvHyperNet needs channels >= 1 and layers >= 1, got {channels}, {layers}")
        self.config = {
            "channels": int(channels),
            "hidden": int(hidden),
            "layers": int(layers),
            "activation": activation,
        }
        widths = [2 * channels + 1] + [hidden] * (layers - 1)
        modules = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            modules += [nn.Conv2d(w_in, w_out, 3, padding=1), _activation(activation)]
        modules.append(_zero_(nn.Conv2d(widths[-1], channels, 3, padding=1)))
        self.net = nn.Sequential(*modules)

    def forward(self, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor) -> Tensor:
        if z.dim() != 4 or z.shape[1] != self.config["channels"]:
            raise ValueError(
                f"ConvHyperNet(channels={self.config['channels']}) expects states (B, "
                f"{self.config['channels']}, H, W), got {tuple(z.shape)}"
            )
        return self.net(concat_inputs(dt, z, dz))
