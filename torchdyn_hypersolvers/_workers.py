"""Forked workers: a function run in every rank of a local process group on one machine's CPU cores.

:func:`~.tuning.tune` already splits its fits across the ranks of a ``torch.distributed`` process
group (under torchrun). ``tune(..., workers=n)`` makes that group itself: ``n`` forked processes, one
share of torch's threads each, joined in a gloo group over localhost, every one running the same
search; rank 0's result comes back here. Forking keeps the user's model, closures and all, without
pickling it; the parent does no work meanwhile.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import socket
import sys
import traceback
import warnings
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

__all__ = ["check_workers", "claim_next", "fork_can_backprop", "in_workers"]

_store: Optional[dist.Store] = None
"""In a forked worker, its process group's store (for :func:`claim_next`); None elsewhere."""


def check_workers(workers: int, devices: List[torch.device]) -> None:
    """Refuse ``workers > 1`` where forked workers cannot run: without ``fork`` (Windows, macOS'
    default), inside a process group already made (torchrun splits the fits itself), or when the
    model or the requested device is not the CPU (a forked process cannot use CUDA)."""
    if workers == 1:
        return
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ValueError(f"workers={workers} needs processes started by fork, which this platform lacks; use workers=1")
    if dist.is_available() and dist.is_initialized():
        raise ValueError(
            f"workers={workers} inside a torch.distributed process group: its ranks already share the fits; "
            "leave workers at 1 under torchrun"
        )
    elsewhere = sorted({str(d) for d in devices if d.type != "cpu"})
    if elsewhere:
        raise ValueError(
            f"workers={workers} splits the work over CPU cores, but it would run on {', '.join(elsewhere)}; "
            "on a GPU leave workers at 1 (or run under torchrun, one process per GPU)"
        )


def fork_can_backprop() -> bool:
    """Whether a process forked from this one can run autograd. It cannot once this process started
    autograd's worker threads (a backward through a ``torch.compile``'d function does): PyTorch then
    refuses every backward in the fork. Found out by forking one tiny backward (milliseconds)."""
    pid = os.fork()
    if pid == 0:  # the probe: one backward, exit code 0 when it worked
        code = 1
        try:
            x = torch.ones(2, requires_grad=True)
            (x * x).sum().backward()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def in_workers(fn: Callable[..., Any], workers: int, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, rank=rank, **kwargs)`` in ``workers`` forked processes forming a gloo process group;
    rank 0's return value (sent back with ``torch.save``). A worker's exception is raised here, its
    traceback chained to it."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    port = _free_port()
    threads = max(1, torch.get_num_threads() // workers)
    processes = [
        context.Process(target=_worker, args=(fn, rank, workers, port, threads, send, args, kwargs), daemon=True)
        for rank in range(workers)
    ]
    for process in processes:
        process.start()
    send.close()
    finished = False
    try:
        result = _outcome(receive, processes)
        finished = True
        return result
    finally:  # after the result the workers leave their group and exit; else (an error, Ctrl-C) they are stopped
        for process in processes:
            process.join(timeout=10 if finished else 0)
            if process.is_alive():
                process.kill()
                process.join()
        receive.close()


def claim_next(counter: str) -> Optional[int]:
    """In a worker of :func:`in_workers`: the next number (0, 1, ...) of ``counter``, a count shared by all
    the workers (each number goes to one worker, whichever asks first). None outside such a worker."""
    if _store is None:
        return None
    return _store.add(counter, 1) - 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, threads: int, send: Connection, args, kwargs) -> None:
    """One rank: joins the group, runs ``fn``, sends rank 0's result (or any rank's error) to the parent."""
    global _store
    code = 0
    try:
        if rank > 0:  # the same warnings and prints as rank 0's: shown once
            warnings.simplefilter("ignore")
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this process
        torch.set_num_threads(threads)
        _store = dist.TCPStore("127.0.0.1", port, world, rank == 0)
        dist.init_process_group("gloo", store=_store, rank=rank, world_size=world)
        result = fn(*args, rank=rank, **kwargs)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(result, buffer)
            send.send(("result", rank, buffer.getvalue(), None))
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent
        code = 1
        try:
            send.send(("error", rank, err, traceback.format_exc()))
        except Exception:  # an exception that cannot be pickled: its text
            send.send(("error", rank, RuntimeError(f"{type(err).__name__}: {err}"), traceback.format_exc()))
    finally:
        send.close()
        os._exit(code)  # never the parent's atexit handlers or the rest of its program


def _outcome(receive: Connection, processes: List) -> Any:
    """Rank 0's result, or the first error a worker reports (the others are then stopped)."""
    sentinels = {process.sentinel: process for process in processes}
    while True:
        ready = wait([receive, *sentinels])
        if receive in ready:
            try:
                kind, rank, payload, trace = receive.recv()
            except EOFError:  # every worker closed its end without a word
                raise RuntimeError("tune's workers stopped without a result") from None
            if kind == "result":
                return torch.load(io.BytesIO(payload), weights_only=False)
            for process in processes:
                process.kill()
            raise payload from RuntimeError(f"in tune's worker {rank}:\n{trace}")
        for sentinel in ready:
            process = sentinels.pop(sentinel)
            if process.exitcode and not receive.poll():
                for other in processes:
                    other.kill()
                raise RuntimeError(f"one of tune's workers ended with exit code {process.exitcode} and no word")
