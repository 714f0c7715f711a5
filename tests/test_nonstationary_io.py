"""save / load of non-stationary solvers: rebuilt from the file alone, bit for bit."""

import re
import time

import pytest
import torch
from torch import nn

from torchdyn_hypersolvers import MLPHyperNet, load, save
from torchdyn_hypersolvers.nonstationary import NonStationaryCoefficients, NonStationarySolver
from torchdyn_hypersolvers.tableaus import ButcherTableau
from torchdyn_hypersolvers.tuning import Choice, TuneResult

GRID = [0.0, 0.3, 0.45, 1.0]
ALPHA = ButcherTableau("alpha(0.75)", 2, ((0.75,),), (1 - 1 / 1.5, 1 / 1.5), (0.0, 0.75))  # no package name


class Field(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)

    def forward(self, t, z, args=None):
        return self.net(torch.cat([z, t.expand(len(z), 1).to(z.dtype)], 1))


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)

    def forward(self, dt, t, z, dz):
        return self.net(z)


def _changed(hs):
    """Random deltas, weights and scales (the package's nets start with a zero last layer and unit scales)."""
    with torch.no_grad():
        for p in hs.parameters():
            p.normal_(0.0, 0.2)
        for b in hs.buffers():
            b.uniform_(0.5, 1.5)
    hs.time_grid = torch.tensor(GRID, dtype=hs.coefficients.deltas.dtype)
    return hs


