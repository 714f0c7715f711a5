"""tune, fit and MLPHyperNet.standardize_ on hostile inputs: the user's model is left exactly as it was,
constant features get a sane scale, and bad inputs are refused by name (with what to do)."""

import copy
import json
import math
import os
import re
import stat
import warnings

import pytest
import torch
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import Euler, HyperEuler, MLPHyperNet, fit, harvest, tune, tuning
from torchdyn_hypersolvers._reference import reference_solve
from torchdyn_hypersolvers.fit import residual_data
from torchdyn_hypersolvers.shards import harvest_across_ranks
from torchdyn_hypersolvers.tuning import Search, TuneResult, fit_time_grid

SPAN = torch.tensor([0.0, 1.0])
QUICK = dict(nfe=[4], bases=(HyperEuler,), stage_aware=False, iterations=3, grid=False, progress=False)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-noise and vectorisation warnings of tiny fits
        yield


class _NormField(nn.Module):
    """A vector field with a BatchNorm: in train mode every call would move its running statistics."""

    def __init__(self, dim=2):
        super().__init__()
        torch.manual_seed(0)
        self.linear, self.norm = nn.Linear(dim, dim), nn.BatchNorm1d(dim)

    def forward(self, t, z, args=None):
        return torch.tanh(self.norm(self.linear(z)))


def _field(out=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, out))


def _inputs(n=16):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, m.training) for name, m in model.named_modules()],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        [(name, m.nfe) for name, m in model.named_modules() if hasattr(m, "nfe")],
    )


def _assert_untouched(model: nn.Module, before) -> None:
    state, training, grads, counters = _snapshot(model)
    assert state.keys() == before[0].keys()
    for key in state:
        assert torch.equal(state[key], before[0][key]), key
    assert (training, grads, counters) == before[1:]


# 1. every phase of tune leaves the model as it was


def test_tune_leaves_a_train_mode_batchnorm_model_exactly_as_it_was():
    model = NeuralODE(_NormField(), solver="dopri5").train()
    model.vf.nfe = 7
    model.vf.vf.linear.bias.requires_grad_(False)  # a mixed requires_grad comes back as it was
    before = _snapshot(model)
    assert int(model.vf.vf.norm.num_batches_tracked) == 0
    tune(model, _inputs(), SPAN, **{**QUICK, "grid": True, "grid_iterations": 2})
    _assert_untouched(model, before)


# 2. a constant feature gets a sane scale


