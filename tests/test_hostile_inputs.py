"""Findings of the hostile-input pass over tune, Guarded, control, scaled hypernets, time grids and
files: each one failed (hung, corrupted, answered silently wrong, or raised an obscure error)
before it was fixed."""

import os
import stat
import warnings

import pytest
import torch

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit, harvest, load, save
from torchdyn_hypersolvers.control import ControlledSystem, rollout
from torchdyn_hypersolvers.harvest import NonFiniteSolveError, Trajectories
from torchdyn_hypersolvers.validity import OutsideFitWarning

SPAN = torch.linspace(0, 1, 2)


def decay(t, z):
    return -z


@pytest.fixture
def fitted():
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    traj = harvest(decay, torch.randn(16, 2), SPAN, steps=[4])
    fit(hs, traj, iterations=3, progress=False)
    return hs


# -- hangs: an adaptive solve meeting nan --


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
def test_a_rollout_whose_controller_returns_nan_is_refused_by_name(solver):
    system = ControlledSystem(lambda t, x, u: -x + u, 1)
    nan = lambda t, x: torch.full((x.shape[0], 1), float("nan"))  # noqa: E731
    with pytest.raises(ValueError, match="the controller returned nan or inf at t=0"):
        rollout(solver, system, nan, torch.randn(3, 1), torch.linspace(0, 1, 5))


@pytest.mark.parametrize("reference", ["torchdyn:dopri5", "torchdyn:tsit5", "torchdiffeq:dopri5"])
def test_harvest_on_a_field_that_turns_nan_partway_stops_and_names_the_time(reference):
    def field(t, z):
        return -z * (1.0 if float(t) < 0.3 else float("nan"))

    with pytest.raises(NonFiniteSolveError, match=r"returned nan or inf at t=0\.[34]\d* for 3 of 3 states"):
        harvest(field, torch.randn(3, 2), SPAN, reference=reference)


# -- rollout: obscure errors --


def test_a_rollout_controller_may_return_a_number():
    system = ControlledSystem(lambda t, x, u: -x + u, 1)
    result = rollout("rk4", system, lambda t, x: 0.5, torch.randn(3, 1), torch.linspace(0, 1, 5))
    assert result.u.shape == (4, 3, 1) and bool((result.u == 0.5).all())


def test_sampled_controls_must_cover_every_interval():
    system = ControlledSystem(lambda t, x, u: -x + u, 1)
    with pytest.raises(ValueError, match=r"hold 5 intervals, but t_span has 11 control instants \(10 intervals\)"):
        rollout("rk4", system, torch.randn(5, 3, 1), torch.randn(3, 1), torch.linspace(0, 1, 11))


# -- files --


def test_a_cache_in_a_missing_folder_is_refused_before_any_solve(tmp_path):
    calls = []

    def field(t, z):
        calls.append(1)
        return -z

    with pytest.raises(FileNotFoundError, match="the folder .*missing.* does not exist"):
        harvest(field, torch.randn(3, 2), SPAN, cache=tmp_path / "missing" / "c.pt")
    assert not calls


def test_save_keeps_the_mode_of_a_replaced_file_and_the_umask_for_new_ones(fitted, tmp_path):
    old = os.umask(0o022)
    try:
        save(fitted, tmp_path / "new.pt")
        assert stat.S_IMODE(os.stat(tmp_path / "new.pt").st_mode) == 0o644
        os.chmod(tmp_path / "new.pt", 0o640)
        save(fitted, tmp_path / "new.pt")
        assert stat.S_IMODE(os.stat(tmp_path / "new.pt").st_mode) == 0o640
        Trajectories(SPAN, torch.zeros(2, 1, 2), {1: torch.arange(2)}).save(tmp_path / "t.pt")
        assert stat.S_IMODE(os.stat(tmp_path / "t.pt").st_mode) == 0o644
    finally:
        os.umask(old)


