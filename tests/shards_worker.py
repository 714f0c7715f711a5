"""Run by tests/test_shards.py under ``torchrun --nproc_per_node=2``: a sharded harvest on two gloo processes.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/shards_worker.py MODE FOLDER``

* ``harvest``: harvest the problem's inputs into ``FOLDER/shards`` (rank 0 writes the joined states to
  ``FOLDER/merged.pt``); every shard solved and written appends a line ``rank shard`` to
  ``FOLDER/solves-rank{r}.txt`` (the solve counter); then the ``tune`` pieces.
* ``die``: the harvest, but rank 1 kills itself (SIGKILL) when it starts its second shard, mid-harvest.
* the ``tune`` pieces: a harvest across ranks, candidates fitted each on one rank and gathered;
  rank r writes what it ended with to ``FOLDER/tune-rank{r}.pt``; then a harvest whose inputs differ between
  the ranks, whose refusal rank r writes to ``FOLDER/refused-rank{r}.txt``.
"""

import os
import pathlib
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn

from torchdyn_hypersolvers import HyperEuler, HyperHeun, MLPHyperNet, fit, shards

T_SPAN = torch.linspace(0, 1, 2)
STEPS = [4, 8]
BATCH, SHARD = 4, 8
TOL = {"atol": 1e-4, "rtol": 1e-4}


class Field(nn.Module):
    """A small nonlinear 2-D field."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, z):
        return self.net(z)


def inputs(count: int = 40) -> torch.Tensor:
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(1))


def counting(folder: pathlib.Path, die_at: int = -1):
    """Wrap the shard solve: count each solve in a file per rank; rank 1 dies at its ``die_at``-th shard."""
    original = shards._solve_shard
    done = []

    def solve(out, k, *args):
        rank = dist.get_rank()
        if rank == 1 and len(done) == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        original(out, k, *args)
        with open(folder / f"solves-rank{rank}.txt", "a") as handle:  # a solve counts once it is written
            handle.write(f"{rank} {k}\n")
        done.append(k)

    shards._solve_shard = solve


def run_tune(folder: pathlib.Path) -> None:
    """A harvest across ranks, two candidates fitted one per rank, gathered on both."""
    rank = dist.get_rank()
    trajectories = shards.harvest_across_ranks(Field(), inputs(), T_SPAN, steps=STEPS, batch_size=64, **TOL)
    labels = ["HyperEuler", "HyperHeun"]
    local = {}
    for label in shards.split_across_ranks(labels):
        torch.manual_seed(0)
        hs = {"HyperEuler": HyperEuler, "HyperHeun": HyperHeun}[label](MLPHyperNet(2, hidden=(8,)))
        fit(hs, trajectories, iterations=5, batch_size=8, progress=False, seed=0, noise_sample=0)
        local[label] = hs
    gathered = shards.gather_fitted(local, labels)
    torch.save(
        {
            "fitted_here": sorted(local),
            "states": trajectories.states,
            "weights": {label: hs.g.state_dict() for label, hs in gathered.items()},
            "validity": {label: hs.validity.dt_min for label, hs in gathered.items()},
        },
        folder / f"tune-rank{rank}.pt",
    )


def main(mode: str, folder: pathlib.Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        original = shards._solve_shard
        counting(folder, die_at=1 if mode == "die" else -1)
        out = shards.harvest_shards(
            Field(), inputs(), T_SPAN, folder / "shards", shard_size=SHARD, steps=STEPS, batch_size=BATCH, **TOL
        )
        shards._solve_shard = original  # the tune pieces' harvest is not counted
        if dist.get_rank() == 0:
            torch.save(out.load().states, folder / "merged.pt")
        run_tune(folder)
        try:  # inputs drawn on each rank without a common seed: refused on every rank, before any solve
            shards.harvest_shards(Field(), inputs() + dist.get_rank(), T_SPAN, folder / "other", batch_size=BATCH)
        except ValueError as err:
            (folder / f"refused-rank{dist.get_rank()}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from shards_worker import Field  # noqa: F811  the class the tests harvest with (same module name, same digest)

    main(sys.argv[1], pathlib.Path(sys.argv[2]))