class _WithConstant(nn.Module):
    """Two moving channels and a third that never changes (a parameter carried in the state)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, z):
        return torch.cat([self.net(z), torch.zeros_like(z[:, :1])], 1)


def test_a_constant_channel_10_percent_off_gives_a_finite_moderate_solve():
    f = _WithConstant()
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    x[:, 2] = 1.0
    result = tune(f, x, SPAN, **{**QUICK, "iterations": 20})
    hs, mesh = result.solver_for(4)
    z = x[:8].clone()
    z[:, 2] = 1.1
    with torch.no_grad():
        final = hs.solve(f, z, mesh, return_trajectory=False)
        ref = reference_solve(f, z, mesh[[0, -1]], "dopri5", 1e-7, 1e-7)[-1]
    assert torch.isfinite(final).all()
    assert float((final - ref).norm(dim=1).max()) < 1.0, (final, ref)


def test_standardize_floors_a_constant_features_scale_at_a_fraction_of_the_others():
    f = _WithConstant()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    x[:, 2] = 5.0
    trajectories = harvest(f, x, SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(3, scaled=True))
    hs.g.standardize_(residual_data(hs, trajectories))
    for name in ("z_std", "dz_std", "out_std"):
        scale = getattr(hs.g, name)
        assert float(scale[2]) > 1e-3 * float(scale[:2].max()), (name, scale)
        assert torch.isfinite(scale).all()


# 3. standardize_ refuses what it cannot read


def test_standardize_refuses_empty_residual_data_by_name():
    trajectories = harvest(NeuralODE(_field()), _inputs(8), SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(2, scaled=True))
    data = residual_data(hs, trajectories)
    empty = data.replace(z=data.z[:, :0], dz=data.dz[:, :0], target=data.target[:, :0])
    with pytest.raises(ValueError, match=r"empty.*residual_data"):
        hs.g.standardize_(empty)
    assert float(hs.g.z_mean.abs().max()) == 0.0  # nothing was set


def test_standardize_refuses_trajectories_and_says_to_pass_residual_data():
    trajectories = harvest(NeuralODE(_field()), _inputs(8), SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(2, scaled=True))
    with pytest.raises(TypeError, match=r"residual_data\(hs, trajectories\)"):
        hs.g.standardize_(trajectories)


# 4. tune's bad inputs, refused by name up front


def _held_out_and_fitted_rows(n=16, seed=0):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # tune's split
    return int(order[0]), int(order[-1])


@pytest.mark.parametrize("share", ["held-out", "fitted"])
def test_tune_names_the_users_row_of_a_nan_input(share):
    held, fitted = _held_out_and_fitted_rows()
    row = held if share == "held-out" else fitted
    x = _inputs()
    x[row, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"rows \[{row}\] .*remove or repair"):
        tune(NeuralODE(_field()), x, SPAN, **QUICK)


def test_tune_refuses_a_split_that_leaves_nothing_to_fit_on():
    with pytest.raises(ValueError, match=r"held_out=0.9 of 4 inputs holds out 4 and leaves 0 to fit on"):
        tune(NeuralODE(_field()), _inputs(4), SPAN, **{**QUICK, "held_out": 0.9})
    with pytest.raises(ValueError, match=r"held_out=4 of 4 inputs holds out 4 and leaves 0 to fit on.*at most 3"):
        tune(NeuralODE(_field()), _inputs(4), SPAN, **{**QUICK, "held_out": 4})


@pytest.mark.parametrize("held_out", [0, -3, 1.0, 256.0, True, "0.25", [8]])
def test_tune_refuses_a_held_out_that_is_neither_a_share_nor_a_count(held_out):
    with pytest.raises(ValueError, match=rf"held_out must be .*got {re.escape(repr(held_out))}"):
        Search(held_out=held_out)


@pytest.mark.parametrize("n, held", [(4, 1), (40, 10), (2048, 512), (10000, 512)])
def test_the_default_held_out_is_a_quarter_of_the_inputs_at_most_held_out_max(n, held):
    assert Search().held_out is None and tuning.HELD_OUT_MAX == 512
    assert tuning._held_out_count(n, None) == held
    assert tuning._held_out_count(n, 0.25) == round(0.25 * n)  # a share is a share, uncapped


def test_a_held_out_count_holds_out_that_many_inputs_and_fits_on_the_rest(monkeypatch):
    harvested = []

    def spy(model, x, *args, **kwargs):
        harvested.append(x)
        return harvest_across_ranks(model, x, *args, **kwargs)

    monkeypatch.setattr(tuning, "harvest_across_ranks", spy)
    x = _inputs(40)
    result = tune(NeuralODE(_field()), x, SPAN, **{**QUICK, "held_out": 7})
    assert len(result.held_out) == 7 and len(set(result.held_out_index.tolist())) == 7
    assert torch.equal(result.held_out, x[result.held_out_index])
    (fitted,) = harvested  # the 33 others, every one of them
    def rows(t):
        return {tuple(r.tolist()) for r in t}

    assert len(fitted) == 33 and rows(fitted) | rows(result.held_out) == rows(x)


def test_tune_refuses_a_field_whose_output_is_not_shaped_like_the_state():
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\) for states of shape \(2, 2\)"):
        tune(NeuralODE(_field(out=3)), _inputs(), SPAN, **QUICK)


class _Cubic(nn.Module):
    """dz/dt = -z**3: stable, but explicit steps of 2500 blow up to inf."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, t, z):
        return -self.w * z**3


def test_tune_says_why_no_budget_has_a_finite_choice():
    with pytest.raises(ValueError, match=r"NFE 4.*(inf|nan)"):
        tune(_Cubic(), _inputs(), torch.tensor([0.0, 1e4]), **QUICK)


def test_solver_for_says_why_a_budget_has_no_choice():
    why = "every hypersolver's held-out error is inf or nan (HyperEuler: inf)"
    result = TuneResult({}, None, {"NFE 4": why}, torch.zeros(1, 2), torch.zeros(1))
    with pytest.raises(KeyError, match="held-out error is inf"):
        result.solver_for(4)
    with pytest.raises(KeyError, match=r"nfe=5 was not tuned"):
        result.solver_for(5)


# 5. a g that holds f


class _HoldsField(nn.Module):
    """A g that keeps the vector field as a submodule (its parameters are among g's) and calls it."""

    hypernet_convention = "dt_t_z_dz"

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, dt, t, z, dz):
        return self.net(torch.cat([z, self.f(t, z), dt.expand(len(z), 1)], 1))


def test_fit_of_a_g_holding_f_leaves_f_unchanged():
    f = _NormField().train()
    trajectories = harvest(f, _inputs(), SPAN, steps=[4])
    hs = HyperEuler(_HoldsField(f))
    before = _snapshot(f)
    net_before = copy.deepcopy(hs.g.net.state_dict())
    report = fit(hs, trajectories, iterations=5, progress=False, seed=0)
    assert all(math.isfinite(v) for v in report.loss_history)
    _assert_untouched(f, before)
    assert any(not torch.equal(v, hs.g.net.state_dict()[k]) for k, v in net_before.items())  # g did learn


# 6. hostile-input pass: dtypes, saving, time grids


def test_tune_refuses_inputs_of_another_dtype_than_the_model_up_front():
    model = NeuralODE(nn.Linear(2, 2).double())
    with pytest.raises(TypeError, match=r"float64.*float32.*x\.double\(\)"):
        tune(model, torch.randn(16, 2), SPAN, **QUICK)


@pytest.fixture(scope="module")
def tuned():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tune(NeuralODE(_field()), _inputs(), SPAN, **QUICK)


