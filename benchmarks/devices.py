"""Harvest + fit of the digits and CNF hypersolvers on every device present, side by side.

The same trained models, inputs, hypernets, seeds and iterations on the CPU and (when one is
present) on a CUDA GPU: the wall time of harvesting (dopri5) and of residual fitting on each,
the GPU's speed-up, and g's fitted floor (mean |g - R| / |R|) on each, which must agree up to
floating-point differences. Not in the default ``make bench`` run (without a GPU it repeats the
``fitting`` suite's CPU numbers): ``python -m benchmarks --only devices``.
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch

from torchdyn_hypersolvers import HyperEuler, fit, harvest

from . import workloads
from .workloads import CNF_STEPS, DIGITS_STEPS, cnf_density


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values: Dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def _digits(device: torch.device, quick: bool) -> Dict[str, object]:
    d = workloads.digits_model(quick)
    model = d["model"].to(device)  # moved in place (torchdyn's modules keep non-leaf tensors: no deepcopy)
    x = d["x_train"].to(device)
    _sync(device)
    start = time.perf_counter()
    trajectories = harvest(model, x, torch.linspace(0, 1, 2, device=device), steps=DIGITS_STEPS)
    _sync(device)
    harvest_s = time.perf_counter() - start
    torch.manual_seed(0)
    hs = HyperEuler(copy.deepcopy(d["g"])).to(device)
    report = fit(
        hs, trajectories, iterations=30 if quick else 1500, batch_size=32, progress=False, seed=0, noise_sample=0
    )
    d["model"].to("cpu")
    return {"harvest_s": harvest_s, "fit_s": report.wall_time, "iterations": report.iterations, "report": report}


def _cnf(device: torch.device, quick: bool) -> Dict[str, object]:
    vf = copy.deepcopy(workloads.cnf_model(quick)["vf"]).to(device)
    z1 = cnf_density.sample_base(256 if quick else 1024, torch.Generator().manual_seed(1), device)
    _sync(device)
    start = time.perf_counter()
    trajectories = cnf_density.harvest_backward(vf, z1, CNF_STEPS)
    _sync(device)
    harvest_s = time.perf_counter() - start
    _, report = cnf_density.fit_hyperheun(
        vf, trajectories, steps=CNF_STEPS, iterations=30 if quick else 2000, progress=False, device=device
    )
    return {"harvest_s": harvest_s, "fit_s": report.wall_time, "iterations": report.iterations, "report": report}


def run(quick: bool = False):
    devices: List[torch.device] = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for name, measure in (("digits", _digits), ("CNF pinwheel", _cnf)):
        by_device = {}
        for device in devices:
            m = measure(device, quick)
            report = m.pop("report")
            by_device[device.type] = {
                **m,
                "total_s": m["harvest_s"] + m["fit_s"],
                "floor": _mean(report.relative_residual_error),
            }
        row = {"workload": name, "devices": by_device}
        if "cuda" in by_device:
            row["speedup"] = by_device["cpu"]["total_s"] / by_device["cuda"]["total_s"]
            row["fit_speedup"] = by_device["cpu"]["fit_s"] / by_device["cuda"]["fit_s"]
        rows.append(row)
    return {
        "devices": [str(d) for d in devices],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "rows": rows,
    }


def markdown(result) -> str:
    lines = [
        "### Harvest + fit on each device (digits HyperEuler, 10 meshes; CNF HyperHeun, 6 meshes)",
        "",
        f"GPU: {result['gpu'] or 'none (CPU only)'}; CPU with {result['cpu_threads']} torch threads.",
        "",
        "| workload | device | iterations | harvest (s) | fit (s) | total (s) | mean abs(g - R) / abs(R) "
        "| GPU speed-up (fit, total) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for device, m in r["devices"].items():
            speed = f"{r['fit_speedup']:.1f}x, {r['speedup']:.1f}x" if device == "cuda" else ""
            lines.append(
                f"| {r['workload']} | {device} | {m['iterations']} | {m['harvest_s']:.2f} | {m['fit_s']:.1f} "
                f"| {m['total_s']:.1f} | {m['floor']:.3f} | {speed} |"
            )
    return "\n".join(lines) + "\n"
