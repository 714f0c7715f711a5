"""The quickstart and the image-classification tutorial, in their --quick modes."""

import json
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
STAGES = {"HyperEuler": 1, "euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def run_example(name, out, *extra):
    proc = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--quick", "--no-progress", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "summary.json").read_text())


def test_quickstart_hypereuler_beats_euler_on_held_out_inputs(tmp_path):
    stdout, summary = run_example("quickstart", tmp_path)
    assert f"results: {tmp_path.resolve()}" in stdout and "| HyperEuler | 4 |" in stdout
    for steps, errors in summary["held_out_terminal_error"].items():
        assert errors["HyperEuler"] < errors["euler"], (steps, errors)
    rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
    assert {r["solver"] for r in rows} == {"HyperEuler", "euler", "midpoint", "heun", "rk4", "dopri5"}
    for key in ("png_nfe", "png_macs", "png_wall_ms"):
        assert pathlib.Path(summary["paths"][key]).read_bytes()[:8] == PNG
    # the numbers: the summary and the printed lines are pareto's rows, whose counts follow the stages
    by = {(r["solver"], r["steps"]): r for r in rows}
    for r in rows:
        if r["solver"] != "dopri5":
            assert r["nfe"] == STAGES[r["solver"]] * r["steps"], r
            assert r["g_calls"] == (r["steps"] if r["solver"] == "HyperEuler" else 0), r
    # dopri5: each 10x tighter tolerance costs more evaluations and gives a smaller error
    dopri5 = sorted((r for r in rows if r["solver"] == "dopri5"), key=lambda r: -r["tol"])
    assert [r["tol"] for r in dopri5] == [1e-2, 1e-3, 1e-4]
    for loose, tight in zip(dopri5, dopri5[1:]):
        assert tight["nfe"] > loose["nfe"] and tight["terminal_error"] < loose["terminal_error"], (loose, tight)
    for steps, errors in summary["held_out_terminal_error"].items():
        assert errors == {name: by[(name, int(steps))]["terminal_error"] for name in ("HyperEuler", "euler")}
        h, e = errors["HyperEuler"], errors["euler"]
        assert f"{int(steps):>2} steps: terminal error HyperEuler {h:.3g} vs Euler {e:.3g}" in stdout
    # RK4 is fourth order: doubling its steps divides its error by several times
    assert by[("rk4", 8)]["terminal_error"] < 0.5 * by[("rk4", 4)]["terminal_error"]
    assert len({pathlib.Path(summary["paths"][k]).read_bytes() for k in ("png_nfe", "png_macs", "png_wall_ms")}) == 3


def test_image_classification_quick(tmp_path):
    _, summary = run_example("image_classification", tmp_path)
    assert summary["dataset"] == "digits"
    for name in ("mesh_error_hypereuler", "mesh_error_euler", "png_nfe"):
        assert pathlib.Path(summary["paths"][name]).read_bytes()[:8] == PNG
    rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
    assert all(r["task_decrement"] is not None for r in rows)
    assert {"1", "2"} <= set(summary["hypereuler_vs_euler_mape"])
    # the numbers: accuracy decrements on the 64 held-out images are multiples of 100/64 (%),
    # and the summary's MAPEs are pareto's rows
    for r in rows:
        assert abs(r["task_decrement"]) <= 100
        assert r["task_decrement"] * 64 / 100 == pytest.approx(round(r["task_decrement"] * 64 / 100), abs=1e-3)
    by = {(r["solver"], r["steps"]): r for r in rows}
    for steps, (hyper, euler) in summary["hypereuler_vs_euler_mape"].items():
        assert hyper == by[("HyperEuler", int(steps))]["terminal_mape"]
        assert euler == by[("euler", int(steps))]["terminal_mape"]
        per_nfe = summary["per_nfe"][steps]
        assert (per_nfe["HyperEuler"]["terminal_mape"], per_nfe["euler"]["terminal_mape"]) == (hyper, euler)
        assert 0 < hyper and 0 < euler
    assert by[("rk4", 2)]["terminal_mape"] < by[("euler", 2)]["terminal_mape"]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_missing_local_data_fails_fast_without_network(dataset, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from examples import image_classification

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(SystemExit) as info:
        image_classification.main(
            ["--dataset", dataset, "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]
        )
    assert info.value.code == 2
    message = str(info.value)
    assert "was not found under" in message and "never downloads" in message and str(tmp_path / "nothing") in message