def _files_of(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_refuses_a_read_only_tune_md_before_writing_anything(tuned, tmp_path):
    (tmp_path / "tune.md").write_text("mine\n")
    (tmp_path / "tune.md").chmod(0o444)
    with pytest.raises(PermissionError, match=r"tune\.md is read-only.*force=True"):
        tuned.save(tmp_path)
    assert (tmp_path / "tune.md").read_text() == "mine\n"
    assert _files_of(tmp_path) == ["tune.md"]  # no nfe4.pt, no tune.json: no partial save


def test_save_refuses_a_read_only_pt_before_writing_the_table(tuned, tmp_path):
    (tmp_path / "nfe4.pt").write_bytes(b"mine")
    (tmp_path / "nfe4.pt").chmod(0o444)
    with pytest.raises(PermissionError, match=r"nfe4\.pt is read-only"):
        tuned.save(tmp_path)
    assert (tmp_path / "nfe4.pt").read_bytes() == b"mine"
    assert _files_of(tmp_path) == ["nfe4.pt"]


def test_save_with_force_replaces_read_only_files_and_keeps_their_modes(tuned, tmp_path):
    for name in ("tune.md", "tune.json"):
        (tmp_path / name).write_text("mine\n")
        (tmp_path / name).chmod(0o440)
    tuned.save(tmp_path, force=True)
    assert (tmp_path / "tune.md").read_text() == tuned.to_markdown()
    assert "choices" in json.loads((tmp_path / "tune.json").read_text())
    for name in ("tune.md", "tune.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o440
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_save_gives_new_files_the_umask_mode(tuned, tmp_path):
    old = os.umask(0o027)
    try:
        tuned.save(tmp_path)
    finally:
        os.umask(old)
    assert _files_of(tmp_path) == ["nfe4.pt", "tune.json", "tune.md"]
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def test_a_time_grid_that_is_not_1d_is_refused_by_shape():
    hs = HyperEuler(MLPHyperNet(2))
    with pytest.raises(ValueError, match=r"1-D.*shape \(2, 2\)"):
        hs.time_grid = [[0, 0.5], [1, 2]]
    assert hs.time_grid is None
    with pytest.raises(ValueError, match=r"1-D.*shape \(\)"):
        hs.time_grid = torch.tensor(1.0)


def _decay(t, z):
    return -z


@pytest.mark.parametrize("which", ["z0", "z1"])
def test_fit_time_grid_refuses_non_finite_states_by_rows(which):
    z0 = torch.randn(16, 2)
    z1 = z0 * math.exp(-1)
    (z0 if which == "z0" else z1)[[3, 5], 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{which} has non-finite.*2 of 16 rows.*\[3, 5\]"):
        fit_time_grid(Euler(), _decay, z0, z1, SPAN, steps=4, iterations=20)


def test_fit_time_grid_refuses_empty_states():
    z0 = torch.randn(0, 2)
    with pytest.raises(ValueError, match=r"z0 is empty \(0 rows"):
        fit_time_grid(Euler(), _decay, z0, z0, SPAN, steps=4, iterations=20)


class _GoesNan(nn.Module):
    """dz/dt = -z until its ``after``-th call, nan from then on."""

    def __init__(self, after):
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, t, z):
        self.calls += 1
        return -z if self.calls <= self.after else torch.full_like(z, float("nan"))


def test_fit_time_grid_warns_when_the_loss_goes_non_finite_midway():
    z0 = torch.randn(16, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grid = fit_time_grid(Euler(), _GoesNan(after=10), z0, z0 * math.exp(-1), SPAN, steps=4, iterations=20)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any(re.search(r"iteration 3 of 20.*last finite grid", m) for m in messages), messages
    assert torch.isfinite(grid).all() and len(grid) == 5


def test_fit_time_grid_refuses_a_grid_that_collides_at_the_states_dtype():
    z0 = torch.randn(8, 2)
    span = torch.tensor([1e4, 1e4 + 1e-3])
    collide = r"8 steps on \[10000, 10000.*\] collide at float32 resolution.*use float64 or shift t"
    with pytest.raises(ValueError, match=collide):
        fit_time_grid(Euler(), _decay, z0, z0, span, steps=8)
    grid = fit_time_grid(Euler(), _decay, z0.double(), z0.double(), span.double(), steps=8, iterations=2)
    assert bool((grid[1:] > grid[:-1]).all())


class _NormDecay(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, t, z):
        return -self.bn(z)


def test_fit_time_grid_leaves_a_train_mode_batchnorm_field_exactly_as_it_was():
    f = _NormDecay().train()
    f.bn.bias.requires_grad_(False)
    before = _snapshot(f)
    z0 = torch.randn(16, 2)
    fit_time_grid(Euler(), f, z0, z0 * math.exp(-1), SPAN, steps=4, iterations=5)
    _assert_untouched(f, before)


def test_tune_skips_a_learned_grid_that_would_collide_and_says_why():
    span = torch.tensor([1000.0, 1001.0])  # 32 uniform steps are fine in float32; a learned grid's smallest is not
    result = tune(NeuralODE(_field()), _inputs(), span, **{**QUICK, "nfe": [32], "grid": True, "grid_iterations": 2})
    assert "collide at float32 resolution" in result.pruned["time grid at NFE 32"]
    assert not result.choices[32].learned_grid
