"""save / load of fitted hypersolvers, and the validity record (model card) they carry."""

import pathlib
import warnings

import pytest
import torch
from conftest import Linear2D, small_mlp
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.numerics import odeint

import torchdyn_hypersolvers
from torchdyn_hypersolvers import (
    ConvHyperNet,
    Euler,
    HyperAlpha,
    HyperEuler,
    HyperHeun,
    HyperMidpoint,
    HyperRalston,
    HyperRK4,
    MLPHyperNet,
    fit,
    harvest,
    load,
    save,
)
from torchdyn_hypersolvers.io import FORMAT_VERSION
from torchdyn_hypersolvers.tableaus import EULER
from torchdyn_hypersolvers.validity import Validity

SOLVERS = {
    "HyperEuler": lambda g: HyperEuler(g),
    "HyperMidpoint": lambda g: HyperMidpoint(g),
    "HyperHeun": lambda g: HyperHeun(g),
    "HyperRalston": lambda g: HyperRalston(g),
    "HyperRK4": lambda g: HyperRK4(g),
    "HyperAlpha": lambda g: HyperAlpha(g, alpha=0.75),
}


class UserNet(nn.Module):
    """A user's own g, torchdyn-tutorial style: forward(t, z)."""

    def __init__(self, dim=2, hidden=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, t, z):
        return self.scale * self.net(z)


def _perturbed(g):
    """Give every parameter of g random values (the package's nets start with a zero last layer)."""
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, 0.3)
    return g


HYPERNETS = {
    "mlp": (lambda: _perturbed(MLPHyperNet(2, hidden=(8, 8))), lambda: torch.randn(5, 2), None),
    "conv": (lambda: _perturbed(ConvHyperNet(2, hidden=4)), lambda: torch.randn(3, 2, 4, 4), None),
    "user": (lambda: _perturbed(UserNet()), lambda: torch.randn(5, 2), lambda: UserNet()),
}


def _field(z0):
    """A time-free vector field module for states like ``z0`` (what NeuralODE takes) and ``f(t, z)``."""
    if z0.dim() == 2:
        module = small_mlp(dtype=z0.dtype)
    else:
        module = nn.Sequential(nn.Conv2d(z0.shape[1], z0.shape[1], 3, padding=1), nn.Tanh()).to(z0.dtype)
    return module, lambda t, z: module(z)


@pytest.mark.parametrize("net", sorted(HYPERNETS))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_round_trip_is_bit_exact(solver, net, tmp_path):
    make_g, make_z0, fresh_g = HYPERNETS[net]
    hs = SOLVERS[solver](make_g())
    hs.validity = Validity(0.1, 0.25, make_z0().shape[1:], "hand-made record")
    z0 = make_z0()
    (module, f), t_span = _field(z0), torch.linspace(0, 1, 6)
    path = tmp_path / "hs.pt"
    save(hs, path)
    loaded = load(path, g=fresh_g() if fresh_g else None)
    assert type(loaded) is type(hs) and loaded.tableau == hs.tableau and loaded.convention == hs.convention
    assert type(loaded.g) is type(hs.g) and loaded.g is not hs.g
    before, after = hs.g.state_dict(), loaded.g.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(loaded.solve(f, z0, t_span), hs.solve(f, z0, t_span))
        assert torch.equal(NeuralODE(module, solver=loaded)(z0, t_span)[1], NeuralODE(module, solver=hs)(z0, t_span)[1])
    assert loaded.validity == hs.validity
    assert loaded.describe() == hs.describe()


