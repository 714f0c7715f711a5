"""Run by tests/test_tune_workers.py in a fresh process (forked workers need a parent that has not started
autograd's threads, which earlier tests of the suite do): ``python tune_workers_script.py MODE OUT``.

``split``: tune alone and with ``workers=2``, recording which processes build a g; ``error``: tune with
``workers=2`` on inputs holding a nan; ``compiled``: whether a fork can backprop before and after a
backward through ``torch.compile``, and what ``workers=2`` does then; ``turns``: two workers taking turns
at six items of work, the costliest first, the first item slow. Results go to ``OUT`` (torch.save).
"""

import os
import pathlib
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from torchdyn_hypersolvers import HyperEuler, HyperMidpoint, MLPHyperNet, shards, tune
from torchdyn_hypersolvers._workers import fork_can_backprop, in_workers

SPAN = torch.linspace(0, 1, 2)
SMALL = dict(
    nfe=(4, 8),
    bases=(HyperEuler, HyperMidpoint),
    stage_aware="both",  # three candidates: work for both workers
    iterations=40,
    budget_iterations=20,
    grid_iterations=10,
    g_sizes=((16,), (32,)),
    progress=False,
)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, z):
        return self.net(z)


def inputs(n=96):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1))


def recording_hypernet(log: pathlib.Path):
    """The default g's shape, writing the pid of the process that builds it to ``log``."""

    def make(cls, stage_aware):
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
        return MLPHyperNet(2, hidden=(16,), time=True, stages=cls.tableau.stages if stage_aware else 1)

    return make


def summary(result):
    return {
        "choices": {n: (c.label, c.error) for n, c in result.choices.items()},
        "candidates": sorted(result.candidates),
        "held_out": result.held_out,
    }


def taking_turns(rank: int) -> dict:
    """Six items, costliest first ``"a"`` (slow: 1 s) to ``"f"``; which rank took which, and what
    :func:`~torchdyn_hypersolvers.shards.gather_fitted` gives every rank."""
    items, local = list("fedcba"), {}
    for item in shards.take_turns(items, costs=[1, 2, 3, 4, 5, 6]):
        time.sleep(1.0 if item == "a" else 0.05)
        local[item] = (item.upper(), rank)
    taken = [None, None]
    dist.all_gather_object(taken, list(local))
    return {"taken": taken, "gathered": shards.gather_fitted(local, items)}


def main(mode: str, out: pathlib.Path) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    record = {"pid": os.getpid()}
    if mode == "split":
        log = out.with_suffix(".pids")
        options = dict(SMALL, hypernet=recording_hypernet(log))
        record["alone"] = summary(tune(Field(), inputs(), SPAN, **options))
        record["alone_pids"] = set(log.read_text().split())
        log.unlink()
        result = tune(Field(), inputs(), SPAN, workers=2, **options)
        record["split"], record["split_pids"] = summary(result), set(log.read_text().split())
        solver, mesh = result.solver_for(8)
        with torch.no_grad():
            record["solved"] = solver.solve(Field(), inputs(8), mesh)
    elif mode == "error":
        bad = inputs()
        bad[3] = float("nan")
        try:
            tune(Field(), bad, SPAN, workers=2, **SMALL)
        except Exception as err:  # noqa: BLE001 - what the caller sees is the record
            record["error"] = (type(err).__name__, str(err), str(err.__cause__))
    elif mode == "compiled":
        record["fresh"] = fork_can_backprop()
        double = torch.compile(lambda x: x * 2, backend="eager")
        double(torch.ones(2, requires_grad=True)).sum().backward()
        record["after_compile"] = fork_can_backprop()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tune(Field(), inputs(), SPAN, workers=2, **SMALL)
        record["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    elif mode == "turns":
        record |= in_workers(taking_turns, 2)
    torch.save(record, out)


if __name__ == "__main__":
    main(sys.argv[1], pathlib.Path(sys.argv[2]))
