"""Run the benchmarks and write ``results.json`` and ``results.md`` to ``--out``."""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import compile_path, devices, dominance, fitting, floor, guard, harvest_scaling, inference, residuals, tuning
from .common import machine, write_results

SUITES = {
    "residuals": residuals,
    "inference": inference,
    "dominance": dominance,
    "fitting": fitting,
    "floor": floor,
    "guard": guard,
    "tune": tuning,
    "devices": devices,
    "harvest_scaling": harvest_scaling,
    "compile": compile_path,
}
DEFAULT = [name for name in SUITES if name != "devices"]  # devices: CPU vs GPU, run with --only devices


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (used by the tests)")
    parser.add_argument("--out", default="results/bench", help="output folder")
    parser.add_argument("--only", nargs="*", choices=sorted(SUITES), help="run only these suites")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    info = machine()
    results = {"machine": info, "quick": args.quick, "suites": {}}
    parts = [
        "## Benchmarks",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"GPU: {info['gpu'] or 'none'}; Python {info['python']}, torch {info['torch']}.",
        "Each comparison is measured side by side in one process: warm-up, interleaved repeats, medians.",
        "",
    ]
    for name in args.only or DEFAULT:
        start = time.perf_counter()
        result = SUITES[name].run(quick=args.quick)
        result["wall_s"] = time.perf_counter() - start
        results["suites"][name] = result
        parts.append(SUITES[name].markdown(result))
    markdown = "\n".join(parts)
    write_results(args.out, results, markdown)
    print(markdown)
    print(f"results written to {args.out}/results.json and {args.out}/results.md")
    json.dumps(results)  # fail loudly here if anything is not serialisable


if __name__ == "__main__":
    main()
