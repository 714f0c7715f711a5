import copy
import importlib
import re

import pytest
import torch
from models2d import VanDerPol, trained_moons_node
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdyn.core import NeuralODE
from torchdyn.nn import Augmenter

from torchdyn_hypersolvers import (
    Adversarial,
    Euler,
    FitDivergedError,
    HyperEuler,
    HyperHeun,
    MLPHyperNet,
    Recipe,
    Trajectories,
    fit,
    harvest,
)
from torchdyn_hypersolvers.fit import residual_data

harvest_module = importlib.import_module("torchdyn_hypersolvers.harvest")

SPAN = torch.linspace(0, 1, 2)


@pytest.fixture(scope="module")
def moons():
    model, X = trained_moons_node()
    return model, X


def terminal_error(solver, f, trajectories, steps):
    t_span, ref = trajectories.mesh(steps)
    with torch.no_grad():
        final = solver.solve(f, ref[0], t_span, return_trajectory=False)
    return (final - ref[-1]).norm(dim=1)


def test_fitted_hypereuler_beats_euler_5x_on_held_out_states(moons):
    model, X = moons
    train = harvest(model, X[:768], SPAN, steps=[10])
    held_out = harvest(model, X[768:], SPAN, steps=[10])
    hs = HyperEuler(MLPHyperNet(2, hidden=(32, 32)))
    report = fit(hs, train, iterations=300, seed=0, progress=False)
    hyper = terminal_error(hs, model.vf, held_out, 10).mean()
    euler = terminal_error(Euler(), model.vf, held_out, 10).mean()
    assert euler / hyper >= 5, (float(euler), float(hyper))
    assert report.iterations == len(report.loss_history) == 300
    assert report.wall_time > 0
    assert report.residual_error[10] < 0.2 * report.base_residual_error[10]
    assert report.loss_history[-1] < report.loss_history[0]
    assert "10 steps" in report.summary()


def test_initial_state_of_a_sequential_with_augmenter_and_model_left_as_it_was():
    f = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 4, 3, padding=1))
    node = NeuralODE(f, solver="dopri5", return_t_eval=False)
    model = nn.Sequential(nn.BatchNorm2d(1), Augmenter(1, 3), node, nn.Flatten())
    model(torch.randn(16, 1, 5, 5))  # give BatchNorm running statistics
    model.train()
    before = copy.deepcopy(model.state_dict())
    nfe = node.vf.nfe
    x = torch.randn(6, 1, 5, 5)
    trajectories = harvest(model, x, SPAN, steps=[2])
    assert model.training and all(m.training for m in model.modules())
    assert node.solver is not None and node.vf.nfe == nfe
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trajectories.states[0], model[:2](x))
    assert trajectories.state_shape == (4, 5, 5)


def test_backward_harvest_matches_the_exact_flow():
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]])
    f = lambda t, z: z @ A.T  # noqa: E731
    z1 = torch.randn(8, 2)
    trajectories = harvest(f, z1, torch.tensor([1.0, 0.0]), steps=[5], atol=1e-8, rtol=1e-8)
    t_span, states = trajectories.mesh(5)
    assert t_span[0] == 1.0 and t_span[-1] == 0.0
    torch.testing.assert_close(states[-1], z1 @ torch.linalg.matrix_exp(-A).T, rtol=1e-5, atol=1e-5)
    # a HyperHeun fitted on backward trajectories improves on Heun backwards
    hs = HyperHeun(MLPHyperNet(2))
    report = fit(hs, trajectories, iterations=100, batch_size=8, progress=False, seed=0)
    assert report.residual_error[5] < report.base_residual_error[5]