def test_float64_weights_and_alpha_survive(tmp_path):
    hs = HyperAlpha(_perturbed(MLPHyperNet(2)).double(), alpha=0.6)
    save(hs, tmp_path / "hs.pt")
    loaded = load(tmp_path / "hs.pt", base=hs.tableau)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert loaded.tableau == hs.tableau and loaded.tableau.c[1] == 0.6
    z0, (_, f) = torch.randn(4, 2, dtype=torch.float64), _field(torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(loaded.solve(f, z0, torch.linspace(0, 1, 4)), hs.solve(f, z0, torch.linspace(0, 1, 4)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A HyperEuler fitted for a few iterations on a linear field, meshes of 5 and 10 steps on [0, 1]."""
    torch.manual_seed(0)
    field = Linear2D(dtype=torch.float32)
    trajectories = harvest(field, torch.randn(32, 2), torch.linspace(0, 1, 2), steps=[5, 10])
    hs = HyperEuler(MLPHyperNet(2, hidden=(16, 16)))
    report = fit(hs, trajectories, iterations=20, seed=0, progress=False)
    path = tmp_path_factory.mktemp("io") / "fitted.pt"
    save(hs, path, trajectories, report)
    return hs, trajectories, report, path, field


def test_file_holds_the_model_card_as_plain_data(fitted):
    hs, trajectories, report, path, _ = fitted
    blob = torch.load(path, weights_only=True)
    assert blob["format_version"] == FORMAT_VERSION
    assert blob["package_version"] == torchdyn_hypersolvers.__version__ and blob["torch_version"] == torch.__version__
    assert blob["tableau"] == {"name": "euler", "order": 1, "a": [], "b": [1.0], "c": [0.0]}
    assert blob["hypernet"] == {
        "class": "MLPHyperNet",
        "module": "torchdyn_hypersolvers.hypernets",
        "config": {"state_dim": 2, "hidden": [16, 16], "activation": "silu"},
    }
    assert blob["convention"] == "dt_t_z_dz" and blob["solver"] == "HyperEuler"
    meta = blob["trajectories"]
    assert meta["steps"] == [5, 10] and meta["state_shape"] == [2] and meta["count"] == 32
    assert torch.equal(meta["t"], trajectories.t) and meta["reference"] == trajectories.reference
    assert meta["atol"] == trajectories.atol and meta["rtol"] == trajectories.rtol
    assert meta["step_sizes"][5] == pytest.approx([0.2, 0.2]) and meta["step_sizes"][10] == pytest.approx([0.1, 0.1])
    assert blob["report"]["method"] == "residual" and blob["report"]["iterations"] == 20
    assert blob["report"]["final_loss"] == report.loss_history[-1]
    assert blob["report"]["residual_error"] == report.residual_error
    assert blob["report"]["base_residual_error"] == report.base_residual_error
    assert blob["report"]["wall_time"] == report.wall_time
    assert blob["validity"]["dt_min"] == pytest.approx(0.1) and blob["validity"]["dt_max"] == pytest.approx(0.2)


def test_fit_records_validity_and_describe_says_it(fitted):
    hs, _, _, path, _ = fitted
    assert hs.validity.dt_min == pytest.approx(0.1) and hs.validity.dt_max == pytest.approx(0.2)
    assert hs.validity.state_shape == (2,)
    text = hs.describe()
    for part in ("HyperEuler", "euler", "MLPHyperNet(state_dim=2", "residual fit (20 iterations)", "[5, 10] steps"):
        assert part in text, (part, text)
    assert "[0.1, 0.2]" in text and "(2,)" in text
    assert load(path).describe() == text
    assert "No fitting record" in HyperEuler(MLPHyperNet(2)).describe()


def _warnings_of(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, UserWarning) and "where its g was fitted" in str(w.message)]


def test_validity_warning_once_per_solve_outside_and_quiet_inside(fitted):
    _, _, _, path, field = fitted
    hs = load(path)
    x = torch.randn(7, 2)
    model = NeuralODE(lambda z: field(None, z), solver=hs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for steps in (5, 10, 8):  # dt 0.2, 0.1, 0.125: inside
            model(x, torch.linspace(0, 1, steps + 1))
            hs.solve(field, x, torch.linspace(0, 1, steps + 1))
        hs.solve(field, x, torch.linspace(0, 0.2 * 1.04 * 3, 4))  # 4% beyond dt_max: within tolerance
        hs.solve(field, torch.randn(50, 2), torch.linspace(0, 1, 6))  # another batch size
        hs.solve(field, x, torch.linspace(0, 1, 41), correct=False)  # the base solver is not g
        HyperEuler(MLPHyperNet(2)).solve(field, x, torch.linspace(0, 1, 41))  # no record, no check
    for run in (
        lambda: model(x, torch.linspace(0, 1, 41)),  # dt 0.025, 40 steps: one warning, not 40
        lambda: hs.solve(field, x, torch.linspace(0, 1, 3)),  # dt 0.5
        lambda: hs.solve(field, x, torch.linspace(0, 0.2 * 1.06 * 3, 4)),  # 6% beyond dt_max
        lambda: odeint(field, x, torch.linspace(1, 0, 41), solver=hs),
    ):
        caught = _warnings_of(run)
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "step sizes |dt|" in str(caught[0].message) and "[0.1, 0.2]" in str(caught[0].message)


def test_validity_warns_on_another_state_shape():
    hs = HyperEuler(ConvHyperNet(1, hidden=4))
    hs.validity = Validity(0.1, 0.1, (1, 4, 4), "hand-made")
    model = NeuralODE(nn.Tanh(), solver=hs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(3, 1, 4, 4), torch.linspace(0, 1, 11))
    caught = _warnings_of(lambda: model(torch.randn(3, 1, 6, 6), torch.linspace(0, 1, 11)))
    assert len(caught) == 1 and "states of shape (1, 6, 6)" in str(caught[0].message)


def test_refitting_elsewhere_does_not_warn_and_moves_the_record(fitted):
    _, _, _, path, field = fitted
    hs = load(path)  # fitted on dt 0.1 .. 0.2
    other = harvest(field, torch.randn(16, 2), torch.linspace(0, 1, 2), steps=[20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(hs, other, method="trajectory", iterations=3, progress=False, seed=0)
    assert hs.validity.dt_min == pytest.approx(0.05) and hs.validity.dt_max == pytest.approx(0.05)
    assert "trajectory fit" in hs.validity.description


def test_refusals_name_what_is_wrong(fitted, tmp_path):
    _, trajectories, _, path, _ = fitted
    with pytest.raises(ValueError, match=r"base solver 'euler' \(order 1\), not the requested 'rk4' \(order 4\)"):
        load(path, base="rk4")
    for same in ("euler", EULER, Euler()):
        assert load(path, base=same).tableau == EULER
    with pytest.raises(ValueError, match=r"do not fit the given g \(MLPHyperNet\): missing keys \['net\.6\.bias'"):
        load(path, g=MLPHyperNet(2, hidden=(16, 16, 16)))
    with pytest.raises(ValueError, match=r"unexpected keys \['net\.4\.bias', 'net\.4\.weight'\]"):
        load(path, g=MLPHyperNet(2, hidden=(16,)))
    with pytest.raises(ValueError, match=r"net\.2\.weight: file \(16, 16\) vs g \(32, 16\)"):
        load(path, g=MLPHyperNet(2, hidden=(16, 32)))
    with pytest.raises(ValueError, match=r"torch\.float32 vs g torch\.float64 \(cast g first\)"):
        load(path, g=MLPHyperNet(2, hidden=(16, 16)).double())

    user = tmp_path / "user.pt"
    save(HyperEuler(UserNet()), user)
    with pytest.raises(ValueError, match=r"user hypernet UserNet .*pass an instance, load\(path, g=UserNet\(...\)\)"):
        load(user)

    blob = torch.load(path, weights_only=True)
    blob["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(blob, newer)
    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}, newer than the {FORMAT_VERSION}"):
        load(newer)

    data = pathlib.Path(path).read_bytes()
    for name, content in [("truncated.pt", data[: len(data) // 2]), ("garbage.pt", b"not a hypersolver file" * 50)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"cannot read {tmp_path / name} as a hypersolver file"):
            load(tmp_path / name)

    trajectories.save(tmp_path / "traj.pt")
    with pytest.raises(ValueError, match="not a hypersolver file .*looks like a Trajectories file"):
        load(tmp_path / "traj.pt")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="not an nn.Module: there are no weights to save"):
        save(HyperEuler(lambda dt, t, z, dz: z), tmp_path / "fn.pt")


class _Plant:
    """Pickles to a call that creates a file: loading must never run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"kind": "torchdyn_hypersolvers.hypersolver", "format_version": 1, "plant": _Plant(marker)}, path)
    with pytest.raises(ValueError, match=rf"cannot read {path} as a hypersolver file"):
        load(path)
    assert not marker.exists()


def test_loading_leaves_the_global_rng_alone(fitted):
    state = torch.random.get_rng_state()
    load(fitted[3])
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_saved_on_cuda_loads_on_cpu_and_back(tmp_path):
    hs = HyperHeun(_perturbed(MLPHyperNet(2))).cuda()
    save(hs, tmp_path / "hs.pt")
    on_cpu = load(tmp_path / "hs.pt")
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    assert all(torch.equal(a.cpu(), b) for a, b in zip(hs.parameters(), on_cpu.parameters()))
    on_gpu = load(tmp_path / "hs.pt", map_location="cuda")
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    mlp, z0, t_span = small_mlp().cuda(), torch.randn(4, 2).cuda(), torch.linspace(0, 1, 5)
    f = lambda t, z: mlp(z)  # noqa: E731
    assert torch.equal(on_gpu.solve(f, z0, t_span), hs.solve(f, z0, t_span))
