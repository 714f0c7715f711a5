"""Run by tests/test_lightning.py: residual fitting of g on two CPU processes (DDP, gloo).

``python tests/ddp_fit.py OUT STEPS BATCH_PER_RANK``; Lightning's launcher re-executes this
script for rank 1. Each rank writes the initial states of the trajectories it trained on
and the loss history to ``OUT/rank{r}.json``; rank 0 also writes g's weights.
"""

import json
import pathlib
import sys

import torch

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, Trajectories
from torchdyn_hypersolvers._records import validity_record


def problem(count: int = 16):
    """A deterministic 2-D linear problem (exact flow, no solver) and an unfitted float64 hypersolver."""
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    z0 = torch.stack([torch.linspace(-1, 1, count), torch.linspace(1, -0.5, count) ** 2], 1).double()
    states = torch.stack([z0 @ torch.linalg.matrix_exp(A * s).T for s in t])
    trajectories = Trajectories(t, states, {4: torch.arange(5)}, lambda t, z: z @ A.T)
    torch.manual_seed(0)
    return trajectories, HyperEuler(MLPHyperNet(2, hidden=(16, 16)).double())


def main(out: pathlib.Path, steps: int, batch_per_rank: int) -> None:
    import pytorch_lightning as pl

    from torchdyn_hypersolvers.lightning import HypersolverFitModule, TrajectoryDataModule

    class Recording(HypersolverFitModule):
        def training_step(self, batch, batch_idx):
            self.seen.append(batch.z[0].tolist())  # the initial states of this batch's trajectories
            return super().training_step(batch, batch_idx)

    trajectories, hs = problem()
    module = Recording(hs)
    module.seen = []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=TrajectoryDataModule(trajectories, hs, batch_size=batch_per_rank, shuffle=False))
    rank = trainer.global_rank
    record = {"world_size": trainer.world_size, "seen": module.seen, "loss_history": module.loss_history}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save({"weights": hs.g.state_dict(), "validity": validity_record(hs.validity)}, out / "fitted.pt")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
