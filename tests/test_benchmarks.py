import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmarks_quick_mode_writes_every_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"cpu", "cores", "torch", "gpu"} <= set(results["machine"])
    suites = results["suites"]
    assert set(suites) == {"residuals", "inference", "dominance", "fitting"}
    for row in suites["residuals"]["residuals"]:
        assert {"batch", "steps", "seed_loop_ms", "vectorised_ms", "flat_lower_bound_ms", "speedup"} <= set(row)
    for row in suites["inference"]["b1_loop_overhead"]:
        assert {
            "plain_loop_us_per_step",
            "fast_path_us_per_step",
            "torchdyn_odeint_us_per_step",
            "fast_over_plain",
            "torchdyn_over_fast",
        } <= set(row)
    assert {"dopri5_1e-4_accuracy", "hypereuler_accuracy_by_nfe", "smallest_nfe"} <= set(
        suites["inference"]["b2_digits"]
    )
    assert {"dopri5_1e-4_sample_error", "hyperheun_sample_error_by_nfe", "smallest_nfe"} <= set(
        suites["inference"]["b3_cnf"]
    )
    for workload in suites["dominance"]["workloads"]:
        assert [r["nfe"] for r in workload["rows"]] == [4, 8, 12, 16, 20, 24]
        assert all({"hyper", "best", "ratio", "best_classical"} <= set(r) for r in workload["rows"])
    for row in suites["fitting"]["rows"]:
        assert {"workload", "harvest_s", "fit_s", "total_s", "trajectory_mb"} <= set(row)
    markdown = (tmp_path / "results.md").read_text()
    for title in ("B1 loop overhead", "B2 digits", "B3 CNF", "B4 Pareto dominance", "B5 fitting cost"):
        assert title in markdown
