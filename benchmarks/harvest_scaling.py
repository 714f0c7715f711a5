"""Sharded harvest throughput with 1 and 2 processes (one thread each), as a ratio measured in one run.

Workload: a 2-D Neural ODE field (an MLP 2-64-64-2, tanh; seeded) from ``N`` Gaussian initial states on
[0, 1], dopri5 at atol = rtol = 1e-6, on meshes of 8 and 16 steps, cut into shards of ``SHARD``
trajectories (one batch each). Each configuration is launched with ``torchrun --standalone
--nproc_per_node=P`` (gloo, ``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``); inside the job every rank
first harvests a small warm-up set, then the ranks meet at a barrier and the harvest of all ``N`` inputs into a
fresh folder is timed from that barrier to the one after it (process start-up and imports excluded). The
launches alternate (1, 2, 1, 2, ...) and the median harvest time of each is kept; throughput is trajectories
per second, and the ratio is the 2-process throughput over the 1-process one (2 is perfect scaling).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

SHARD = 64
TOL = 1e-6
STEPS = [8, 16]


class _Field(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))

    def forward(self, t, z):
        return self.net(z)


def _worker(out: pathlib.Path, count: int) -> None:
    """One rank of a timed harvest; rank 0 writes ``{"seconds", "trajectories", "world_size"}`` to ``out``."""
    import torch.distributed as dist

    from torchdyn_hypersolvers.shards import harvest_shards

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    field, t_span = _Field(), torch.linspace(0, 1, 2)
    x = torch.randn(count, 2, generator=torch.Generator().manual_seed(1))
    options = dict(shard_size=SHARD, batch_size=SHARD, steps=STEPS, atol=TOL, rtol=TOL)
    harvest_shards(field, x[: 2 * SHARD], t_span, out.parent / "warm-up", **options)
    dist.barrier()
    start = time.perf_counter()
    sharded = harvest_shards(field, x, t_span, out.parent / "timed", **options)
    seconds = time.perf_counter() - start  # harvest_shards ends at a barrier: every rank is done
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"seconds": seconds, "trajectories": len(sharded), "world": dist.get_world_size()}))
    dist.destroy_process_group()


def _launch(processes: int, count: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        root = pathlib.Path(__file__).resolve().parents[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
        subprocess.run(
            [*command, "-m", "benchmarks.harvest_scaling", str(out), str(count)],
            check=True,
            capture_output=True,
            cwd=root,
            env=env,
            timeout=1800,
        )
        return json.loads(out.read_text())


def run(quick: bool = False) -> dict:
    count, repeats = (256, 1) if quick else (8192, 3)
    times = {1: [], 2: []}
    for _ in range(repeats):
        for processes in (1, 2):
            result = _launch(processes, count)
            assert result["world"] == processes and result["trajectories"] == count
            times[processes].append(result["seconds"])
    median = {p: statistics.median(t) for p, t in times.items()}
    throughput = {p: count / median[p] for p in median}
    return {
        "trajectories": count,
        "shard_size": SHARD,
        "repeats": repeats,
        "cores": os.cpu_count(),
        "seconds": {str(p): t for p, t in times.items()},
        "throughput_1": throughput[1],
        "throughput_2": throughput[2],
        "ratio": throughput[2] / throughput[1],
    }


def markdown(result) -> str:
    return "\n".join(
        [
            "### Sharded harvest: throughput with 1 and 2 processes (one thread each)",
            "",
            f"{result['trajectories']} trajectories of a 2-64-64-2 MLP field, dopri5 at 1e-6, shards of "
            f"{result['shard_size']}; median of {result['repeats']} alternating torchrun launches per configuration, "
            f"on a machine of {result['cores']} cores.",
            "",
            "| processes | trajectories / s |",
            "|---|---|",
            f"| 1 | {result['throughput_1']:.1f} |",
            f"| 2 | {result['throughput_2']:.1f} |",
            "",
            f"Ratio (2 processes / 1): **{result['ratio']:.2f}** (2.00 is perfect scaling).",
            "",
        ]
    )


if __name__ == "__main__":
    _worker(pathlib.Path(sys.argv[1]), int(sys.argv[2]))