def test_save_refuses_a_read_only_file_unless_forced(fitted, tmp_path):
    path = tmp_path / "ro.pt"
    save(fitted, path)
    os.chmod(path, 0o444)
    before = path.read_bytes()
    with pytest.raises(PermissionError, match="read-only .*force=True"):
        save(HyperEuler(MLPHyperNet(2, hidden=(8,))), path)
    assert path.read_bytes() == before
    save(fitted, path, force=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444


def test_a_time_grid_edited_outside_the_fitted_interval_is_refused_on_load(fitted, tmp_path):
    fitted.time_grid = torch.linspace(0, 1, 5)
    path = tmp_path / "tuned.pt"
    save(fitted, path)
    assert torch.equal(load(path).time_grid, torch.linspace(0, 1, 5))
    blob = torch.load(path, weights_only=True)
    blob["time_grid"][-1] = 1.02  # t1 left at 1.0
    torch.save(blob, path)
    with pytest.raises(ValueError, match="time grid runs from t=0 to t=1.02 but g was fitted from t=0 to t=1"):
        load(path)


# -- warnings --


def test_each_distinct_outside_the_fit_problem_is_shown_once_at_the_callers_line(fitted):
    x = torch.randn(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):  # the same problems again are not shown again
            fitted.solve(decay, x, torch.linspace(0, 1, 9))
            fitted.solve(decay, x, torch.linspace(0, 3, 13))
            fitted.solve(decay, x, torch.linspace(1, 0, 5))
    mine = [w for w in caught if issubclass(w.category, OutsideFitWarning)]
    assert len(mine) == 3
    assert {os.path.basename(w.filename) for w in mine} == {os.path.basename(__file__)}
    texts = [str(w.message) for w in mine]
    assert texts[0].startswith("HyperEuler is solving with step sizes |dt| in [0.125, 0.125]")
    assert texts[1].startswith("HyperEuler is solving over the interval from t=0 to t=3")
    assert texts[2].startswith("HyperEuler is solving backward in time")


# -- another model --


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


class _Field(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.net = _net(seed)

    def forward(self, t, z, args=None):  # args: torchdyn's DEFunc passes it to fields that take t
        return self.net(z)


def _outside(caught):
    return [w for w in caught if issubclass(w.category, OutsideFitWarning) and "other weights" in str(w.message)]


def test_a_hypersolver_used_with_another_model_warns_once_per_model_object(tmp_path, monkeypatch):
    from torchdyn.core import NeuralODE

    import torchdyn_hypersolvers._model_identity as identity

    fitted_on, other, third = _Field(0), _Field(1), _Field(2)
    x, span = torch.randn(8, 2), torch.linspace(0, 1, 5)
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    fit(hs, harvest(fitted_on, x, SPAN, steps=[4]), iterations=2, progress=False)
    assert hs.validity.model is not None and "digest" not in hs.validity.description
    hashed = []
    monkeypatch.setattr(identity, "update_digest", lambda d, t: (hashed.append(1), d.update(b"x"))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hs.solve(fitted_on, x, span)  # the model it was fitted on, also as a closure: no word
        hs.solve(lambda t, z: fitted_on.net(z), x, span)
        assert _outside(caught) == [] and hashed == []  # digests cached since the fit: no pass over weights
        hs.solve(other, x, span)
        hs.solve(other, x, span)
        NeuralODE(third, solver=hs)(x, span)
    assert len(_outside(caught)) == 2  # once for `other`, once for `third` (through torchdyn's odeint)
    assert all(os.path.basename(w.filename) == os.path.basename(__file__) for w in _outside(caught))
    monkeypatch.undo()
    save(hs, tmp_path / "hs.pt")  # the digest travels with the file
    loaded = load(tmp_path / "hs.pt")
    assert loaded.validity.model == hs.validity.model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded.solve(fitted_on, x, span)
        loaded.solve(_Field(3), x, span)
    assert len(_outside(caught)) == 1


def test_a_field_without_modules_records_no_model():
    hs, x = HyperEuler(MLPHyperNet(2, hidden=(8,))), torch.randn(8, 2)
    fit(hs, harvest(decay, x, SPAN, steps=[4]), iterations=2, progress=False)
    assert hs.validity.model is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideFitWarning)
        hs.solve(lambda t, z: -2 * z, x[:4], torch.linspace(0, 1, 5))


def test_initial_states_outside_the_harvested_range_warn(fitted):
    inside = torch.randn(4, 2).clamp(-0.5, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted.solve(decay, inside, torch.linspace(0, 1, 5))
        fitted.solve(decay, 100 * torch.ones(3, 2), torch.linspace(0, 1, 5))
    texts = [str(w.message) for w in caught if issubclass(w.category, OutsideFitWarning)]
    assert len(texts) == 1 and "from 3 of 3 initial states outside the harvested states' range" in texts[0]


def test_a_g_with_nan_weights_warns_at_every_solve_and_cannot_be_saved(tmp_path):
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    with torch.no_grad():
        hs.hypernet.net[-1].weight.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match=r"g holds nan or inf weights \(net.2.weight\)"):
        hs.solve(decay, torch.randn(2, 2), torch.linspace(0, 1, 3))
    with pytest.raises(ValueError, match="non-finite .* weights in \\['net.2.weight'\\]"):
        save(hs, tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists()


def test_a_file_whose_weights_changed_after_saving_is_refused(fitted, tmp_path):
    path = tmp_path / "hs.pt"
    save(fitted, path)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["net.0.weight"][0, 0] += 1e-3  # a damaged byte: still finite, still the right shape
    torch.save(blob, path)
    with pytest.raises(ValueError, match="its weights do not match the digest saved with them"):
        load(path)


def test_a_module_that_is_not_a_vector_field_is_named_on_the_fast_path():
    with pytest.raises(TypeError, match=r"Sequential.forward\(input\) is not a vector field f\(t, z\)"):
        HyperEuler(MLPHyperNet(2)).solve(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(3, 2), SPAN)


def test_a_rollout_with_a_nan_controller_and_a_fixed_step_solver_is_refused():
    system = ControlledSystem(lambda t, x, u: -x + u, 1)
    nan = lambda t, x: torch.full((x.shape[0], 1), float("nan"))  # noqa: E731
    with pytest.raises(ValueError, match=r"nan or inf at control instant 0 \(t=0\) and 3 later ones"):
        rollout("euler", system, nan, torch.randn(3, 1), torch.linspace(0, 1, 5))
    with pytest.raises(ValueError, match=r"do not match 3 initial states and control_dim=1"):
        rollout("euler", system, torch.zeros(4, 7, 1), torch.randn(3, 1), torch.linspace(0, 1, 5))
    with pytest.raises(TypeError, match="floating-point initial states x0, got torch.int64"):
        rollout("euler", system, lambda t, x: 0.0, torch.ones(3, 1, dtype=torch.long), torch.linspace(0, 1, 5))


@pytest.mark.parametrize("grid", ["abc", [0.0, "x"], None.__class__])
def test_a_time_grid_that_is_not_a_sequence_of_times_is_named(fitted, grid):
    with pytest.raises(ValueError, match="a time grid is a 1-D sequence of times"):
        fitted.time_grid = grid
