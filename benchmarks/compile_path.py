"""The compiled fast path (``hs.solve(..., compile=True)``) against eager solves and a hand-written loop.

HyperEuler with a 2-64-64-2 tanh field and a 2-(32, 32)-2 g, 20 steps (solved as one compiled graph), on the
CPU: per batch size, the median wall time of the compiled solve, the eager solve and a plain loop over
f and g (no checks, no solver object), measured interleaved after a warm-up, alternately under
``torch.no_grad()`` and ``torch.inference_mode()``; and how many times torch.compile compiled for all of it.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch._dynamo.utils import counters

from torchdyn_hypersolvers import HyperEuler, MLPHyperNet

from .common import compare
from .inference import _plain_loop

STEPS = 20
BATCHES = (8, 64, 512)


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
        )

    def forward(self, t, z):
        return self.net(z)


def _alternating(fn):
    """``fn`` run once under no_grad and once under inference_mode (the mix that used to recompile)."""

    def both():
        with torch.no_grad():
            fn()
        with torch.inference_mode():
            fn()

    return both


def run(quick: bool = False, backend: Optional[str] = None) -> dict:
    """The table's numbers; ``quick``: 4 steps, two batch sizes, few repeats, and the aot_eager backend
    (compiles in seconds; inductor's C++ takes tens of seconds) unless ``backend`` is given."""
    backend = backend or ("aot_eager" if quick else "inductor")
    torch.manual_seed(0)
    f, g = _Field(), MLPHyperNet(2, (32, 32), time=True)
    hs = HyperEuler(g)
    steps = 4 if quick else STEPS
    t_span = torch.linspace(0, 1, steps + 1)
    repeats = 5 if quick else 25
    before = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    with torch.no_grad():
        hs.solve(f, torch.randn(BATCHES[0], 2), t_span, return_trajectory=False, compile=backend)
    compile_s = time.perf_counter() - start
    rows = []
    for batch in BATCHES[:2] if quick else BATCHES:
        z0 = torch.randn(batch, 2)
        times = compare(
            {
                "compiled": _alternating(lambda: hs.solve(f, z0, t_span, return_trajectory=False, compile=backend)),
                "eager": _alternating(lambda: hs.solve(f, z0, t_span, return_trajectory=False)),
                "plain loop": _alternating(lambda: _plain_loop(f, g, z0, t_span)),
            },
            repeats=repeats,
            warmup=2,
        )
        per_step = {k: 1e6 * v / (2 * steps) for k, v in times.items()}
        rows.append(
            {
                "batch": batch,
                "compiled_us_per_step": per_step["compiled"],
                "eager_us_per_step": per_step["eager"],
                "plain_loop_us_per_step": per_step["plain loop"],
                "compiled_over_plain": times["compiled"] / times["plain loop"],
                "compiled_over_eager": times["compiled"] / times["eager"],
            }
        )
    compilations = counters["stats"]["unique_graphs"] - before
    return {"backend": backend, "steps": steps, "compile_s": compile_s, "compilations": compilations, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "### Compiled fast path (CPU)",
        "",
        f"HyperEuler, {result['steps']} steps, backend {result['backend']!r}: first solve (compiling) "
        f"{result['compile_s']:.1f} s; compiled {result['compilations']} time(s) for all batch sizes and both "
        "no-grad modes.",
        "",
        "| batch | compiled us/step | eager us/step | plain loop us/step | compiled / plain | compiled / eager |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['compiled_us_per_step']:.1f} | {r['eager_us_per_step']:.1f} | "
            f"{r['plain_loop_us_per_step']:.1f} | {r['compiled_over_plain']:.2f} | {r['compiled_over_eager']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(markdown(run()))
