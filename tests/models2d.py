"""Small models shared by the tests: a trained 2-D Neural ODE and a stiff-ish field."""

import numpy as np
import torch
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.datasets import ToyDataset


def trained_moons_node(seed: int = 0, iterations: int = 150):
    """A NeuralODE classifier of torchdyn's moons, trained for a few seconds; returns (model, X)."""
    torch.manual_seed(seed)
    state = np.random.get_state()  # torchdyn's toy datasets draw from numpy's global generator
    np.random.seed(seed)
    try:
        X, y = ToyDataset().generate(n_samples=1024, dataset_type="moons", noise=0.1)
    finally:
        np.random.set_state(state)
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


class VanDerPol(nn.Module):
    """dx = v, dv = mu (1 - x^2) v - x: stiff-ish for large |x|, |v|."""

    def __init__(self, mu: float = 4.0):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))

    def forward(self, t, z):
        x, v = z[:, :1], z[:, 1:]
        return torch.cat([v, self.mu * (1 - x**2) * v - x], 1)