def test_several_meshes_share_points_and_match_single_harvests():
    model, X = trained_moons_node(iterations=5)
    several = harvest(model, X[:32], SPAN, steps=[4, 6, 12], atol=1e-7, rtol=1e-7)
    assert several.steps == [4, 6, 12]
    assert len(several.t) == 13  # the 12-step mesh contains the others
    for n in (4, 6):
        single = harvest(model, X[:32], torch.linspace(0, 1, n + 1), atol=1e-7, rtol=1e-7)
        t_span, states = several.mesh(n)
        torch.testing.assert_close(t_span, single.t)
        torch.testing.assert_close(states, single.states, rtol=1e-4, atol=1e-4)
    hs = HyperEuler(MLPHyperNet(2))
    report = fit(hs, several, iterations=50, progress=False, seed=0)
    assert set(report.residual_error) == {4, 6, 12}


def test_disk_cache_round_trip(tmp_path, monkeypatch, moons):
    model, X = moons
    path = tmp_path / "traj.pt"
    first = harvest(model, X[:20], SPAN, steps=[3, 5], cache=path)
    assert path.exists()

    def no_solving(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(harvest_module, "reference_solve", no_solving)
    second = harvest(model, X[:20], SPAN, steps=[3, 5], cache=path)
    assert torch.equal(first.states, second.states) and torch.equal(first.t, second.t)
    assert second.f is model.vf and second.steps == [3, 5]
    loaded = Trajectories.load(path)
    assert loaded.f is None and loaded.reference == first.reference
    with pytest.raises(ValueError, match="not the requested"):
        harvest(model, X[:20], SPAN, steps=[4], cache=path)


def test_streams_a_dataloader_keeps_at_most_max_trajectories():
    model, X = trained_moons_node(iterations=5)
    loader = DataLoader(TensorDataset(X[:100], torch.zeros(100)), batch_size=16)
    trajectories = harvest(model, loader, SPAN, steps=[4], max_trajectories=40, device="cpu")
    assert len(trajectories) == 40
    direct = harvest(model, X[:40], SPAN, steps=[4])
    torch.testing.assert_close(trajectories.states, direct.states)


def test_fit_leaves_f_bit_for_bit_and_is_reproducible(moons):
    model, X = moons
    trajectories = harvest(model, X[:64], SPAN, steps=[5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        hs = HyperEuler(MLPHyperNet(2))
        fit(
            hs,
            trajectories,
            iterations=30,
            seed=7,
            progress=False,
            adversarial=Adversarial(rounds=1, candidates=16, keep=4, param_noise=0.1),
        )
        weights.append([p.detach().clone() for p in hs.parameters()])
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key
    assert grads == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(*weights))


class PoisonedAfter(nn.Module):
    """An MLP hypernet whose output turns NaN from its n-th call on; records its weights per call."""

    hypernet_convention = "explicit"

    def __init__(self, n):
        super().__init__()
        self.inner, self.n, self.calls, self.seen = MLPHyperNet(2), n, 0, []

    def forward(self, dt, t, z, dz):
        self.calls += 1
        self.seen.append([p.detach().clone() for p in self.inner.parameters()])
        out = self.inner(dt, t, z, dz)
        return out * float("nan") if self.calls >= self.n else out


def test_planted_non_finite_loss_stops_the_fit_at_the_last_finite_weights(moons):
    model, X = moons
    trajectories = harvest(model, X[:64], SPAN, steps=[5])
    g = PoisonedAfter(12)
    with pytest.raises(FitDivergedError, match=r"became nan at iteration (\d+)") as info:
        fit(HyperEuler(g), trajectories, iterations=100, progress=False, seed=0)
    iteration = int(re.search(r"iteration (\d+)", str(info.value)).group(1))
    assert 0 < iteration < 100
    assert all(torch.isfinite(p).all() for p in g.parameters())
    # the weights are those the poisoned call saw: no step was taken on the NaN loss
    assert all(torch.equal(a, b) for a, b in zip(g.inner.parameters(), g.seen[-1]))
    assert not all(torch.equal(a, b) for a, b in zip(g.inner.parameters(), g.seen[0]))


def test_trajectory_fitting_lowers_the_global_error(moons):
    model, X = moons
    trajectories = harvest(model, X[:256], SPAN, steps=[8])
    t_span, ref = trajectories.mesh(8)
    hs = HyperEuler(MLPHyperNet(2, hidden=(64, 64, 64)))

    def global_error():
        with torch.no_grad():
            return (hs.solve(model.vf, ref[0], t_span) - ref).norm(dim=2).mean()

    before = global_error()
    fit(hs, trajectories, method="trajectory", iterations=150, progress=False, seed=0)
    assert global_error() < 0.3 * before


def test_adversarial_fitting_lowers_the_worst_case_error_on_a_stiffish_field():
    torch.manual_seed(0)
    f = VanDerPol(mu=4.0)
    train = harvest(f, 0.5 * torch.randn(512, 2), SPAN, steps=[20])
    test = harvest(f, 6 * torch.rand(512, 2) - 3, SPAN, steps=[20])
    worst = {}
    for name, adversarial in [("plain", None), ("adversarial", Adversarial(4, candidates=512, keep=64, scale=3.0))]:
        torch.manual_seed(1)
        hs = HyperEuler(MLPHyperNet(2, hidden=(64, 64)))
        report = fit(hs, train, iterations=600, seed=0, progress=False, adversarial=adversarial)
        worst[name] = terminal_error(hs, f, test, 20).max()
    assert len(report.adversarial_worst) == 4
    assert worst["adversarial"] < 0.9 * worst["plain"], worst


class TwoNodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = NeuralODE(nn.Linear(2, 2))
        self.b = NeuralODE(nn.Linear(2, 2))

    def forward(self, x):
        return self.b(self.a(x)[1][-1])


def test_bad_inputs(moons):
    model, X = moons
    with pytest.raises(ValueError, match="contains no NeuralODE"):
        harvest(nn.Sequential(nn.Linear(2, 2)), X[:4], SPAN)
    with pytest.raises(ValueError, match="contains 2 NeuralODEs"):
        harvest(TwoNodes(), X[:4], SPAN)
    wrapped = nn.Sequential(nn.Linear(3, 2), model)
    with pytest.raises(ValueError, match=r"rejected inputs of shape \(4, 2\)"):
        harvest(wrapped, X[:4], SPAN)
    with pytest.raises(ValueError, match="unknown reference solver 'rk45'; known: .*torchdiffeq:dopri8"):
        harvest(model, X[:4], SPAN, reference="rk45")
    with pytest.raises(ValueError, match="at least two points"):
        harvest(model, X[:4], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="steps must be positive"):
        harvest(model, X[:4], SPAN, steps=[0])
    trajectories = harvest(model, X[:8], SPAN, steps=[4])
    with pytest.raises(ValueError, match=r"states of shape \(2,\).*MLPHyperNet\(state_dim=3\)"):
        fit(HyperEuler(MLPHyperNet(3)), trajectories, iterations=1, progress=False)
    with pytest.raises(ValueError, match="unknown fitting method"):
        fit(HyperEuler(MLPHyperNet(2)), trajectories, method="magic", progress=False)
    with pytest.raises(ValueError, match="no vector field"):
        fit(
            HyperEuler(MLPHyperNet(2)),
            trajectories.select(slice(None)).__class__(trajectories.t, trajectories.states, trajectories.meshes),
            progress=False,
        )


def _small_problem():
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]])
    return harvest(lambda t, z: z @ A.T, torch.randn(24, 2), SPAN, steps=[2, 4])


