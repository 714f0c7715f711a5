import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Linear2D(torch.nn.Module):
    """dz/dt = A z with a known exact flow expm(A t)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.register_buffer("A", torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=dtype))

    def forward(self, t, z):
        return z @ self.A.T

    def flow(self, dt, z):
        return z @ torch.linalg.matrix_exp(self.A * dt).T


@pytest.fixture
def linear2d():
    return Linear2D()


def small_mlp(dim=2, hidden=16, dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim)).to(dtype)
