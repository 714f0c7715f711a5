"""What a solve costs: counted evaluations of f and g, MACs, and wall-clock time."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["CallCounter", "counting_calls", "macs", "median_times"]


class CallCounter:
    """Wraps a callable and counts its calls in ``calls``."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@contextlib.contextmanager
def counting_calls(module: nn.Module) -> Iterator[CallCounter]:
    """Count forward calls of ``module`` with a hook (removed on exit)."""
    counter = CallCounter(None)

    def hook(*_):
        counter.calls += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def macs(fn: Callable, *args) -> int:
    """Multiply-accumulates of one call ``fn(*args)``: the FLOPs of matrix products and
    convolutions counted by ``torch.utils.flop_counter``, halved. Elementwise work is not counted."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_times(candidates: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median wall-clock seconds of each candidate: a warm-up round, then ``repeats``
    interleaved rounds (candidate A, B, C, A, B, C, ...), synchronised on CUDA."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