def _fitted(trajectories, *args, **kwargs):
    torch.manual_seed(5)
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    report = fit(hs, trajectories, *args, progress=False, seed=0, **kwargs)
    return report.loss_history, [p.detach().clone() for p in hs.parameters()]


def test_a_recipe_and_its_fields_as_keywords_fit_bit_for_bit_the_same():
    trajectories = _small_problem()
    expected = _fitted(trajectories, iterations=5, batch_size=8, lr=5e-3, warmup=2, swap_every=2)
    recipe = Recipe(iterations=5, batch_size=8, lr=5e-3, warmup=2, swap_every=2)
    for got in (
        _fitted(trajectories, recipe=recipe),
        _fitted(
            trajectories, recipe=Recipe(iterations=50, batch_size=8, warmup=2, swap_every=2), iterations=5, lr=5e-3
        ),
    ):
        assert got[0] == expected[0] and all(torch.equal(a, b) for a, b in zip(got[1], expected[1]))
    with pytest.warns(DeprecationWarning, match="positional iterations"):  # fit(hs, trajectories, method, iterations)
        legacy = _fitted(trajectories, "residual", 5, batch_size=8, lr=5e-3, warmup=2, swap_every=2)
    assert legacy[0] == expected[0]


def test_unknown_keywords_and_bad_recipes_are_refused_by_name():
    trajectories = _small_problem()
    hs = HyperEuler(MLPHyperNet(2))
    with pytest.raises(TypeError, match="fit\\(\\) got an unexpected keyword argument 'iteration'"):
        fit(hs, trajectories, iteration=5, progress=False)
    with pytest.raises(TypeError, match="recipe=Recipe"):
        fit(hs, trajectories, recipe={"iterations": 5}, progress=False)
    for field, value, message in [
        ("iterations", 0, "iterations must be a positive int, got 0"),
        ("batch_size", True, "batch_size must be a positive int, got True"),
        ("warmup", -1, "warmup must be a non-negative int, got -1"),
        ("swap_every", 2.5, "swap_every must be a positive int, got 2.5"),
        ("refine", -1, "refine must be a non-negative int, got -1"),
        ("lr", -0.1, "lr must be a non-negative number, got -0.1"),
        ("lr_min", float("nan"), "lr_min must be a non-negative finite number, got nan"),
        ("weight_decay", "0", "weight_decay must be a non-negative finite number, got '0'"),
        ("clip", 0.0, "clip must be a positive number, got 0.0"),
        ("balance_meshes", 1, "balance_meshes must be None or a bool, got 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Recipe(**{field: value})
        with pytest.raises(ValueError, match=re.escape(message)):
            fit(hs, trajectories, progress=False, **{field: value})
    with pytest.raises(ValueError, match="noise_sample must be a non-negative int, got True"):
        fit(hs, trajectories, noise_sample=True, progress=False)
    assert Recipe().replace(lr=1e-3) == Recipe(lr=1e-3)


def test_the_fit_describes_itself_in_the_validity_record():
    trajectories = _small_problem()
    hs = HyperEuler(MLPHyperNet(2))
    report = fit(hs, trajectories, iterations=3, progress=False, seed=0)
    text = report.describe()
    assert text.startswith("residual fit (3 iterations) [mean |g - R|: 2 steps ")
    assert hs.validity.description.startswith(text + " on 24 trajectories")
    data = residual_data(hs, trajectories)
    assert data.mesh_steps.tolist() == [2, 2, 4, 4, 4, 4]
    with pytest.warns(DeprecationWarning, match="mesh_steps"):
        assert torch.equal(data.steps, data.mesh_steps)


@pytest.mark.skipif(
    not hasattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check"), reason="no such check in this torch"
)
def test_a_cpu_fit_does_not_query_the_accelerator_at_every_step(monkeypatch):
    """AdamW's CUDA-graph capture check asks for an accelerator at every step (slow where Lightning makes
    torch ask NVML); a fit of CPU parameters skips it and still steps."""
    calls = []
    check = torch.optim.Optimizer._accelerator_graph_capture_health_check
    monkeypatch.setattr(
        torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: calls.append(1) or check(self)
    )
    trajectories = harvest(lambda t, z: -z, torch.randn(32, 2), torch.tensor([0.0, 1.0]), steps=[2])
    hs = HyperEuler(MLPHyperNet(2))
    before = copy.deepcopy(hs.hypernet.state_dict())
    fit(hs, trajectories, iterations=5, progress=False)
    assert calls == []
    assert any(not torch.equal(before[k], v) for k, v in hs.hypernet.state_dict().items())
    optimizer = torch.optim.AdamW(hs.hypernet.parameters())  # anyone else's optimiser is left as it is
    optimizer.step()
    assert calls == [1]
