import csv
import json

import pytest
import torch
from conftest import small_mlp
from torch import nn
from torchdyn.core import NeuralODE
from torchdyn.nn import Augmenter

from torchdyn_hypersolvers import HyperEuler, HyperMidpoint, MLPHyperNet
from torchdyn_hypersolvers._costs import macs, median_times
from torchdyn_hypersolvers.evaluate import Task, generalization, pareto
from torchdyn_hypersolvers.metrics import (
    absolute_error,
    accuracy,
    global_truncation_error,
    pareto_front,
    task_decrement,
    terminal_mape,
)
from torchdyn_hypersolvers.plots import plot_mesh_error

SPAN = torch.linspace(0, 1, 2)


def test_metrics_against_hand_computed_values():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    ref = torch.tensor([[2.0, 4.0], [3.0, 4.0]])
    # |1-2|/2, |2-4|/4, 0, |5-4|/4 -> 0.5, 0.5, 0, 0.25 -> mean 0.3125
    assert terminal_mape(pred, ref) == pytest.approx(31.25, rel=1e-6)
    assert torch.equal(absolute_error(pred, ref), torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    traj_pred = torch.stack([ref, pred])  # no error at k=0
    traj_ref = torch.stack([ref, ref])
    # k=1: ||(-1,-2)|| = sqrt(5), ||(0,1)|| = 1 -> mean (sqrt(5) + 1) / 2
    torch.testing.assert_close(global_truncation_error(traj_pred, traj_ref), torch.tensor([0.0, (5**0.5 + 1) / 2]))
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    # identity head: reference predicts [0, 1, 0], solution predicts [1, 1, 0]
    ref_states = logits
    sol_states = torch.tensor([[0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert task_decrement(nn.Identity(), sol_states, ref_states) == pytest.approx(100 / 3)
    assert task_decrement(nn.Identity(), sol_states, ref_states, labels=torch.tensor([1, 1, 0])) == pytest.approx(
        -100 / 3
    )
    with pytest.raises(ValueError, match=r"solution shape \(2, 2\) differs from reference shape \(2, 3\)"):
        terminal_mape(pred, torch.zeros(2, 3))


def test_pareto_front_on_a_hand_made_set():
    costs = [1, 2, 2, 3, 4, 4]
    errors = [5.0, 3.0, 4.0, 3.0, 1.0, float("nan")]
    assert pareto_front(costs, errors) == [True, True, False, False, True, False]


def test_macs_of_a_linear_and_a_conv_layer_are_exact():
    assert macs(nn.Linear(3, 5), torch.randn(7, 3)) == 7 * 3 * 5
    assert macs(nn.Conv2d(2, 4, 3, padding=1), torch.randn(1, 2, 5, 5)) == 2 * 4 * 9 * 25


def test_counted_nfe_g_calls_and_macs_in_a_sweep():
    vf = nn.Linear(2, 2)
    f = lambda t, z: vf(z)  # noqa: E731
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    x = torch.randn(16, 2)
    result = pareto(
        f,
        x,
        SPAN,
        solvers=[hs, "euler", "midpoint", "heun", "rk4", "dopri5"],
        steps=[3, 5],
        tolerances=[1e-3],
        repeats=1,
    )
    stages = {"HyperEuler": 1, "euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    for row in result.rows:
        if row.kind == "adaptive":
            assert row.nfe > 0 and row.steps is None and row.tol == 1e-3
            continue
        assert row.nfe == stages[row.solver] * row.steps
        assert row.g_calls == (row.steps if row.solver == "HyperEuler" else 0)
        assert row.macs_f == 16 * 2 * 2
        assert row.macs == row.nfe * row.macs_f + row.g_calls * row.macs_g
    hyper = next(r for r in result.rows if r.solver == "HyperEuler")
    assert hyper.macs_g == 16 * (5 * 8 + 8 * 2)
    # unfitted g: the hypersolver is Euler, to the error
    euler = next(r for r in result.rows if r.solver == "euler" and r.steps == hyper.steps)
    assert hyper.terminal_mape == pytest.approx(euler.terminal_mape, rel=1e-5)


def test_plain_function_hypernet_calls_are_counted():
    hs = HyperEuler(lambda dt, t, z, dz: torch.zeros_like(z), convention="explicit")
    result = pareto(lambda t, z: -z, torch.randn(4, 2), SPAN, solvers=[hs], steps=[7], timing=False)
    assert result.rows[0].g_calls == 7 and result.rows[0].nfe == 7


def test_small_sweep_writes_csv_json_markdown_and_png(tmp_path):
    f = small_mlp()
    hs = HyperMidpoint(MLPHyperNet(2, hidden=(8,)))
    result = pareto(
        NeuralODE(f),
        torch.randn(32, 2),
        SPAN,
        solvers=[hs, "euler", "rk4", "dopri5"],
        steps=[2, 4],
        tolerances=[1e-3],
        repeats=2,
    )
    paths = result.save(tmp_path)
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.rows) == 7
    assert float(rows[0]["wall_ms"]) > 0
    blob = json.loads(open(paths["json"]).read())
    assert blob["reference"] == "torchdiffeq:dopri5" and len(blob["rows"]) == 7
    assert any(r["pareto_nfe"] for r in blob["rows"])
    markdown = open(paths["markdown"]).read()
    assert markdown.count("\n") == 9 and "| rk4 | 4 | 16 |" in markdown
    for key in ("png_nfe", "png_macs", "png_wall_ms"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_image_states_sequential_head_and_backward_time(tmp_path):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 4, 3, padding=1))
    model = nn.Sequential(
        nn.BatchNorm2d(1),
        Augmenter(1, 3),
        NeuralODE(f, return_t_eval=False),
        _Last(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = torch.randn(8, 1, 6, 6)
    labels = torch.randint(0, 3, (8,))
    result = pareto(
        model, x, torch.tensor([1.0, 0.0]), solvers=["euler", "rk4"], steps=[2, 8], labels=labels, timing=False
    )
    assert all(r.task_decrement is not None for r in result.rows)
    rk4_fine = next(r for r in result.rows if r.solver == "rk4" and r.steps == 8)
    euler_coarse = next(r for r in result.rows if r.solver == "euler" and r.steps == 2)
    assert rk4_fine.terminal_mape < euler_coarse.terminal_mape
    err = torch.rand(5, 3, 4, 6, 6)
    path = plot_mesh_error(err, tmp_path / "mesh.png", samples=2)
    assert open(path, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="image states"):
        plot_mesh_error(torch.rand(5, 3, 2), tmp_path / "bad.png")


class _Last(nn.Module):
    def forward(self, traj):
        return traj[-1]


def test_generalization_rows_use_the_same_g_under_other_bases():
    hs = HyperMidpoint(MLPHyperNet(2, hidden=(8,)))
    result = generalization(
        hs, lambda t, z: -z, torch.randn(4, 2), SPAN, bases=["euler", "rk4"], steps=[4], timing=False
    )
    names = [r.solver for r in result.rows]
    assert names == ["g(midpoint)@euler", "euler", "g(midpoint)@rk4", "rk4"]
    assert result.rows[2].nfe == 16 and result.rows[2].g_calls == 4


def test_median_times_interleaves_and_reports_each():
    order = []
    times = median_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and set(times) == {"a", "b"}


def test_unknown_solver_names_are_refused():
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        pareto(lambda t, z: -z, torch.randn(2, 2), SPAN, solvers=["rk45"])


def test_rk4_by_name_is_fourth_order_on_time_dependent_fields():
    # z' = t^3 is integrated exactly by RK4 (torchdyn 1.0.6's RungeKutta4 gives 1/16, not 1/4)
    f = lambda t, z: t**3 * torch.ones_like(z)  # noqa: E731
    result = pareto(f, torch.zeros(4, 1), torch.tensor([0.0, 1.0]), solvers=["rk4"], steps=[1], timing=False)
    assert result.rows[0].terminal_error < 1e-5


def _labelled_sweep():
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    return pareto(
        lambda t, z: -z,
        torch.randn(4, 2),
        SPAN,
        solvers={"mine": hs, "Euler": "euler", "RK4": "rk4", "adaptive": "dopri5"},
        steps=[2, 4],
        tolerances=[1e-2, 1e-3],
        timing=False,
    )


def test_dict_labels_name_rows_and_row_looks_them_up():
    result = _labelled_sweep()
    assert result.solvers == ["mine", "Euler", "RK4", "adaptive"]
    assert len(result) == len(result.rows) == 8 and list(result) == result.rows
    mine, euler = result.row("mine", steps=4), result.row("Euler", steps=4)
    assert (mine.kind, mine.steps, mine.nfe, mine.g_calls) == ("hyper", 4, 4, 4)
    assert (euler.kind, euler.nfe, euler.g_calls) == ("fixed", 4, 0)
    # an unfitted g: the hypersolver is Euler, to the error; Euler's error on z' = -z is hand-computable
    assert mine.terminal_error == pytest.approx(euler.terminal_error, rel=1e-5)
    assert result.row("RK4", 2).nfe == 8 and result.row("RK4", 2).terminal_error < euler.terminal_error
    tight = result.row("adaptive", tol=1e-3)
    assert tight.kind == "adaptive" and tight.steps is None and tight.tol == 1e-3
    assert tight is not result.row("adaptive", tol=1e-2)


def test_row_names_what_exists_when_absent_or_ambiguous():
    result = _labelled_sweep()
    with pytest.raises(KeyError, match=r"no rows for solver 'euler'.*'mine', 'Euler', 'RK4', 'adaptive'"):
        result.row("euler", steps=4)
    with pytest.raises(KeyError, match=r"'Euler' has no row with steps=3; its rows: steps=2, steps=4"):
        result.row("Euler", steps=3)
    with pytest.raises(KeyError, match=r"no row with tol=1e-05; its rows: tol=0.01, tol=0.001"):
        result.row("adaptive", tol=1e-5)
    with pytest.raises(ValueError, match=r"'RK4' has 2 rows \(steps=2, steps=4\): pass steps= or tol="):
        result.row("RK4")


def test_list_labels_a_declared_name_or_the_class_and_refuses_repeats():
    named = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    named.name = "declared"
    result = pareto(
        lambda t, z: -z,
        torch.randn(4, 2),
        SPAN,
        solvers=[named, HyperMidpoint(MLPHyperNet(2, hidden=(8,))), "euler"],
        steps=[2],
        timing=False,
    )
    assert [r.solver for r in result] == ["declared", "HyperMidpoint", "euler"]
    assert result.row("HyperMidpoint").nfe == 4
    with pytest.raises(ValueError, match=r"several solvers are labelled 'HyperEuler'"):
        pareto(
            lambda t, z: -z,
            torch.randn(4, 2),
            SPAN,
            solvers=[HyperEuler(MLPHyperNet(2)), HyperEuler(MLPHyperNet(2))],
            steps=[2],
            timing=False,
        )


def test_plot_pareto_draws_into_a_given_axis(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchdyn_hypersolvers.plots import plot_pareto

    result = _labelled_sweep()
    fig, (left, right) = plt.subplots(1, 2)
    try:
        assert plot_pareto(result, ax=left) is left
        # one line per solver, each through that solver's (cost, error) points, plus the front
        lines = {line.get_label(): line for line in left.get_lines()}
        assert set(lines) == {"mine", "Euler", "RK4", "adaptive", "Pareto front"}
        rk4 = [result.row("RK4", n) for n in (2, 4)]
        assert list(lines["RK4"].get_xdata()) == [r.nfe for r in rk4]
        assert list(lines["RK4"].get_ydata()) == pytest.approx([r.terminal_mape for r in rk4])
        front = [r for r in result if r.pareto_nfe]
        assert len(lines["Pareto front"].get_xdata()) == len(front) > 0
        assert left.get_xscale() == "log" and left.get_ylabel() == "terminal MAPE (%)"
        # another column; adaptive rows (no global error) are left out; nothing is saved
        plot_pareto(result, cost="macs", error="global_error", ax=right, front=False)
        assert {line.get_label() for line in right.get_lines()} == {"mine", "Euler", "RK4"}
        assert not list(tmp_path.iterdir())
        # with a path as well, the axis' figure is saved there
        path = plot_pareto(result, tmp_path / "both.png", ax=left)
        assert path == str(tmp_path / "both.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="a path to save to or an ax"):
        plot_pareto(result)


# --- sample distances in the sweep ------------------------------------------------------------------


def _distance_sweep(**kwargs):
    field = small_mlp()
    f = lambda t, z: field(z)  # noqa: E731
    x = torch.randn(64, 2)
    return pareto(f, x, SPAN, solvers=["euler", "rk4", "dopri5"], steps=(2, 8), tolerances=(1e-3,),
                  timing=False, **kwargs)


def test_a_sweep_without_a_distance_exports_as_before(tmp_path):
    result = _distance_sweep()
    assert result.distance is None and all(r.distance is None for r in result)
    assert "to reference" not in result.to_markdown()
    with open(result.to_csv(tmp_path / "p.csv")) as fh:
        assert "distance" not in next(csv.reader(fh))
    blob = json.loads(open(result.to_json(tmp_path / "p.json")).read())
    assert "distance" not in blob and all("distance" not in r for r in blob["rows"])


def test_the_sweep_measures_a_sample_distance_of_each_solver(tmp_path):
    result = _distance_sweep(distance="mmd")
    assert result.distance == "mmd"
    euler2, euler8, rk4 = result.row("euler", steps=2), result.row("euler", steps=8), result.row("rk4", steps=8)
    assert euler2.distance > euler8.distance > rk4.distance > 0  # finer solves sample closer to the reference
    assert "MMD to reference" in result.to_markdown().splitlines()[0]
    with open(result.to_csv(tmp_path / "p.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[0]["distance"]) == pytest.approx(result.rows[0].distance)
    assert json.loads(open(result.to_json(tmp_path / "p.json")).read())["distance"] == "mmd"


def test_w2_in_the_sweep_is_bounded_by_the_per_sample_error():
    pytest.importorskip("ot")
    result = _distance_sweep(task=Task(distance="w2"))
    for row in result:
        # pairing each sample with its own reference is one transport plan: W2 <= its RMS error
        assert 0 < row.distance <= row.max_terminal_error + 1e-6
    assert "W2 to reference" in result.to_markdown()


def test_a_distance_function_is_called_on_the_final_states_and_named():
    calls = []

    def spread_gap(samples, reference):
        calls.append((samples.shape, reference.shape))
        return float((samples.std(0) - reference.std(0)).abs().sum())

    result = _distance_sweep(distance=spread_gap)
    assert calls and all(shapes == ((64, 2), (64, 2)) for shapes in calls)
    assert result.distance == "spread_gap" and "spread_gap to reference" in result.to_markdown()
    with pytest.raises(ValueError, match="unknown distance 'w1'"):
        Task(distance="w1")
    with pytest.raises(TypeError, match="distance must be a name"):
        Task(distance=3)
