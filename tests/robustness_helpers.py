"""Fields, hypersolvers and trajectories shared by the test_robust_*.py files."""

import torch
from conftest import Linear2D
from torch import nn

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, harvest

SPAN = torch.linspace(0, 1, 2)
NAN, INF = float("nan"), float("inf")
BOTH_DTYPES = r"(?s)(float64.*float32|float32.*float64)"


class Field(nn.Module):
    """dz/dt = -a z + b sin(flip(z)): smooth, for states of any size and floating dtype; counts its calls."""

    def __init__(self, a=0.7, b=0.3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.calls = 0

    def forward(self, t, z, args=None):  # args: torchdyn's DEFunc passes it to fields that take t
        self.calls += 1
        return -self.a * z + self.b * torch.sin(z.flip(-1))


def _perturbed(g, scale=0.3):
    """Random weights everywhere (the package's hypernets start with a zero last layer)."""
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, scale)
    return g


def _hs(dim=2):
    return HyperEuler(_perturbed(MLPHyperNet(dim, hidden=(8,))))


def _linear_trajectories(n=16, steps=4, dtype=torch.float32, **kwargs):
    f = Linear2D(dtype)
    return harvest(f, torch.randn(n, 2, dtype=dtype), SPAN, steps=[steps], **kwargs)
