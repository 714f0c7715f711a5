import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmarks_quick_mode_writes_every_field(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "torch", "gpu"} <= set(results["machine"])
    residuals = results["suites"]["residuals"]
    for row in residuals["residuals"]:
        assert {"batch", "steps", "seed_loop_ms", "vectorised_ms", "flat_lower_bound_ms", "speedup"} <= set(row)
    assert {"harvest_s", "fit_s", "total_s", "error_ratio"} <= set(residuals["fit_2d"])
    assert "| batch |" in (tmp_path / "results.md").read_text()
