"""B1 loop overhead, B2 digits time-to-accuracy, B3 CNF time-to-sample-quality."""

from __future__ import annotations

import torch
import torchdiffeq
from torchdyn.numerics import odeint as torchdyn_odeint

from examples import image_classification
from torchdyn_hypersolvers import HyperEuler, MLPHyperNet

from .common import compare
from .workloads import CNF_STEPS, DIGITS_STEPS, cnf, digits

STEPS = 20


def _plain_loop(f, g, z, t_span):
    """The floor: a hand-written HyperEuler loop over f and g, nothing else."""
    ts, dts = t_span[:-1].unbind(0), (t_span[1:] - t_span[:-1]).unbind(0)
    for t, dt in zip(ts, dts):
        dz = f(t, z)
        z = z + dt * dz + dt * dt * g(dt, t, z, dz)
    return z


def _loop_overhead(name, f, g, z0, repeats):
    hs = HyperEuler(g)
    t_span = torch.linspace(0, 1, STEPS + 1)
    with torch.no_grad():
        times = compare(
            {
                "plain loop": lambda: _plain_loop(f, g, z0, t_span),
                "fast path": lambda: hs.solve(f, z0, t_span, return_trajectory=False),
                "torchdyn odeint": lambda: torchdyn_odeint(f, z0, t_span, solver=hs),
            },
            repeats=repeats,
            warmup=2,
        )
    per_step = {k: 1e6 * v / STEPS for k, v in times.items()}
    return {
        "workload": name,
        "batch": z0.shape[0],
        "state": list(z0.shape[1:]),
        "steps": STEPS,
        "plain_loop_us_per_step": per_step["plain loop"],
        "fast_path_us_per_step": per_step["fast path"],
        "torchdyn_odeint_us_per_step": per_step["torchdyn odeint"],
        "fast_over_plain": times["fast path"] / times["plain loop"],
        "torchdyn_over_fast": times["torchdyn odeint"] / times["fast path"],
    }


def b1(quick: bool):
    repeats = 5 if quick else 30
    f2 = torch.nn.Sequential(
        torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
    )
    rows = [
        _loop_overhead(
            "2-D (quickstart f)", lambda t, z: f2(z), MLPHyperNet(2, hidden=(32, 32)), torch.randn(64, 2), repeats
        )
    ]
    model, g = image_classification.build("digits", "cpu")
    model.eval()
    node = model[2]
    with torch.no_grad():
        z0 = model[:2](torch.rand(32, 1, 8, 8))
    rows.append(_loop_overhead("digits image state", lambda t, z: node.vf.vf(t, z), _explicit(g), z0, repeats))
    return rows


def _explicit(g):
    """A concat-convention g as a (dt, t, z, dz) callable for the plain loop."""
    from torchdyn_hypersolvers.hypernets import concat_inputs

    def call(dt, t, z, dz):
        return g(concat_inputs(dt, z, dz))

    call.hypernet_convention = "dt_t_z_dz"
    return call


def _smallest(candidates, good):
    for n in candidates:
        if good(n):
            return n
    return None


def b2(quick: bool):
    w = digits(quick)
    model, node, hs, x, y = w["model"], w["node"], w["hs"], w["x"], w["y"]
    head = model[3:]
    f = node.vf
    with torch.no_grad():
        z0 = model[:2](x)
        t01 = torch.tensor([0.0, 1.0])

        def accuracy(final):
            return float((head(torch.stack([z0, final])).argmax(1) == y).float().mean() * 100)

        ref_final = torchdyn_odeint(f, z0, t01, solver="dopri5", atol=1e-4, rtol=1e-4)[1][-1]
        target = accuracy(ref_final)
        acc = {n: accuracy(hs.solve(f, z0, torch.linspace(0, 1, n + 1), return_trajectory=False)) for n in DIGITS_STEPS}
        n = _smallest(sorted(acc), lambda k: acc[k] >= target)
        row = {"dopri5_1e-4_accuracy": target, "hypereuler_accuracy_by_nfe": acc, "smallest_nfe": n}
        if n is not None:
            mesh = torch.linspace(0, 1, n + 1)
            times = compare(
                {
                    "hypereuler": lambda: hs.solve(f, z0, mesh, return_trajectory=False),
                    "torchdyn dopri5": lambda: torchdyn_odeint(f, z0, t01, solver="dopri5", atol=1e-4, rtol=1e-4),
                    "torchdiffeq dopri5": lambda: torchdiffeq.odeint(f, z0, t01, method="dopri5", atol=1e-4, rtol=1e-4),
                },
                repeats=3 if quick else 15,
            )
            row.update(_speedups(times, "hypereuler"))
    return row


