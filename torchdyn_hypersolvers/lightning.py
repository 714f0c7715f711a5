"""Fit a hypersolver's g with PyTorch Lightning, on one device or several (DDP).

Opt-in: ``import torchdyn_hypersolvers`` does not import this module. It needs the
``lightning`` extra (``pip install 'torchdyn-hypersolvers[lightning]'``).

:class:`HypersolverFitModule` computes the loss with the very functions :func:`~.fit.fit`
uses (:func:`~torchdyn_hypersolvers.fit.residual_loss` and
:func:`~torchdyn_hypersolvers.fit.trajectory_loss`), with AdamW, cosine annealing and
gradient-norm clipping as in :func:`~.fit.fit` (the optimiser fields of its :class:`~.fit.Recipe`).
:class:`TrajectoryDataModule` serves batches of trajectories; under DDP each rank draws
only its share of the trajectory index (``DistributedSampler``), and DDP averages the
gradients, so ``devices=N`` with ``batch_size=b`` takes the steps of one process with a
batch of ``N * b``. Unlike
:func:`~.fit.fit`, batches follow the dataloader (one pass over the trajectories per epoch)
rather than fit's warmup / ``swap_every`` schedule. :func:`~.fit.fit` stays the
single-process entry point.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

try:
    import pytorch_lightning as pl
except ImportError:  # the unified `lightning` package ships the same API
    try:
        import lightning.pytorch as pl
    except ImportError as err:
        raise ImportError(
            "torchdyn_hypersolvers.lightning needs PyTorch Lightning: pip install 'torchdyn-hypersolvers[lightning]'"
        ) from err

from ._checks import check_int
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
from ._user_model import module_device, owned_modules, preserved
from .fit import METHODS, ResidualData, residual_data, residual_loss, trajectory_loss
from .harvest import Trajectories
from .solvers import HyperSolver
from .validity import Validity

__all__ = ["HypersolverFitModule", "TrajectoryDataModule"]


class _CollateTrajectories:
    """Collate a list of trajectory indices into the batch those trajectories make."""

    def __init__(self, source: Union[ResidualData, Trajectories]):
        self.source = source

    def __call__(self, indices: Sequence[int]) -> Union[ResidualData, Trajectories]:
        index = torch.as_tensor(indices, dtype=torch.long)
        source = self.source
        on = source.states.device if isinstance(source, Trajectories) else source.z.device
        return source.select(index.to(on))


class TrajectoryDataModule(pl.LightningDataModule):
    """Batches of trajectories for :class:`HypersolverFitModule`, sharded across ranks.

    Args:
        source: harvested :class:`~.harvest.Trajectories`, or precomputed :class:`~.fit.ResidualData`
            (residual fitting only).
        hs: the hypersolver to be fitted; needed to compute residual targets from
            ``Trajectories`` (only its base solver is used).
        method: ``'residual'`` (batches of :class:`~.fit.ResidualData`, computed once in
            :meth:`setup`) or ``'trajectory'`` (batches of :class:`~.harvest.Trajectories`).
        batch_size: trajectories per batch *per rank*.
        shuffle: reshuffle every epoch; seeded by ``seed``, identically on every rank.

    Every rank holds the data; its dataloader yields only its share of the batches.
    """

    def __init__(
        self,
        source: Union[Trajectories, ResidualData],
        hs: Optional[HyperSolver] = None,
        method: str = "residual",
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown fitting method {method!r}; expected one of {METHODS}")
        check_int(batch_size, "batch_size")
        if isinstance(source, ResidualData):
            if method != "residual":
                raise ValueError("ResidualData only serves method='residual'; pass the Trajectories instead")
        elif isinstance(source, Trajectories):
            if source.f is None:
                raise ValueError("the trajectories carry no vector field; load them with Trajectories.load(path, f=f)")
            if method == "residual" and hs is None:
                raise ValueError("computing residual targets from Trajectories needs the hypersolver: pass hs=...")
        else:
            raise TypeError(f"TrajectoryDataModule serves Trajectories or ResidualData, got {type(source).__name__}")
        self.trajectories = source if isinstance(source, Trajectories) else None
        self.data = source if isinstance(source, ResidualData) else None
        self.hs, self.method = hs, method
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers

    def setup(self, stage: Optional[str] = None) -> None:
        """Compute the residual targets once (f frozen, in eval mode, NFE counter untouched)."""
        if self.method == "residual" and self.data is None:
            f = self.trajectories.f
            with preserved(*owned_modules(f)):
                self.data = residual_data(self.hs, self.trajectories)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        source = self.data if self.method == "residual" else self.trajectories
        index = range(len(source))
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                index, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=self.shuffle, seed=self.seed
            )
        elif self.shuffle:
            sampler = RandomSampler(index, generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = None
        return DataLoader(
            index,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=_CollateTrajectories(source),
            num_workers=self.num_workers,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, (ResidualData, Trajectories)):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def validity(self, description: str) -> Validity:
        """The validity record of a fit on this data."""
        if self.trajectories is not None:
            return Validity.of_trajectories(self.trajectories, how=description)
        data = self.data
        return Validity.of_steps(
            data.dt, data.z.shape[2:], f"{description} on {len(data)} trajectories of precomputed residuals"
        )


class _ReleaseOnException(pl.Callback):
    """Lightning calls ``on_exception`` on callbacks, not on the module: undo the module's fit state."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, FitDivergedError) and pl_module._last is not None:
            pl_module._last.restore_if_nonfinite()  # g keeps its last finite weights
        pl_module._release()


