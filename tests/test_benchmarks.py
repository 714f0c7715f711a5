import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITES = ("residuals", "inference", "dominance", "fitting")  # the floor suite has its own test below


def _run_quick(out, *suites):
    """``python -m benchmarks --quick --only <suites>``; its results.json."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--only", *suites],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_benchmarks_quick_mode_writes_every_field(tmp_path):
    results = _run_quick(tmp_path, *SUITES)
    assert {"cpu", "cores", "torch", "gpu"} <= set(results["machine"])
    suites = results["suites"]
    assert set(suites) == set(SUITES)
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
    check_values(suites, markdown)


def test_floor_suite_quick_output_is_self_consistent(tmp_path):
    results = _run_quick(tmp_path, "floor")
    assert set(results["suites"]) == {"floor"}
    check_floor(results["suites"]["floor"], (tmp_path / "results.md").read_text())


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_values(suites, markdown):
    """The numbers, not only the keys: positive, consistent with each other and with the table."""
    fitting = {r["workload"]: r for r in suites["fitting"]["rows"]}
    assert set(fitting) == {"2-D moons", "digits", "CNF pinwheel"}
    digits_steps, cnf_steps = fitting["digits"]["meshes"], fitting["CNF pinwheel"]["meshes"]  # what g was fitted for
    for row in suites["residuals"]["residuals"]:
        assert row["steps"] == 50 and row["batch"] == 16
        assert all(positive(row[k]) for k in ("seed_loop_ms", "vectorised_ms", "flat_lower_bound_ms")), row
        assert row["speedup"] == pytest.approx(row["seed_loop_ms"] / row["vectorised_ms"], rel=1e-9)
        assert (
            f"| {row['batch']} | {row['seed_loop_ms']:.2f} | {row['vectorised_ms']:.2f} | {row['speedup']:.1f}x"
            in markdown
        )

    for row in suites["inference"]["b1_loop_overhead"]:
        plain, fast, odeint = (row[f"{k}_us_per_step"] for k in ("plain_loop", "fast_path", "torchdyn_odeint"))
        assert row["steps"] == 20 and all(positive(x) for x in (plain, fast, odeint)), row
        assert row["fast_over_plain"] == pytest.approx(fast / plain, rel=1e-9)
        assert row["torchdyn_over_fast"] == pytest.approx(odeint / fast, rel=1e-9)

    def check_smallest(by_nfe, smallest, reaches):
        """``smallest_nfe``: the first NFE whose quality reaches the target, or None when none does."""
        reached = [n for n in sorted(by_nfe) if reaches(by_nfe[n])]
        assert smallest == (reached[0] if reached else None), (by_nfe, smallest)

    b2 = suites["inference"]["b2_digits"]
    accuracy = {int(n): a for n, a in b2["hypereuler_accuracy_by_nfe"].items()}
    assert sorted(accuracy) == digits_steps
    assert all(0 <= a <= 100 for a in [*accuracy.values(), b2["dopri5_1e-4_accuracy"]])
    check_smallest(accuracy, b2["smallest_nfe"], lambda a: a >= b2["dopri5_1e-4_accuracy"])

    b3 = suites["inference"]["b3_cnf"]
    sample_error = {int(n): e for n, e in b3["hyperheun_sample_error_by_nfe"].items()}
    assert sorted(sample_error) == [2 * n for n in cnf_steps]
    assert all(positive(e) for e in [*sample_error.values(), b3["dopri5_1e-4_sample_error"]])
    check_smallest(sample_error, b3["smallest_nfe"], lambda e: e <= b3["dopri5_1e-4_sample_error"])
    # a second-order solver: 6x the steps makes the error much smaller, fitted or not
    assert sample_error[max(sample_error)] < 0.5 * sample_error[min(sample_error)], sample_error
    for row in (b2, b3):
        if row["smallest_nfe"] is not None:
            fast = next(k for k in row if k.endswith("_ms") and "dopri5" not in k)
            assert row["speedup_vs_torchdyn"] == pytest.approx(row["torchdyn_dopri5_ms"] / row[fast], rel=1e-9)
            assert row["speedup_vs_torchdiffeq"] == pytest.approx(row["torchdiffeq_dopri5_ms"] / row[fast], rel=1e-9)

    workloads = {w["workload"]: w for w in suites["dominance"]["workloads"]}
    assert {w: workloads[w]["hypersolver"] for w in workloads} == {
        "2-D moons": "HyperEuler",
        "digits": "HyperEuler",
        "CNF pinwheel (sampling)": "HyperHeun",
    }
    for w in workloads.values():
        for r in w["rows"]:
            assert r["best_classical"] in {"euler", "midpoint", "heun", "rk4"}
            assert positive(r["hyper"]) and positive(r["best"]), r
            assert r["ratio"] == pytest.approx(r["hyper"] / r["best"], rel=1e-9)
        assert w["goal_met"] == all(r["ratio"] <= 0.5 for r in w["rows"])
        cells = " | ".join(f"{r['ratio']:.2f} ({r['best_classical']})" for r in w["rows"])
        assert f"| {w['workload']} ({w['hypersolver']}) | {cells} |" in markdown
    # the same HyperHeun on the same held-out noise: B4's terminal error is B3's sample error
    for r in workloads["CNF pinwheel (sampling)"]["rows"]:
        assert r["hyper"] == pytest.approx(sample_error[r["nfe"]], rel=1e-3), (r, sample_error)

    for r in fitting.values():
        assert r["trajectories"] > 0 and positive(r["trajectory_mb"]) and positive(r["fit_s"]), r
        assert r["total_s"] == pytest.approx(r["harvest_s"] + r["fit_s"], rel=1e-9)


def is_quotient(ratio, a, b):
    """``ratio`` is a / b as the suite computes it: None where either is missing (diverged) or b is 0."""
    if a is None or not b:
        return ratio is None
    return ratio == pytest.approx(a / b, rel=1e-9)


def check_floor(floor, markdown):
    """The floor suite (issue 13's P1 / P4): every ratio is the quotient of the errors it reports,
    every winner is the smallest error of its kind, every goal flag follows from its rows, and the
    tables print what the JSON holds. No accuracy or timing thresholds: those live in the benchmarks."""
    nfe = floor["nfe"]
    assert nfe == [4, 8, 12, 16, 24, 32]
    goals = floor["goals"]
    for title in ("F1 accuracy floor", "F2 the same at equal wall-clock", "F3 P4", "F4 HyperRK4 / RK4", "F5 harvest"):
        assert title in markdown
    names = [w["workload"] for w in floor["workloads"]]
    assert len(names) == 5 and names[:3] == ["2-D moons", "digits", "CNF pinwheel (sampling)"]
    assert names[3].startswith("van der Pol") and names[4].startswith("Lorenz")

    def within(value, goal):
        return value is not None and value <= goal

    for w in floor["workloads"]:
        fits = {f["hypersolver"]: f for f in w["fits"]}
        assert list(fits)[0] == "HyperEuler" and list(fits)[2] == "HyperRK4"
        assert list(fits)[1] in {"HyperMidpoint", "HyperHeun"}
        for f in fits.values():
            assert f["meshes"] == [n // f["stages"] for n in nfe if n % f["stages"] == 0]
            assert [r["steps"] for r in f["floor"]] == f["meshes"]
            assert f["dtype"] in {w["dtype"], "float64"} and positive(f["tolerance"])
            assert f["trajectories"] == w["fit_trajectories"]
            assert positive(f["fit_s"]) and positive(f["harvest_s"]), f
            for r in f["floor"]:
                assert r["nfe"] == r["steps"] * f["stages"]
                assert is_quotient(r["floor"], r["g_error"], r["residual_mean"]), r
            assert f["floor_goal_met"] == all(within(r["floor"], goals["p4"]) for r in f["floor"])
            assert f["noise_goal_met"] == all(within(r["target_noise"], goals["noise"]) for r in f["floor"])
        assert w["floor_goal_met"] == all(f["floor_goal_met"] for f in fits.values())
        assert w["harvest_and_fit_s"] >= sum(f["harvest_s"] + f["fit_s"] for f in fits.values())

        assert [r["nfe"] for r in w["p1"]] == nfe
        for r in w["p1"]:
            assert r["classical"] in {"euler", "midpoint", "heun", "rk4"}
            if r["hypersolver"] is None:  # every hypersolver diverged at this NFE
                assert r["hyper_error"] is None and r["ratio"] is None
            else:
                assert r["nfe"] % fits[r["hypersolver"]]["stages"] == 0
            assert is_quotient(r["ratio"], r["hyper_error"], r["classical_error"]), r
        assert w["p1_goal_met"] == all(within(r["ratio"], goals["p1"]) for r in w["p1"])

        for r, p in zip(w["wall"], w["p1"]):
            assert r["nfe"] == p["nfe"] and positive(r["budget_ms"])
            assert r["classical_error"] <= p["classical_error"]  # the P1 winner itself fits its own budget
            assert r["classical_ms"] <= r["budget_ms"]
            if r["hyper_ms"] is not None:
                assert r["hyper_ms"] <= r["budget_ms"]
            assert is_quotient(r["ratio"], r["hyper_error"], r["classical_error"]), r
        assert w["wall_front_met"] == all(within(r["ratio"], 1.0) for r in w["wall"])

        assert [r["steps"] for r in w["hyperrk4_vs_rk4"]] == fits["HyperRK4"]["meshes"]
        for r in w["hyperrk4_vs_rk4"]:
            assert is_quotient(r["ratio"], r["hyper_error"], r["rk4_error"]), r
            # the same run as in P1: RK4 at n steps is a classical candidate at NFE 4n
            p = next(p for p in w["p1"] if p["nfe"] == r["nfe"])
            if r["rk4_error"] is not None:
                assert p["classical_error"] <= r["rk4_error"]
        assert w["hyperrk4_never_worse"] == all(within(r["ratio"], 1.0) for r in w["hyperrk4_vs_rk4"])

        def num(x, fmt):
            return "diverged" if x is None else format(x, fmt)

        p1_cells = [
            f"{num(r['ratio'], '.2f')} ({(r['hypersolver'] or '-').replace('Hyper', 'H')} vs {r['classical']})"
            for r in w["p1"]
        ]
        assert f"| {w['workload']} | " + " | ".join(p1_cells) + f" | {w['p1_goal_met']} |" in markdown
        errors = [f"{num(r['hyper_error'], '.3g')} / {num(r['classical_error'], '.3g')}" for r in w["p1"]]
        assert f"| {w['workload']} | " + " | ".join(errors) + " |" in markdown
        rk4_cells = [num(r["ratio"], ".3g") for r in w["hyperrk4_vs_rk4"]]
        assert f"| {w['workload']} | " + " | ".join(rk4_cells) + f" | {w['hyperrk4_never_worse']} |" in markdown
        for f in fits.values():
            assert f"| {w['workload']} | {f['hypersolver']} | {f['tolerance']:g} {f['dtype']} | " in markdown


def test_guard_suite_quick_output_is_self_consistent(tmp_path):
    guard = _run_quick(tmp_path, "guard")["suites"]["guard"]
    markdown = (tmp_path / "results.md").read_text()
    rows = {"in distribution": guard["in_distribution"], **guard["out_of_distribution"]}
    for name, row in rows.items():
        assert all(positive(row[k]) for k in ("euler", "hyper", "guarded", "hyper_wall_s", "guarded_wall_s")), row
        assert 0 <= row["fallback_fraction"] <= 1 and row["guarded_nfe"] >= guard["solve_steps"] + 1
        assert f"| {name} | {row['euler']:.3g} | {row['hyper']:.3g} | {row['guarded']:.3g} |" in markdown
    i = guard["in_distribution"]
    assert math.isclose(i["error_ratio"], i["guarded"] / i["hyper"])
    assert math.isclose(i["wall_ratio"], i["guarded_wall_s"] / i["hyper_wall_s"])
    for row in guard["out_of_distribution"].values():
        assert row["hyper_worse_than_base"] == (row["hyper"] > row["euler"])
        assert row["guarded_not_worse_than_base"] == (row["guarded"] <= row["euler"])
    assert [r["scale"] for r in guard["sweep"]["scales"]][0] == 1.0
    assert guard["goals"]["ood_guarded_not_worse_than_base"] == all(
        r["guarded_not_worse_than_base"] for r in guard["out_of_distribution"].values()
    )


def test_tune_and_devices_suites_quick_output_is_self_consistent(tmp_path):
    results = _run_quick(tmp_path, "tune", "devices")
    markdown = (tmp_path / "results.md").read_text()
    tuned = results["suites"]["tune"]
    assert [w["workload"] for w in tuned["workloads"]][:3] == ["2-D moons", "digits", "CNF pinwheel (sampling)"]
    for w in tuned["workloads"]:
        assert positive(w["tune_s"]) and w["held_out"] > 0
        errors = [p["error"] for p in w["front"]]  # the error-vs-wall front: slower points are more accurate
        assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
        for ratio in w["grid_ratio"].values():  # a learned grid is kept only when it is at least 1% better
            assert ratio == 1.0 or ratio <= 0.99
        quality = {int(n): q for n, q in w["quality_by_nfe"].items()}
        assert set(quality) == {int(n) for n in w["choice_errors"]}
        for n, q in quality.items():  # the suite's re-solve of each choice gives tune's held-out error
            assert q["error"] == pytest.approx(w["choice_errors"][str(n)], rel=1e-5)
        for r in w["rows"]:
            assert r["tol"] in (1e-3, 1e-4) and r["dopri5_nfe"] > 0

            def good(q, r=r):
                if r["dopri5_accuracy"] is not None:
                    return q["accuracy"] >= r["dopri5_accuracy"]
                return q["error"] <= r["dopri5_error"]

            # the fastest finalist (tune's measured wall time) at least as accurate as dopri5 there, or none
            walls = [o["wall_ms"] for o in w["options"]]
            assert walls == sorted(walls) and {o["nfe"] for o in w["options"]} == set(quality)
            reached = [o["nfe"] for o in w["options"] if good(o)]
            assert r["nfe"] == (reached[0] if reached else None), (r, w["options"])
            if r["nfe"] is None:
                assert f"| {w['workload']} | {r['tol']:g} | {r['dopri5_nfe']} |" in markdown
                continue
            assert r["speedup_vs_torchdyn"] == pytest.approx(r["torchdyn_ms"] / r["tuned_ms"], rel=1e-9)
            assert r["speedup_vs_torchdiffeq"] == pytest.approx(r["torchdiffeq_ms"] / r["tuned_ms"], rel=1e-9)
            assert f"{r['speedup_vs_torchdyn']:.1f}x | {r['speedup_vs_torchdiffeq']:.1f}x" in markdown
            # the same choice through solve(..., compile=...), timed in the same interleaved run
            assert r["compiled_vs_torchdyn"] == pytest.approx(r["torchdyn_ms"] / r["compiled_ms"], rel=1e-9)
            assert r["compiled_vs_torchdiffeq"] == pytest.approx(r["torchdiffeq_ms"] / r["compiled_ms"], rel=1e-9)
            assert f"{r['compiled_ms']:.2f} | {r['compiled_vs_torchdyn']:.1f}x / " in markdown
    devices = results["suites"]["devices"]
    assert devices["devices"][0] == "cpu" and [r["workload"] for r in devices["rows"]] == ["digits", "CNF pinwheel"]
    for r in devices["rows"]:
        for m in r["devices"].values():
            assert m["total_s"] == pytest.approx(m["harvest_s"] + m["fit_s"], rel=1e-9)
            assert positive(m["fit_s"]) and 0 <= m["floor"]
        if "cuda" in r["devices"]:
            assert r["speedup"] == pytest.approx(r["devices"]["cpu"]["total_s"] / r["devices"]["cuda"]["total_s"])
        else:
            assert "speedup" not in r
