"""The trajectory-tracking (supplement C.1) and Lorenz tutorials, in their --quick modes."""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def run_example(name, out):
    proc = subprocess.run(
        [sys.executable, f"examples/{name}.py", "--quick", "--no-progress", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"results: {out.resolve()}" in proc.stdout
    return json.loads((out / "summary.json").read_text())


def assert_png(path):
    assert pathlib.Path(path).read_bytes()[:8] == PNG, path


def numbers(obj):
    """Every number in a JSON tree."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from numbers(value)


def test_trajectory_tracking_quick(tmp_path):
    summary = run_example("trajectory_tracking", tmp_path)
    for key in ("train_s", "fit_s", "held_out_tracking_loss_dopri5", "global_error_in_band", "vmap", "paths"):
        assert key in summary
    for key in ("png_nfe", "png_macs", "png_wall_ms", "global_error_vs_nfe", "tracking"):
        assert_png(summary["paths"][key])
    assert all(math.isfinite(x) for x in numbers(summary["global_error_in_band"]))
    assert all(math.isfinite(x) for x in numbers(summary["train_loss_first_last"] + summary["fit_loss_first_last"]))
    # vmap over time steps: the out-of-place Galerkin layer vectorises and matches the loop
    vmap = summary["vmap"]
    assert isinstance(vmap["torchdyn_GalLinear"]["vectorised"], bool)
    assert vmap["out_of_place_GalLinear"]["vectorised"]
    assert vmap["out_of_place_GalLinear"]["max_abs_diff_vs_loop"] < 1e-4
    # the trajectory-fitted HyperEuler beats Euler at every NFE in the band where both ran
    shared = [errs for errs in summary["global_error_in_band"].values() if {"HyperEuler", "euler"} <= set(errs)]
    assert shared
    for errs in shared:
        assert errs["HyperEuler"] < errs["euler"], errs
    rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
    assert {r["solver"] for r in rows} == {"HyperEuler", "euler", "midpoint", "rk4"}


def test_lorenz_quick(tmp_path):
    summary = run_example("lorenz", tmp_path)
    for key in ("fit_s", "harvest_s", "global_error_by_nfe", "paths"):
        assert key in summary
    for key in ("png_nfe", "png_macs", "png_wall_ms", "trajectory"):
        assert_png(summary["paths"][key])
    by_nfe = summary["global_error_by_nfe"]
    assert all(x is not None and math.isfinite(x) for errs in by_nfe.values() for x in errs.values())
    assert all(math.isfinite(x) for x in numbers(summary["fit_s"]))
    # residual fitting (40 iterations) already puts HyperEuler well below Euler at the same NFE
    shared = [errs for errs in by_nfe.values() if {"HyperEuler", "euler"} <= set(errs)]
    assert shared
    for errs in shared:
        assert errs["HyperEuler"] < errs["euler"], errs
    rows = json.loads((tmp_path / "pareto.json").read_text())["rows"]
    assert {r["solver"] for r in rows} == {"HyperEuler", "HyperMidpoint", "euler", "midpoint", "rk4", "dopri5"}