SOLVERS = {
    "alone": lambda: NonStationarySolver("rk4", 3),
    "alone-float64": lambda: NonStationarySolver("midpoint", 3).double(),
    "alone-own-tableau": lambda: NonStationarySolver(ALPHA, 3),
    "mlp-time-scaled": lambda: NonStationarySolver("heun", 3, g=MLPHyperNet(2, (8,), time=True, scaled=True)),
    "mlp-stages": lambda: NonStationarySolver("midpoint", 3, g=MLPHyperNet(2, (8,), stages=2)),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_load_rebuilds_it_without_g_bit_exact(name, tmp_path):
    hs = _changed(SOLVERS[name]())
    save(hs, tmp_path / "ns.pt")
    rng = torch.random.get_rng_state()
    loaded = load(tmp_path / "ns.pt")
    assert torch.equal(rng, torch.random.get_rng_state())
    assert type(loaded) is NonStationarySolver and type(loaded.coefficients) is NonStationaryCoefficients
    assert loaded.tableau == hs.tableau and loaded.steps == 3 and loaded.convention == hs.convention
    assert loaded.coefficients.config == hs.coefficients.config
    assert torch.equal(loaded.time_grid, hs.time_grid)
    before, after = hs.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    dtype = hs.coefficients.deltas.dtype
    f, z0 = Field(dtype), torch.randn(8, 2, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded.solve(f, z0, loaded.time_grid), hs.solve(f, z0, hs.time_grid))
    assert loaded.describe() == hs.describe()


def test_config_is_plain_data_with_the_inner_g_record(tmp_path):
    hs = NonStationarySolver("heun", 4, g=MLPHyperNet(2, (8,), time=True, scaled=True))
    assert hs.coefficients.config == {
        "base": "heun",
        "steps": 4,
        "convention": "dt_t_z_dz",
        "g": {
            "class": "MLPHyperNet",
            "module": "torchdyn_hypersolvers.hypernets",
            "config": {"state_dim": 2, "hidden": [8], "activation": "silu", "time": True, "scaled": True},
        },
    }
    assert NonStationarySolver(ALPHA, 2).coefficients.config["base"]["name"] == "alpha(0.75)"  # as data
    save(hs, tmp_path / "ns.pt")
    record = torch.load(tmp_path / "ns.pt", weights_only=True)["hypernet"]
    assert record == {
        "class": "NonStationaryCoefficients",
        "module": "torchdyn_hypersolvers.nonstationary",
        "config": hs.coefficients.config,
    }


def test_a_user_inner_g_is_refused_with_how_to_load_it(tmp_path):
    hs = _changed(NonStationarySolver("midpoint", 3, g=UserNet()))
    save(hs, tmp_path / "ns.pt")
    assert hs.coefficients.config["g"] == {"class": "UserNet", "module": __name__, "config": None}
    hint = "pass an instance, load(path, g=NonStationaryCoefficients(base, steps, g=UserNet(...)))"
    with pytest.raises(ValueError, match=r"user hypernet UserNet .*" + re.escape(hint)):
        load(tmp_path / "ns.pt")
    loaded = load(tmp_path / "ns.pt", g=NonStationaryCoefficients("midpoint", 3, g=UserNet()))
    f, z0 = Field(), torch.randn(8, 2)
    with torch.no_grad():
        assert torch.equal(loaded.solve(f, z0, loaded.time_grid), hs.solve(f, z0, hs.time_grid))


def _tampered(tmp_path, change):
    path = tmp_path / "ns.pt"
    save(_changed(NonStationarySolver("heun", 3, g=MLPHyperNet(2, (8,), time=True))), path)
    blob = torch.load(path, weights_only=True)
    change(blob["hypernet"]["config"])
    torch.save(blob, path)
    return path


_NESTED = {"class": "NonStationaryCoefficients", "module": "torchdyn_hypersolvers.nonstationary"}


def _inner(key, value):
    return lambda config: config["g"]["config"].__setitem__(key, value)


TAMPERED = {
    "steps-zero": (lambda c: c.update(steps=0), r"does not build a NonStationaryCoefficients: .*steps must be a pos"),
    "steps-huge": (lambda c: c.update(steps=2**40), r"implies .* parameters with other shapes.*deltas"),
    "steps-other": (lambda c: c.update(steps=4), r"deltas: config \(4, 4\) vs file \(3, 4\)"),
    "base-other": (lambda c: c.update(base="rk4"), r"start from base 'rk4', not from the solver's 'heun'"),
    "base-unknown": (lambda c: c.update(base="leapfrog"), r"base 'leapfrog' is none of"),
    "base-bad-record": (lambda c: c.update(base={"name": "heun"}), r"coefficients' base\): its tableau lacks"),
    "convention": (lambda c: c.update(convention="sideways"), r"unknown hypernet convention 'sideways'"),
    "extra-key": (lambda c: c.update(seed=3), r"config has the keys \['base', 'convention', 'g', 'seed', 'steps'\]"),
    "g-not-a-record": (lambda c: c.update(g="MLPHyperNet"), r"its coefficients' g record needs a class name"),
    "g-config-not-a-dict": (lambda c: c["g"].update(config=[8]), r"its coefficients' g config must be a dict"),
    "g-hidden": (_inner("hidden", [16]), r"g\.net\.0\.weight: config \(16, 6\) vs file \(8, 6\)"),
    "g-hidden-huge": (_inner("hidden", [2**17, 2**17]), r"implies .* parameters"),
    "g-bad-value": (_inner("state_dim", "two"), r"does not build a NonStationaryCoefficients"),
    "g-other-module": (lambda c: c["g"].update(module="elsewhere"), r"user hypernet MLPHyperNet \(from module else"),
    "g-nested": (lambda c: c["g"].update(_NESTED, config=dict(c)), r"g is NonStationaryCoefficients again"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_config_is_refused_by_name(tmp_path, case):
    change, match = TAMPERED[case]
    path = _tampered(tmp_path, change)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as info:
        load(path)
    assert time.perf_counter() - start < 3
    if case != "g-other-module":
        assert f"{path} is corrupt" in str(info.value)


def test_a_file_saved_before_the_config_asks_for_the_coefficients(tmp_path):
    path = _tampered(tmp_path, lambda c: None)
    blob = torch.load(path, weights_only=True)
    blob["hypernet"]["config"] = None  # as saved before NonStationaryCoefficients had a config
    torch.save(blob, path)
    with pytest.raises(ValueError, match=re.escape("pass load(path, g=NonStationaryCoefficients(base, steps, g=YourG")):
        load(path)
    loaded = load(path, g=NonStationaryCoefficients("heun", 3, g=MLPHyperNet(2, (8,), time=True)))
    assert loaded.steps == 3 and loaded.time_grid.tolist() == pytest.approx(GRID)


def test_a_tune_result_saves_a_non_stationary_choice_loadably(tmp_path):
    hs = _changed(NonStationarySolver("midpoint", 3, g=MLPHyperNet(2, (8,))))
    mesh = hs.time_grid
    choice = Choice(6, "NonStationary midpoint", hs, mesh, 3, 0.1, 0.2, 1.0, True, fitted_for_budget=True)
    result = TuneResult({6: choice}, [], {}, torch.zeros(4, 2), torch.arange(4))
    result.save(tmp_path / "tuned")
    loaded = load(tmp_path / "tuned" / "nfe6.pt")
    f, z0 = Field(), torch.randn(8, 2)
    with torch.no_grad():
        assert torch.equal(loaded.solve(f, z0, loaded.time_grid), hs.solve(f, z0, mesh))
