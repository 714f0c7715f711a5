"""How a hypersolver calls its network g, and ready-made g templates.

Five call conventions are supported; the first three are real code in the wild, the last two
read every stage of the base step:

``'concat'``
    ``g(cat([z, f(t, z), dt], dim=1))``: a plain network on the channel-wise
    concatenation, with ``dt`` broadcast to one extra channel. This is how the
    paper's MNIST and CIFAR10 hypernets are written (``nn.Conv2d(32+32+1, ...)``).
``'tx'``
    ``g(t, z)``: the convention of torchdyn's built-in ``HyperEuler`` (its
    tutorials' ``VanillaHyperNet``).
``'dt_t_z_dz'``
    ``g(dt, t, z, dz)``: everything, for custom conditioning. The package's own
    :class:`MLPHyperNet` and :class:`ConvHyperNet` use it. (Called ``'explicit'``
    before version 0.2; that name is still accepted.)
``'stages'``
    ``g(dt, t, z, stages, z0)``: stage-aware. ``stages = (k_1, ..., k_s)`` are all the
    evaluations of f the base step made (computed anyway: no extra NFE), each shaped
    like ``z``; ``z0`` is the initial state of the solve (of the trajectory, when fitting).
    :class:`MLPHyperNet` / :class:`ConvHyperNet` with ``stages=s`` use it.
``'concat_stages'``
    ``g(cat([z, k_1, ..., k_s, z0, dt], dim=1))``: the same inputs concatenated, as the
    paper's CNF HyperHeun g reads ``[x, f(x), f(x + ds f(x)), x0, ds]``
    (``nn.Linear(13, ...)`` for a 3-D state: ``(s + 2) C + 1`` features).

The convention is read from the number of required positional arguments of
``g.forward`` (1, 2 or 4; ``forward(self, t, x, *args)`` is torchdyn's ``'tx'``), or
from a ``hypernet_convention`` attribute on g, or given explicitly to the hypersolver.
The two stage-aware conventions are never guessed: declare them (``convention=`` or
``g.hypernet_convention``).
Wrappers are looked through: ``nn.DataParallel`` / ``DistributedDataParallel``
(``.module``) and ``torch.compile`` (``._orig_mod``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_int

__all__ = [
    "CONVENTIONS",
    "detect_convention",
    "call_hypernet",
    "unwrap_hypernet",
    "check_hypernet_input",
    "reads_stages",
    "MLPHyperNet",
    "ConvHyperNet",
]

CONVENTIONS = ("concat", "tx", "dt_t_z_dz", "stages", "concat_stages")
STAGE_CONVENTIONS = ("stages", "concat_stages")
"""The conventions that read all stages of the base step and the solve's initial state."""
_ALIASES = {"explicit": "dt_t_z_dz"}
_BY_ARITY = {1: "concat", 2: "tx", 4: "dt_t_z_dz"}


