"""Fitting g with PyTorch Lightning: the same losses and steps as fit, sharded across DDP ranks."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from ddp_fit import problem
from torch import nn

import torchdyn_hypersolvers
from torchdyn_hypersolvers import FitDivergedError, HyperEuler, MLPHyperNet, Recipe, fit
from torchdyn_hypersolvers.fit import residual_data
from torchdyn_hypersolvers.lightning import HypersolverFitModule, TrajectoryDataModule
from torchdyn_hypersolvers.validity import Validity

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = pathlib.Path(torchdyn_hypersolvers.__file__).resolve().parent


def trainer(steps, devices=1):
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def max_weight_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def test_importing_the_package_does_not_import_the_lightning_module():
    # torchdyn.core itself imports pytorch_lightning; the package must add nothing to that.
    code = (
        "import sys\n"
        "import torchdyn.core\n"
        "before = {m for m in sys.modules if 'lightning' in m}\n"
        "import torchdyn_hypersolvers\n"
        "after = {m for m in sys.modules if 'lightning' in m}\n"
        "assert 'torchdyn_hypersolvers.lightning' not in sys.modules\n"
        "assert after == before, sorted(after - before)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in PACKAGE.glob("*.py"):
        if path.name == "lightning.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            assert not any("lightning" in name for name in names), (path.name, names)


@pytest.mark.parametrize("method", ["residual", "trajectory"])
def test_one_device_takes_the_same_steps_as_fit(method):
    trajectories, hs = problem()
    _, reference = problem()
    module = HypersolverFitModule(hs)
    data = TrajectoryDataModule(trajectories, hs, method=method, batch_size=len(trajectories), shuffle=False)
    trainer(6).fit(module, datamodule=data)
    # fit with one batch of every trajectory for all iterations: the same global batch at every step
    report = fit(reference, trajectories, method=method, iterations=6, batch_size=16, warmup=6, progress=False)
    assert max_weight_difference(hs, reference) < 1e-12
    assert module.loss_history == pytest.approx(report.loss_history, abs=1e-12)
    assert max_weight_difference(hs, problem()[1]) > 1e-3  # and g did move
    assert hs.validity.dt_min == pytest.approx(0.25) and hs.validity.state_shape == (2,)
    assert f"{method} fit with Lightning (6 steps)" in hs.describe()


def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path):
    steps, per_rank = 8, 4
    subprocess.run(
        [sys.executable, str(HERE / "ddp_fit.py"), str(tmp_path), str(steps), str(per_rank)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    trajectories, hs = problem()
    initial = [tuple(z) for z in trajectories.states[0].tolist()]
    # each rank trained on its own half of the trajectories, per_rank at a time
    for r in ranks:
        assert len(r["seen"]) == steps and all(len(batch) == per_rank for batch in r["seen"])
    shares = [{initial.index(tuple(z)) for batch in r["seen"] for z in batch} for r in ranks]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(len(trajectories)))
    assert len(shares[0]) == len(shares[1]) == len(trajectories) // 2

    module = HypersolverFitModule(hs)
    data = TrajectoryDataModule(trajectories, hs, batch_size=2 * per_rank, shuffle=False)
    trainer(steps).fit(module, datamodule=data)
    fitted = torch.load(tmp_path / "fitted.pt", weights_only=True)
    difference = max((fitted["weights"][k] - v).abs().max().item() for k, v in hs.g.state_dict().items())
    assert difference < 1e-10, difference
    assert ranks[0]["loss_history"] == pytest.approx(module.loss_history, abs=1e-10)
    assert ranks[1]["loss_history"] == ranks[0]["loss_history"]  # the loss of the global batch, on every rank
    assert max_weight_difference(hs, problem()[1]) > 1e-3
    assert fitted["validity"]["dt_max"] == pytest.approx(0.25)


def test_shuffled_batches_are_seeded():
    trajectories, hs = problem()
    orders = []
    for _ in range(2):
        data = TrajectoryDataModule(trajectories, hs, batch_size=4, shuffle=True, seed=3)
        orders.append([b.z[0].tolist() for b in data.train_dataloader()])
    assert orders[0] == orders[1]
    unshuffled = TrajectoryDataModule(trajectories, hs, batch_size=4, shuffle=False).train_dataloader()
    assert orders[0] != [b.z[0].tolist() for b in unshuffled]


class NaNAfter(nn.Module):
    hypernet_convention = "explicit"

    def __init__(self, n):
        super().__init__()
        self.inner, self.n, self.calls = MLPHyperNet(2).double(), n, 0

    def forward(self, dt, t, z, dz):
        self.calls += 1
        out = self.inner(dt, t, z, dz)
        return out * float("nan") if self.calls > self.n else out


def test_non_finite_loss_stops_before_the_step():
    trajectories, _ = problem()
    hs = HyperEuler(NaNAfter(3))
    hs.validity = before = Validity(0.5, 0.5, (2,), "an earlier fit")
    data = TrajectoryDataModule(trajectories, hs, batch_size=16, shuffle=False)
    module = HypersolverFitModule(hs)
    with pytest.raises(FitDivergedError, match="residual loss became non-finite at step 3"):
        trainer(10).fit(module, datamodule=data)
    assert len(module.loss_history) == 3
    assert all(torch.isfinite(p).all() for p in hs.parameters())
    assert hs.validity == before


class LinearField(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2).double()

    def forward(self, t, z):
        return self.linear(z)


def test_trajectory_fitting_leaves_a_module_field_as_it_was():
    trajectories, hs = problem()
    field = LinearField().train()
    trajectories.f = field
    before = {k: v.clone() for k, v in field.state_dict().items()}
    module = HypersolverFitModule(hs)
    trainer(3).fit(module, datamodule=TrajectoryDataModule(trajectories, hs, method="trajectory", batch_size=8))
    assert field.training and all(p.requires_grad and p.grad is None for p in field.parameters())
    assert all(torch.equal(before[k], v) for k, v in field.state_dict().items())
    assert len(module.loss_history) == 3 and "trajectory fit with Lightning (3 steps)" in hs.describe()


def test_bad_inputs():
    trajectories, hs = problem()
    data = residual_data(hs, trajectories)
    with pytest.raises(ValueError, match="unknown fitting method 'magic'"):
        TrajectoryDataModule(trajectories, hs, method="magic")
    with pytest.raises(ValueError, match="ResidualData only serves method='residual'"):
        TrajectoryDataModule(data, method="trajectory")
    with pytest.raises(ValueError, match="needs the hypersolver: pass hs="):
        TrajectoryDataModule(trajectories)
    with pytest.raises(TypeError, match="serves Trajectories or ResidualData, got Tensor"):
        TrajectoryDataModule(torch.zeros(3))
    with pytest.raises(TypeError, match="fits a HyperSolver"):
        HypersolverFitModule(nn.Linear(2, 2))
    # precomputed residuals serve as well as the trajectories they came from
    module = HypersolverFitModule(hs)
    trainer(2).fit(module, datamodule=TrajectoryDataModule(data, batch_size=16, shuffle=False))
    assert len(module.loss_history) == 2 and hs.validity.dt_min == pytest.approx(0.25)


def test_a_recipe_or_its_optimiser_fields_as_keywords():
    trajectories, hs = problem()
    module = HypersolverFitModule(hs, Recipe(lr=5e-3, clip=0.5))
    assert (module.lr, module.lr_min, module.weight_decay, module.clip) == (5e-3, 5e-4, 1e-6, 0.5)
    assert HypersolverFitModule(problem()[1], lr=5e-3, clip=0.5).recipe == module.recipe
    with pytest.warns(DeprecationWarning, match="positional lr"):
        assert HypersolverFitModule(problem()[1], 5e-3).recipe == Recipe(lr=5e-3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_size'"):
        HypersolverFitModule(hs, batch_size=4)  # the data module batches
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        TrajectoryDataModule(trajectories, hs, batch_size=True)
    trainer(3).fit(module, datamodule=TrajectoryDataModule(trajectories, hs, batch_size=16, shuffle=False))
    reference = problem()[1]  # the recipe's lr and clip reach the optimiser: fit's steps
    recipe = Recipe(iterations=3, batch_size=16, warmup=3, lr=5e-3, clip=0.5)
    fit(reference, trajectories, recipe=recipe, progress=False)
    assert max_weight_difference(hs, reference) < 1e-12
