"""The quickstart and the image-classification tutorial, in their --quick modes."""

import json
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


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


def test_image_classification_quick(tmp_path):
    _, summary = run_example("image_classification", tmp_path)
    assert summary["dataset"] == "digits"
    for name in ("mesh_error_hypereuler", "mesh_error_euler", "png_nfe"):
        assert pathlib.Path(summary["paths"][name]).read_bytes()[:8] == PNG
    rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
    assert all(r["task_decrement"] is not None for r in rows)
    assert {"1", "2"} <= set(summary["hypereuler_vs_euler_mape"])


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