def b3(quick: bool):
    w = cnf(quick)
    vf, hs, z1, t_span = w["vf"], w["hs"], w["x"], w["t_span"]
    with torch.no_grad():
        reference = torchdiffeq.odeint(vf, z1, t_span, method="dopri5", atol=1e-7, rtol=1e-7)[-1]

        def err(sample):
            return float((sample - reference).norm(dim=1).mean())

        target = err(torchdiffeq.odeint(vf, z1, t_span, method="dopri5", atol=1e-4, rtol=1e-4)[-1])
        errors = {2 * n: err(hs.solve(vf, z1, torch.linspace(1, 0, n + 1), return_trajectory=False)) for n in CNF_STEPS}
        nfe = _smallest(sorted(errors), lambda k: errors[k] <= target)
        row = {"dopri5_1e-4_sample_error": target, "hyperheun_sample_error_by_nfe": errors, "smallest_nfe": nfe}
        if nfe is not None:
            mesh = torch.linspace(1, 0, nfe // 2 + 1)
            times = compare(
                {
                    "hyperheun": lambda: hs.solve(vf, z1, mesh, return_trajectory=False),
                    "torchdyn dopri5": lambda: torchdyn_odeint(vf, z1, t_span, solver="dopri5", atol=1e-4, rtol=1e-4),
                    "torchdiffeq dopri5": lambda: torchdiffeq.odeint(
                        vf, z1, t_span, method="dopri5", atol=1e-4, rtol=1e-4
                    ),
                },
                repeats=3 if quick else 15,
            )
            row.update(_speedups(times, "hyperheun"))
    return row


def _speedups(times, fast):
    return {
        f"{fast}_ms": 1e3 * times[fast],
        "torchdyn_dopri5_ms": 1e3 * times["torchdyn dopri5"],
        "torchdiffeq_dopri5_ms": 1e3 * times["torchdiffeq dopri5"],
        "speedup_vs_torchdyn": times["torchdyn dopri5"] / times[fast],
        "speedup_vs_torchdiffeq": times["torchdiffeq dopri5"] / times[fast],
    }


def run(quick: bool = False):
    return {"b1_loop_overhead": b1(quick), "b2_digits": b2(quick), "b3_cnf": b3(quick)}


def markdown(result) -> str:
    lines = [
        f"### B1 loop overhead (HyperEuler, {STEPS} steps, per step, no gradient)",
        "",
        "| workload | batch | plain loop (us) | fast path (us) | torchdyn odeint (us) | fast / plain (goal <= 1.10) "
        "| torchdyn / fast (goal >= 2) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["b1_loop_overhead"]:
        lines.append(
            f"| {r['workload']} | {r['batch']} | {r['plain_loop_us_per_step']:.1f} | {r['fast_path_us_per_step']:.1f} "
            f"| {r['torchdyn_odeint_us_per_step']:.1f} | {r['fast_over_plain']:.2f}x | {r['torchdyn_over_fast']:.2f}x |"
        )
    for key, title, fast, quality in (
        (
            "b2_digits",
            "B2 digits classifier: smallest-NFE HyperEuler with dopri5's (1e-4) test accuracy",
            "hypereuler",
            "dopri5_1e-4_accuracy",
        ),
        (
            "b3_cnf",
            "B3 CNF sampling: smallest-NFE HyperHeun with dopri5's (1e-4) sample error",
            "hyperheun",
            "dopri5_1e-4_sample_error",
        ),
    ):
        r = result[key]
        lines += ["", f"### {title}", ""]
        if r.get("smallest_nfe") is None:
            lines.append(f"No fitted step count reached dopri5's {quality.split('_1e')[0]} level ({r[quality]:.4g}).")
            continue
        lines += [
            f"| target ({quality}) | NFE | {fast} (ms) | torchdyn dopri5 (ms) | torchdiffeq dopri5 (ms) "
            "| speed-up vs torchdyn | vs torchdiffeq (goal >= 5) |",
            "|---|---|---|---|---|---|---|",
            f"| {r[quality]:.4g} | {r['smallest_nfe']} | {r[f'{fast}_ms']:.2f} | {r['torchdyn_dopri5_ms']:.2f} "
            f"| {r['torchdiffeq_dopri5_ms']:.2f} | {r['speedup_vs_torchdyn']:.1f}x "
            f"| {r['speedup_vs_torchdiffeq']:.1f}x |",
        ]
    return "\n".join(lines) + "\n"
