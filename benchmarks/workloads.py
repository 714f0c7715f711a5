"""The models the benchmarks measure, built and trained in seconds, offline."""

from __future__ import annotations

import torch
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.datasets import ToyDataset


def moons_node(seed: int = 0, iterations: int = 150):
    """A 2-D NeuralODE classifier of torchdyn's moons; returns (model, inputs)."""
    torch.manual_seed(seed)
    X, y = ToyDataset().generate(n_samples=2048, dataset_type="moons", noise=0.1)
    f = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
    model = NeuralODE(f, solver="tsit5", atol=1e-4, rtol=1e-4)
    head = nn.Linear(2, 2)
    opt = torch.optim.Adam([*f.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(iterations):
        idx = torch.randint(0, len(X), (128,))
        _, traj = model(X[idx], torch.linspace(0, 1, 2))
        loss = nn.functional.cross_entropy(head(traj[-1]), y[idx].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, X
