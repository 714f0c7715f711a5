"""The CNF density tutorial runs end to end in quick mode and its numbers make sense."""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_cnf_density_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/cnf_density.py", "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(tmp_path) in proc.stdout

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "quick"
    assert set(summary["densities"]) == {"pinwheel"}
    res = summary["densities"]["pinwheel"]
    for key in ("train_seconds", "harvest_seconds", "fit_seconds", "eval_seconds", "total_seconds", "test_nll"):
        assert _finite(res[key]), key
    assert _finite(summary["total_seconds"])

    # sample error per NFE for HyperHeun and every classical solver; dopri5 per tolerance
    errors = res["sample_error"]
    assert set(errors) == {"HyperHeun", "Heun", "Euler", "Midpoint", "RK4"}
    for solver, per_nfe in errors.items():
        assert per_nfe, solver
        assert all(_finite(v) and v >= 0 for v in per_nfe.values()), (solver, per_nfe)
    assert res["dopri5"] and all(_finite(r["sample_error"]) for r in res["dopri5"])

    # figures: ours and pareto's, all real PNGs
    figures = res["figures"]
    assert {"samples", "error_vs_nfe", "png_nfe"} <= set(figures)
    for path in figures.values():
        path = pathlib.Path(path)
        assert path.is_file(), path
        assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert (tmp_path / "pinwheel" / "pareto.md").read_text().startswith("| solver |")

    # the point of the tutorial: at every NFE it was fitted for, HyperHeun's samples are much
    # closer to dopri5's than Heun's at the same NFE (quick mode measures a 5-25x smaller error
    # across seeds and densities; we ask for 2x)
    fitted = res["sample_error_fitted"]
    assert set(fitted) == {str(2 * n) for n in res["steps"]}
    for nfe, row in fitted.items():
        assert _finite(row["HyperHeun"]) and _finite(row["Heun"]), nfe
        assert row["HyperHeun"] < 0.5 * row["Heun"], (nfe, row)
