"""What every tutorial shares: the command line, the results folder, a training loop."""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch

from torchdyn_hypersolvers._progress import progress_bar

try:  # kept for examples that still build their own bar; new code: progress_bar (off when not a terminal)
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def parser(doc: str, name: str, threads: Optional[int] = None) -> argparse.ArgumentParser:
    """``--quick``, ``--device``, ``--out``, ``--seed``, ``--threads`` and ``--no-progress``.

    ``threads``: the default for ``--threads`` (None: torch's own). Tutorials on tiny tensors
    use 1: on a busy two-core machine a second intra-op thread made small ops 20-40x slower."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long run with tiny sizes (used by the tests)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--out", default=os.path.join("results", name), help="folder for figures and tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def setup(args) -> torch.device:
    """Seed everything (torch, numpy, random), create the results folder, return the device."""
    random.seed(args.seed)
    np.random.seed(args.seed)  # torchdyn's toy datasets draw from numpy's global generator
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    return torch.device(args.device)


def train(
    loss_fn: Callable[[int], torch.Tensor],
    params: Iterable[torch.nn.Parameter],
    iterations: int,
    lr: float = 1e-2,
    lr_min: Optional[float] = None,
    desc: str = "training",
    progress: bool = True,
) -> List[float]:
    """Adam (with cosine annealing to ``lr_min`` when given) on ``loss_fn(iteration)``."""
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=lr_min) if lr_min else None
    bar = progress_bar(iterations, progress, desc)  # None without tqdm or a terminal: no bar lines in logs
    losses = []
    try:
        for i in range(iterations):
            loss = loss_fn(i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return losses


def write_json(out: str, name: str, obj) -> str:
    path = os.path.join(out, name)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
    return path


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


class FinalState(torch.nn.Module):
    """Takes the last state of a NeuralODE's trajectory ``[T, B, ...]`` (put after a
    ``NeuralODE(..., return_t_eval=False)`` in an ``nn.Sequential``)."""

    def forward(self, trajectory: torch.Tensor) -> torch.Tensor:
        return trajectory[-1]
