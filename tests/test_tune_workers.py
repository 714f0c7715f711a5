"""tune(..., workers=n): the fits split over forked processes on the CPU, rank 0's result returned, a
worker's error raised in the caller, and the places it cannot run refused before anything is forked."""

import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from tune_workers_script import SMALL, SPAN, Field, inputs  # tests/, a script the fork tests also run

from torchdyn_hypersolvers import shards, tune

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="forked workers need fork")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-noise warnings of tiny fits
        yield


def _field():
    return Field()


def _inputs(n=96):
    return inputs(n)


def _in_a_fresh_process(mode: str, tmp_path) -> dict:
    """tests/tune_workers_script.py's record for ``mode``: forked workers need a parent that has not run
    autograd's threads, which earlier tests in this process may have (a backward through torch.compile)."""
    out = tmp_path / f"{mode}.pt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{HERE}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HERE / "tune_workers_script.py"), mode, str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


@fork_only
def test_two_workers_fit_in_two_other_processes_and_match_one(tmp_path):
    record = _in_a_fresh_process("split", tmp_path)
    alone, split = record["alone"], record["split"]
    assert record["alone_pids"] == {str(record["pid"])}
    there = record["split_pids"]
    assert len(there) == 2 and str(record["pid"]) not in there  # both workers fitted, the caller did not
    assert split["candidates"] == alone["candidates"]
    assert torch.equal(split["held_out"], alone["held_out"])
    for n, (label, error) in alone["choices"].items():
        # the harvest is batched per worker (equal within the reference's tolerance), the fits are seeded alike
        assert split["choices"][n][0] == label
        assert split["choices"][n][1] == pytest.approx(error, rel=0.2, abs=1e-6)
    assert torch.isfinite(record["solved"]).all()


@fork_only
def test_a_workers_error_is_raised_in_the_caller_with_its_type_and_traceback(tmp_path):
    kind, message, cause = _in_a_fresh_process("error", tmp_path)["error"]
    assert kind == "ValueError" and "non-finite" in message and "rows [3]" in message
    assert "in tune's worker" in cause and "Traceback" in cause


@fork_only
def test_after_a_compiled_backward_tune_warns_and_runs_in_this_process(tmp_path):
    record = _in_a_fresh_process("compiled", tmp_path)
    assert record["fresh"] and not record["after_compile"]  # the probe sees what PyTorch would refuse
    assert len(record["warnings"]) == 1 and "runs in this process" in record["warnings"][0]


def test_when_a_fork_cannot_backprop_the_search_runs_here(monkeypatch):
    from torchdyn_hypersolvers import tuning

    monkeypatch.setattr(tuning, "fork_can_backprop", lambda: False)
    monkeypatch.setattr(tuning, "in_workers", lambda *a, **k: pytest.fail("forked anyway"))
    with pytest.warns(RuntimeWarning, match=r"tune\(workers=2\) runs in this process"):
        result = tune(_field(), _inputs(), SPAN, workers=2, **SMALL)
    assert set(result.choices) == {4, 8}


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2", None])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(ValueError, match=rf"workers must be a positive int, got {workers!r}"):
        tune(_field(), _inputs(), SPAN, workers=workers, **SMALL)


def test_workers_are_refused_on_a_gpu_before_anything_is_forked():
    with pytest.raises(ValueError, match=r"workers=2 splits the work over CPU cores, but it would run on cuda"):
        tune(_field(), _inputs(), SPAN, workers=2, device="cuda", **SMALL)


def test_workers_are_refused_inside_a_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"inside a torch.distributed process group.*leave workers at 1"):
            tune(_field(), _inputs(), SPAN, workers=2, **SMALL)
    finally:
        dist.destroy_process_group()


def test_owners_give_the_costliest_items_first_to_the_least_loaded_rank(monkeypatch):
    monkeypatch.setattr(shards, "rank_and_world_size", lambda: (1, 2))
    assert shards.owners(4) == [0, 1, 0, 1]  # without costs: round robin
    # 5 -> rank 0; 3 -> rank 1; 3 -> rank 1 (3 < 5); 1 -> rank 0 (5 < 6)
    assert shards.owners(4, [1, 5, 3, 3]) == [0, 0, 1, 1]
    assert shards.split_across_ranks("abcd", [1, 5, 3, 3]) == ["c", "d"]  # rank 1's share
    with pytest.raises(ValueError, match="one cost per item: 3 items, 2 costs"):
        shards.owners(3, [1, 2])


@fork_only
def test_workers_take_turns_so_a_slow_item_leaves_no_rank_idle(tmp_path):
    record = _in_a_fresh_process("turns", tmp_path)
    slow, fast = sorted(record["taken"], key=len)
    assert slow == ["a"]  # the costliest, taken first; meanwhile the other rank did every other item
    assert fast == list("bcdef")  # costliest first
    assert record["gathered"] == {item: (item.upper(), record["taken"].index(slow if item == "a" else fast))
                                  for item in "fedcba"}
    assert list(record["gathered"]) == list("fedcba")  # in the order of the keys


def test_take_turns_alone_or_under_torchrun_is_the_fixed_share(monkeypatch):
    assert list(shards.take_turns("abc")) == ["a", "b", "c"]  # alone: everything here
    with pytest.raises(ValueError, match="one cost per item: 3 items, 2 costs"):
        list(shards.take_turns("abc", [1, 2]))
    monkeypatch.setattr(shards, "rank_and_world_size", lambda: (1, 2))  # a process group, not forked workers
    assert list(shards.take_turns("abcd", [1, 5, 3, 3])) == shards.split_across_ranks("abcd", [1, 5, 3, 3])


def test_units_put_each_wider_g_before_the_finalists_that_use_it():
    from types import SimpleNamespace

    from torchdyn_hypersolvers import tuning

    wide = (32, 32)
    run = SimpleNamespace(sizes=((16,), wide))
    bests = {2: SimpleNamespace(solver="A"), 4: SimpleNamespace(solver="B"), 8: SimpleNamespace(solver="A")}
    jobs = [(n, kind) for n in bests for kind in (None, wide, "alone")]
    units = tuning._units(run, bests, jobs)
    assert units[:2] == [(("A", wide), (2, wide), (8, wide)), (("B", wide), (4, wide))]
    finalists = [job for unit in units for job in unit if isinstance(job[0], int)]
    assert sorted(finalists, key=str) == sorted(jobs, key=str)  # every finalist once
    assert all(len(unit) == 1 for unit in units[2:])
