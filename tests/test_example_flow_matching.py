"""The flow-matching tutorial in its --quick mode: torchcfm models sampled with tuned hypersolvers."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_flow_matching_tutorial_quick(tmp_path):
    pytest.importorskip("torchcfm")
    pytest.importorskip("ot")
    proc = subprocess.run(
        [sys.executable, "examples/flow_matching.py", "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"results: {tmp_path.resolve()}" in proc.stdout and "machine:" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["threads"] == 1
    for name in ("moons", "digits"):
        rows = summary[name]
        assert set(summary[f"{name}_choices"]) == {"4"}
        # counted, not assumed: each fixed-step sampler evaluates f its budget's number of times
        for label in ("tuned@4", "euler@4", "midpoint@4", "rk4@4"):
            assert rows[label]["nfe"] == 4, (name, label, rows[label])
        assert rows["dopri5 0.0001"]["nfe"] > 8
        assert rows["torchdiffeq dopri5 0.0001"]["nfe"] > 8  # Meta's flow_matching samples with torchdiffeq
        for found in summary[f"{name}_speedup_terminal_error"].values():  # per adaptive sampler: None or a choice
            assert found is None or (found["terminal_error"] <= found["adaptive"] and found["speedup"] > 0)
        assert set(summary[f"{name}_speedup_terminal_error"]) == {
            "dopri5 0.0001", "dopri5 0.001", "torchdiffeq dopri5 0.0001", "torchdiffeq dopri5 0.001"
        }
        # the tuned sampler beats the classical ones at its budget, in error and in W2 to the reference
        for metric in ("terminal_error", "w2_to_reference"):
            assert rows["tuned@4"][metric] < rows["euler@4"][metric], (name, metric)
            assert rows["tuned@4"][metric] < rows["midpoint@4"][metric], (name, metric)
        for r in rows.values():
            assert 0 < r["w2_to_reference"] and r["wall_ms"] > 0
        assert "| tuned@4 | 4 |" in proc.stdout
    for key in ("moons", "digits", "pareto"):
        assert pathlib.Path(summary["paths"][key]).read_bytes()[:8] == PNG