def unwrap_hypernet(g: Callable) -> Callable:
    """The module a wrapper runs: through ``.module`` (``nn.DataParallel``,
    ``DistributedDataParallel``) and ``._orig_mod`` (``torch.compile``), however nested."""
    for _ in range(16):  # wrappers of wrappers, never a cycle
        if isinstance(g, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            g = g.module
        elif isinstance(g, nn.Module) and isinstance(getattr(g, "_orig_mod", None), nn.Module):
            g = g._orig_mod
        else:
            break
    return g


def detect_convention(g: Callable) -> str:
    """Return how ``g`` is to be called: ``'concat'``, ``'tx'`` or ``'dt_t_z_dz'``.

    Wrappers (``nn.DataParallel``, ``torch.compile``, ...) are looked through; g itself is
    what the hypersolver calls."""
    g = unwrap_hypernet(g)
    declared = getattr(g, "hypernet_convention", None)
    if declared is not None:
        return check_convention(declared)
    fn = g.forward if isinstance(g, nn.Module) else g
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise TypeError(f"cannot read the signature of g ({type(g).__name__}); pass convention=...") from None
    required = [
        p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        if len(required) == 2:  # forward(self, t, x, *args): torchdyn calls it g(t, x)
            return "tx"
        raise TypeError(
            f"cannot tell how to call g ({type(g).__name__}): its forward takes {tuple(required)} and *args. "
            f"Pass convention= one of {CONVENTIONS} to the hypersolver."
        )
    try:
        return _BY_ARITY[len(required)]
    except KeyError:
        raise TypeError(
            f"cannot tell how to call g ({type(g).__name__}): its forward takes "
            f"{len(required)} required arguments {tuple(required)}. A hypernet takes 1 "
            "(the concatenation [z, f(t, z), dt] along dim 1), 2 (t, z as for torchdyn's "
            "HyperEuler) or 4 (dt, t, z, dz); or pass convention=... to the hypersolver (the stage-aware "
            "'stages', g(dt, t, z, stages, z0), and 'concat_stages' are always declared)."
        ) from None


def check_convention(convention: str) -> str:
    """The canonical name of a convention (old names are accepted as aliases)."""
    convention = _ALIASES.get(convention, convention)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown hypernet convention {convention!r}; expected one of {CONVENTIONS}")
    return convention


def reads_stages(convention: str) -> bool:
    """Whether g, called under ``convention``, reads every stage of the base step and z0."""
    return convention in STAGE_CONVENTIONS


def dt_channel(dt: Tensor, z: Tensor) -> Tensor:
    """``dt`` broadcast to one channel shaped like ``z[:, :1]``."""
    return torch.as_tensor(dt, dtype=z.dtype, device=z.device).expand(z.shape[0], 1, *z.shape[2:])


def concat_inputs(dt: Tensor, z: Tensor, dz: Tensor) -> Tensor:
    """The channel-wise concatenation ``[z, dz, dt]`` that a ``'concat'`` hypernet reads."""
    return torch.cat([z, dz, dt_channel(dt, z)], dim=1)


def concat_stage_inputs(dt: Tensor, z: Tensor, stages: Sequence[Tensor], z0: Tensor) -> Tensor:
    """The channel-wise concatenation ``[z, k_1, ..., k_s, z0, dt]`` a ``'concat_stages'`` hypernet reads."""
    return torch.cat([z, *stages, z0, dt_channel(dt, z)], dim=1)


def call_hypernet(
    g: Callable, convention: str, dt: Tensor, t: Tensor, z: Tensor, dz: Tensor,
    stages: Optional[Sequence[Tensor]] = None, z0: Optional[Tensor] = None,
) -> Tensor:
    """Evaluate ``g`` under ``convention`` at one step; ``dz = f(t, z)``. The stage-aware
    conventions also need ``stages`` (all of the base step's, ``stages[0] == dz``) and ``z0``."""
    if convention == "dt_t_z_dz":
        return g(dt, t, z, dz)
    if convention == "tx":
        return g(t, z)
    if convention == "concat":
        return g(concat_inputs(dt, z, dz))
    if stages is None or z0 is None:
        raise TypeError(f"the {convention!r} convention reads all stages of the base step and z0; got none")
    if convention == "stages":
        return g(dt, t, z, tuple(stages), z0)
    return g(concat_stage_inputs(dt, z, stages, z0))


def _first_layer(g: Callable) -> Optional[nn.Module]:
    """The layer that first reads g's input, when g is one (or an ``nn.Sequential`` starting with one)."""
    g = unwrap_hypernet(g)
    while isinstance(g, nn.Sequential) and len(g) > 0:
        g = unwrap_hypernet(g[0])
    if isinstance(g, nn.modules.lazy.LazyModuleMixin) and g.has_uninitialized_params():
        return None  # its input size is set by the first call
    if isinstance(g, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
        return g
    return None


def check_hypernet_input(g: Callable, convention: str, z: Tensor, stages: int = 1) -> None:
    """Refuse, before the first step, a state that g cannot take under ``convention``.

    What can be known without calling g: the ``'concat'`` convention needs a channel dim 1,
    and supplies ``2 C + 1`` channels (``[z, f(t, z), dt]``; ``'concat_stages'``: ``(s + 2) C + 1``
    for a base of ``stages = s``) which must be what g's first layer (an ``nn.Linear``'s
    ``in_features``, a convolution's ``in_channels``) reads; the package's template hypernets
    name the states (and the number of stages) they take. Other g's are not inspected."""
    name = type(unwrap_hypernet(g)).__name__
    if convention in ("concat", "concat_stages"):
        reads = "[z, f(t, z), dt]" if convention == "concat" else "[z, k_1, ..., k_s, z0, dt]"
        if z.dim() < 2:
            raise ValueError(
                f"g ({name}, the {convention!r} convention) reads cat({reads}, dim=1), which needs states "
                f"(B, C, ...) with a channel dim 1; got a state of shape {tuple(z.shape)}. Give the state a "
                "batch dimension (x[None]) or use a g(t, x) hypernet (the 'tx' convention), which takes any shape"
            )
        layer = _first_layer(g)
        if layer is None:
            return
        copies = 2 if convention == "concat" else stages + 2
        shape = list(z.shape)
        shape[1] = copies * shape[1] + 1
        if isinstance(layer, nn.modules.conv._ConvNd):
            supplied, width, what = shape[1], layer.in_channels, f"{type(layer).__name__}.in_channels"
        elif isinstance(layer, nn.Bilinear):
            return
        else:
            supplied, width, what = shape[-1], layer.in_features, "nn.Linear.in_features"
        if supplied != width:
            what_in = f"cat({reads}, dim=1)" + (f" with s={stages} stages" if convention == "concat_stages" else "")
            raise ValueError(
                f"g ({name}) reads {width} input features ({what} of its first layer) but the {convention!r} "
                f"convention supplies {supplied} = {copies}*{z.shape[1]}+1 ({what_in} for a state of shape "
                f"{tuple(z.shape)}). Build g for {supplied} inputs, or declare its convention (convention='tx' "
                "for g(t, z), 'dt_t_z_dz' for g(dt, t, z, dz), 'concat' or 'concat_stages')"
            )
    elif convention in ("dt_t_z_dz", "stages"):
        inner = unwrap_hypernet(g)
        if isinstance(inner, _TemplateHyperNet):
            if inner.hypernet_convention != convention:
                raise ValueError(
                    f"the hypernet g: {inner._settings()} is called g{_SIGNATURES[inner.hypernet_convention]} "
                    f"(the {inner.hypernet_convention!r} convention), not under {convention!r}"
                )
            expected = inner._expects(z)
            if expected is not None:
                raise ValueError(f"the hypernet g: {inner._settings()} expects states {expected}, got {tuple(z.shape)}")
            if convention == "stages" and inner.config.get("stages", 1) != stages:
                raise ValueError(
                    f"the hypernet g: {inner._settings()} reads {inner.config['stages']} stages but the base step "
                    f"has {stages}; build it with stages={stages}"
                )


_SIGNATURES = {"dt_t_z_dz": "(dt, t, z, dz)", "stages": "(dt, t, z, stages, z0)"}

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


def _stack(layer: Callable[[int, int], nn.Module], widths: Sequence[int], out: int, activation: str) -> nn.Sequential:
    """``layer`` + activation between consecutive ``widths``, then a zero-initialised ``layer`` to ``out``."""
    modules = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        modules += [layer(w_in, w_out), _activation(activation)]
    modules.append(_zero_(layer(widths[-1], out)))
    return nn.Sequential(*modules)


SCALE_FLOOR = 1e-2
"""A scaled hypernet's scale of a feature is at least this fraction of the larger of the features' overall
spread and the feature's own mean size: a (nearly) constant feature is not divided by its tiny spread."""


def _floored_std(values: Tensor) -> Tensor:
    """The per-feature standard deviation of ``values`` ``[N, D]``, at least ``SCALE_FLOOR`` times the
    larger of the root mean square of all the features' deviations and the feature's ``|mean|`` (and 1
    where both are zero)."""
    std = (values.std(0) if len(values) > 1 else torch.zeros_like(values[0])).nan_to_num(0.0)
    size = torch.maximum(values.mean(0).abs(), std.square().mean().sqrt())
    floor = torch.where(torch.isfinite(size) & (size > 0), SCALE_FLOOR * size, torch.ones_like(size))
    return std.maximum(floor.clamp_min(torch.finfo(std.dtype).tiny))


def _check_residual_data(data) -> None:
    """Refuse what :meth:`MLPHyperNet.standardize_` cannot read: not residual data, or none."""
    if not all(hasattr(data, name) for name in ("z", "dz", "target", "dt")):
        what = "a Trajectories" if hasattr(data, "states") and hasattr(data, "meshes") else type(data).__name__
        raise TypeError(
            f"standardize_ reads the residual data g will be fitted on, got {what}: "
            "pass residual_data(hs, trajectories) (from torchdyn_hypersolvers.fit)"
        )
    if data.z.numel() == 0 or data.target.numel() == 0:
        raise ValueError(
            f"standardize_ got empty residual data (states of shape {tuple(data.z.shape)}): no scales can be "
            "set from it; pass residual_data(hs, trajectories) of trajectories that hold at least one state"
        )


class _TemplateHyperNet(nn.Module):
    """A ready-made g: ``net([z, dz, dt(, t)])``, or with ``stages = s >= 2``
    ``net([z, k_1, ..., k_s, z0, dt(, t)])`` (the ``'stages'`` convention), for states of
    the shape they were built for."""

    hypernet_convention = "dt_t_z_dz"
    net: nn.Sequential
    config: Dict

    def _options(self, time: bool, stages: int) -> int:
        """Record ``time`` / ``stages`` (in ``config`` only when not the defaults, so files saved
        with the defaults are unchanged) and return how many state-sized inputs ``net`` reads."""
        check_int(stages, "stages (the base step's stage count)")
        if not isinstance(time, bool):
            raise ValueError(f"time must be a bool, got {time!r}")
        if time:
            self.config["time"] = True
        if stages > 1:
            self.config["stages"] = stages
            self.hypernet_convention = "stages"
        return 2 if stages == 1 else stages + 2

    def _expects(self, z: Tensor) -> Optional[str]:
        """None when ``z`` is accepted, else the expected shape, in words."""
        raise NotImplementedError

    def _settings(self) -> str:
        keys = ("state_dim", "channels", "time", "stages", "control_dim")
        settings = ", ".join(f"{k}={v}" for k, v in self.config.items() if k in keys)
        return f"{type(self).__name__}({settings})"

    def forward(self, dt: Tensor, t: Tensor, z: Tensor, dz, z0: Optional[Tensor] = None) -> Tensor:
        """``g(dt, t, z, dz)``; with ``stages >= 2``, ``g(dt, t, z, stages, z0)``."""
        expected = self._expects(z)
        if expected is not None:
            raise ValueError(f"{self._settings()} expects states {expected}, got {tuple(z.shape)}")
        stages = self.config.get("stages", 1)
        if stages == 1:
            inputs = concat_inputs(dt, z, dz)
        else:
            if isinstance(dz, Tensor) or len(dz) != stages or z0 is None:
                got = "one tensor" if isinstance(dz, Tensor) else f"{len(dz)} stages"
                raise ValueError(
                    f"{self._settings()} reads {stages} stages and z0 (g(dt, t, z, stages, z0)), got {got}"
                )
            inputs = concat_stage_inputs(dt, z, dz, z0)
        if self.config.get("time", False):
            inputs = torch.cat([inputs, dt_channel(t, z)], dim=1)
        return self.net(inputs)


class MLPHyperNet(_TemplateHyperNet):
    """An MLP hypernet for states ``(B, D)``: ``[z, dz, dt] -> residual``.

    ``time=True`` adds ``t`` as an input (for non-autonomous fields); ``stages=s >= 2``
    reads every stage of an ``s``-stage base step and the solve's initial state,
    ``[z, k_1, ..., k_s, z0, dt]`` (the ``'stages'`` convention; no extra NFE).
    The last layer starts at zero, so an unfitted hypersolver is exactly its base
    solver. ``config`` holds the constructor arguments (used by save/load).

    ``scaled=True`` adds fixed input and output scales (buffers, saved with the weights):
    g sees ``(z - z_mean) / z_std``, ``dz / dz_std`` (every stage), ``dt / dt_mean`` and its
    output is multiplied by the residuals' standard deviation; :meth:`standardize_` sets them
    from the residual data g will be fitted on. Worth it when the state's features or the
    residuals are far from unit scale (a van der Pol or Lorenz field): g then learns
    quantities of order one.

    ``control_dim=m`` is for a controlled system whose state carries its control
    (:class:`~.control.ControlledSystem`: ``z = [x, u]``, ``state_dim = n + m``): g reads the
    control with the state, and its correction of the last ``m`` channels is exactly zero,
    so the control stays held over every step.
    """

    def __init__(
        self,
        state_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "silu",
        time: bool = False,
        stages: int = 1,
        control_dim: int = 0,
        scaled: bool = False,
    ):
        super().__init__()
        check_int(state_dim, "state_dim")
        if isinstance(control_dim, bool) or not isinstance(control_dim, int) or not 0 <= control_dim < state_dim:
            raise ValueError(f"control_dim must be an int in [0, state_dim={state_dim}), got {control_dim!r}")
        self.config = {"state_dim": int(state_dim), "hidden": [int(h) for h in hidden], "activation": activation}
        if control_dim:  # recorded only when set: files saved without it are unchanged
            self.config["control_dim"] = int(control_dim)
        copies = self._options(time, stages)
        width = copies * state_dim + 1 + int(time)
        self.net = _stack(nn.Linear, [width, *self.config["hidden"]], state_dim - control_dim, activation)
        if not isinstance(scaled, bool):
            raise ValueError(f"scaled must be a bool, got {scaled!r}")
        if scaled:  # recorded only when set: files saved without it are unchanged
            self.config["scaled"] = True
            for name, size in (("z_mean", state_dim), ("z_std", state_dim), ("dz_std", state_dim)):
                self.register_buffer(name, torch.zeros(size) if name == "z_mean" else torch.ones(size))
            self.register_buffer("dt_mean", torch.ones(()))
            self.register_buffer("out_std", torch.ones(state_dim - control_dim))

    @property
    def scales_output(self) -> bool:
        """Whether g multiplies its output by its own scale (``scaled=True``): ``fit`` then leaves
        the hypersolver's ``residual_scale`` at 1, so that the output is scaled once."""
        return bool(self.config.get("scaled", False))

    @torch.no_grad()
    def standardize_(self, data) -> MLPHyperNet:
        """Set the scales of a ``scaled=True`` hypernet from :func:`~.fit.residual_data` (the
        states, f values, step sizes and residual targets g will be fitted on); returns self.

        A (nearly) constant feature gets a scale of ``SCALE_FLOOR`` times the larger of the
        features' overall spread and its own mean size (1 when both are zero), not its own tiny
        spread: a state off that constant value then stays a moderate input to g."""
        if not self.config.get("scaled", False):
            raise ValueError(f"{self._settings()} has no scales to set: build it with scaled=True")
        _check_residual_data(data)
        z, dz, target = (x.flatten(0, 1) for x in (data.z, data.dz, data.target))
        out = target[:, : self.out_std.numel()]
        tiny = torch.finfo(self.z_std.dtype).tiny
        for name, value in (
            ("z_mean", z.mean(0)),
            ("z_std", _floored_std(z)),
            ("dz_std", _floored_std(dz)),
            ("dt_mean", data.dt.abs().mean().clamp_min(tiny)),
            ("out_std", _floored_std(out)),
        ):
            getattr(self, name).copy_(value.nan_to_num(1.0))
        return self

    def forward(self, dt: Tensor, t: Tensor, z: Tensor, dz, z0: Optional[Tensor] = None) -> Tensor:
        scaled = self.config.get("scaled", False)
        if scaled:
            dt, z = dt / self.dt_mean, (z - self.z_mean) / self.z_std
            dz = dz / self.dz_std if isinstance(dz, Tensor) else tuple(k / self.dz_std for k in dz)
            z0 = None if z0 is None else (z0 - self.z_mean) / self.z_std
        out = super().forward(dt, t, z, dz, z0)
        if scaled:
            out = out * self.out_std
        control_dim = self.config.get("control_dim", 0)
        if not control_dim:
            return out
        return torch.cat([out, out.new_zeros(out.shape[0], control_dim)], dim=1)  # the control is held

    def _expects(self, z: Tensor) -> Optional[str]:
        dim = self.config["state_dim"]
        return None if z.dim() == 2 and z.shape[1] == dim else f"(B, {dim})"


class ConvHyperNet(_TemplateHyperNet):
    """A convolutional hypernet for image states ``(B, C, H, W)``, after supplement C.2.

    ``Conv(2C+1 -> hidden) - PReLU - Conv(hidden -> hidden) - PReLU - Conv(hidden -> C)``
    with 3x3 kernels (``layers`` counts the convolutions); the last layer starts at zero.
    ``time`` and ``stages`` as for :class:`MLPHyperNet` (t and dt are constant channels).
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 32,
        layers: int = 3,
        activation: str = "prelu",
        time: bool = False,
        stages: int = 1,
    ):
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"ConvHyperNet needs channels >= 1 and layers >= 1, got {channels}, {layers}")
        self.config = {"channels": int(channels), "hidden": int(hidden), "layers": int(layers)}
        self.config["activation"] = activation
        copies = self._options(time, stages)
        conv = functools.partial(nn.Conv2d, kernel_size=3, padding=1)
        self.net = _stack(conv, [copies * channels + 1 + int(time)] + [hidden] * (layers - 1), channels, activation)

    def _expects(self, z: Tensor) -> Optional[str]:
        channels = self.config["channels"]
        return None if z.dim() == 4 and z.shape[1] == channels else f"(B, {channels}, H, W)"
