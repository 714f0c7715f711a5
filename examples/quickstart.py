"""Quickstart: a hypersolver dropped into a torchdyn NeuralODE.

Builds a small 2-D Neural ODE, solves it with an (unfitted) HyperEuler and with
Euler, and prints the function evaluations torchdyn counted. The fitting and
evaluation steps join this script as they land.
"""

import argparse

import torch
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest run (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    f = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
    model = NeuralODE(f, solver=HyperEuler(MLPHyperNet(2)))
    x, t_span = torch.randn(256, 2), torch.linspace(0, 1, 11)
    _, traj = model(x, t_span)
    _, euler = NeuralODE(f, solver="euler")(x, t_span)
    print(f"HyperEuler: trajectory {tuple(traj.shape)}, {model.vf.nfe:.0f} f evaluations for 10 steps")
    print(f"max |HyperEuler - Euler| with g unfitted: {(traj - euler).abs().max():.2e}")


if __name__ == "__main__":
    main()