class HypersolverFitModule(pl.LightningModule):
    """Fit ``hs.g`` with Lightning: the losses of :func:`~.fit.fit`, AdamW, cosine annealing, clipping.

    Args:
        hs: the hypersolver; only g's parameters are optimised.
        recipe: a :class:`~.fit.Recipe`, of which the optimiser's fields are used: ``lr``, ``lr_min``,
            ``weight_decay`` and ``clip`` (``Trainer(gradient_clip_val=...)`` overrides ``clip``);
            they can also be given as keywords. The Trainer and the data module decide the rest.
        iterations: the cosine schedule's length; by default the Trainer's number of
            optimiser steps (``max_steps``, or epochs times batches).

    Batches are :class:`~.fit.ResidualData` (residual fitting) or :class:`~.harvest.Trajectories`
    (trajectory fitting), as served by :class:`TrajectoryDataModule`. ``loss_history``
    holds the loss of each step averaged over ranks (the loss of the global batch).
    At the end of a fit with a :class:`TrajectoryDataModule`, ``hs.validity`` is set as
    :func:`~.fit.fit` sets it. A non-finite loss or gradient raises :class:`~.fit.FitDivergedError`
    on every rank before the step is taken.
    """

    OPTIMISER_FIELDS = ("lr", "lr_min", "weight_decay", "clip")
    """The fields of a :class:`~.fit.Recipe` this module uses (and takes as keywords)."""

    def __init__(
        self, hs: HyperSolver, recipe: Optional[Recipe] = None, iterations: Optional[int] = None, **overrides: Any
    ):
        super().__init__()
        if not isinstance(hs, HyperSolver):
            raise TypeError(f"HypersolverFitModule fits a HyperSolver, got {type(hs).__name__}")
        if not any(p.requires_grad for p in hs.parameters()):
            raise ValueError(f"the hypersolver's g ({type(hs.g).__name__}) has no trainable parameters")
        self.hs = hs
        self.recipe = resolve_recipe(recipe, overrides, type(self).__name__, self.OPTIMISER_FIELDS, positional="lr")
        self.iterations = None if iterations is None else check_int(iterations, "iterations")
        self.loss_history: List[float] = []
        self._fields = {}
        self._frozen = contextlib.ExitStack()  # the user's vector field frozen, g in fitting mode
        self._last: Optional[LastFinite] = None  # g's weights before the latest step

    lr = property(lambda self: self.recipe.lr, doc="The recipe's ``lr``.")
    lr_min = property(lambda self: self.recipe.lr_min, doc="The recipe's ``lr_min``.")
    weight_decay = property(lambda self: self.recipe.weight_decay, doc="The recipe's ``weight_decay``.")
    clip = property(lambda self: self.recipe.clip, doc="The recipe's ``clip``.")

    def _field(self, f: Callable) -> Callable:
        """The vector field, frozen, on this module's device (a copy when the user's is elsewhere);
        a callable's modules (those it closes over) frozen."""
        if not isinstance(f, nn.Module):
            if id(f) not in self._fields:
                self._frozen.enter_context(preserved(*owned_modules(f)))
                self._fields[id(f)] = f
            return f
        if id(f) not in self._fields:
            self._frozen.enter_context(preserved(f))
            on = module_device(f, self.device)
            self._fields[id(f)] = f if on == self.device else copy.deepcopy(f).to(self.device)
        return self._fields[id(f)]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if isinstance(batch, ResidualData):
            method, loss = "residual", residual_loss(self.hs, batch)
        elif isinstance(batch, Trajectories):
            method, loss = "trajectory", trajectory_loss(self.hs, batch, self._field(batch.f))
        else:
            raise TypeError(f"expected a batch of ResidualData or Trajectories, got {type(batch).__name__}")
        nonfinite = (~torch.isfinite(loss.detach())).to(loss.dtype)
        value, bad = self.trainer.strategy.reduce(torch.stack([loss.detach(), nonfinite]), reduce_op="mean").tolist()
        if bad > 0:  # every rank sees it, so every rank stops
            raise diverged(f"the {method} loss became non-finite", f"step {self.global_step}")
        self.loss_history.append(value)
        self.log("loss", value, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.hs.parameters() if p.requires_grad]
        total = self.iterations if self.iterations is not None else int(self.trainer.estimated_stepping_batches)
        recipe = self.recipe
        optimizer, schedule = optimizer_and_schedule(params, recipe.lr, recipe.lr_min, recipe.weight_decay, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        """Gradients with respect to g's parameters only: the vector field never gets a ``.grad``
        (``inputs=`` keeps the gradient hooks of ``DistributedDataParallel`` firing)."""
        params = [p for p in self.hs.parameters() if p.requires_grad]
        loss.backward(*args, inputs=params, **kwargs)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._last is not None:
            self._last.keep()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.recipe.clip if gradient_clip_val is None else gradient_clip_val
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # gradients are already averaged over ranks here, so every rank agrees
        clip_gradients(params, clip, f"step {self.global_step}")

    def on_fit_start(self) -> None:
        self._frozen.enter_context(fitting(self.hs))  # g in training mode, no outside-the-fit warnings
        self._last = LastFinite([p for p in self.hs.parameters() if p.requires_grad])

    def on_fit_end(self) -> None:
        self._release()
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, TrajectoryDataModule):
            steps = len(self.loss_history)
            self.hs.validity = datamodule.validity(f"{datamodule.method} fit with Lightning ({steps} steps)")

    def configure_callbacks(self):
        return [_ReleaseOnException()]

    def _release(self) -> None:
        """Unfreeze the user's vector field, put g's modes back and let solves warn outside the fit again."""
        self._frozen.close()
        self._fields.clear()
        self._last = None
