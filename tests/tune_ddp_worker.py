"""Run by tests/test_shards.py under ``torchrun --nproc_per_node=2``: tune on two gloo processes.

Each rank writes the labels it fitted, every candidate's g weights and the choices to ``OUT/tune-rank{r}.pt``.
"""

import pathlib
import sys

import torch
import torch.distributed as dist
from torch import nn

from torchdyn_hypersolvers import HyperEuler, HyperMidpoint, shards, tune


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    def forward(self, t, z):
        return self.net(z)


def main(out: pathlib.Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    fitted_here, finalists_here = [], []
    original = shards.split_across_ranks

    def recording(items, costs=None):
        mine = original(items, costs)
        for item in mine:
            if isinstance(item[0], type):  # a candidate: (class, steps, stage-aware, label)
                fitted_here.append(item[-1])
            else:  # a unit: a wider g (label, size) and the finalists (nfe, kind) that use it, or one finalist
                finalists_here.extend(item)
        return mine

    shards.split_across_ranks = recording
    import torchdyn_hypersolvers.tuning as tuning

    tuning.split_across_ranks = recording
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))
    result = tune(Field(), x, torch.linspace(0, 1, 2), nfe=[4, 8], bases=(HyperEuler, HyperMidpoint),
                  stage_aware="both", iterations=30, grid_iterations=5, budget_iterations=20,
                  g_sizes=((16, 16), (24, 24)), progress=False)
    torch.save(
        {
            "fitted_here": fitted_here,
            "finalists_here": finalists_here,
            "weights": {label: hs.g.state_dict() for label, hs in result.candidates.items()},
            "choices": {n: (c.label, c.error) for n, c in result.choices.items()},
            "options": [(c.nfe, c.label, c.error, c.wall_ms) for c in result.options],
            "final": {n: c.solver.state_dict() for n, c in result.choices.items()},
        },
        out / f"tune-rank{dist.get_rank()}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
