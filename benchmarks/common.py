"""Shared helpers: the machine, side-by-side timing, and result files."""

from __future__ import annotations

import json
import os
import platform
from typing import Callable, Dict

import torch

from torchdyn_hypersolvers._costs import median_times


def machine() -> Dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def compare(candidates: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> Dict[str, float]:
    """Median wall time in seconds of each candidate, measured interleaved after a warm-up."""
    return median_times(candidates, repeats=repeats, warmup=warmup)


def write_results(out: str, results: Dict[str, object], markdown: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(markdown)
