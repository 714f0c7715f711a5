"""Sharded harvests: across two gloo processes (torchrun), resumed after a killed rank, streamed into fit."""

import collections
import dataclasses
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from shards_worker import BATCH, SHARD, STEPS, T_SPAN, TOL, Field, inputs

from torchdyn_hypersolvers import HyperHeun, HyperRK4, MLPHyperNet, fit, harvest, shards
from torchdyn_hypersolvers.shards import ShardedTrajectories, harvest_shards

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def torchrun(mode: str, folder: pathlib.Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
    return subprocess.run(
        [*command, str(HERE / "shards_worker.py"), mode, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def solves(folder: pathlib.Path):
    """Every shard solve that was written, as ``(rank, shard)``, across the runs."""
    lines = [
        line
        for r in (0, 1)
        if (folder / f"solves-rank{r}.txt").exists()
        for line in (folder / f"solves-rank{r}.txt").read_text().split("\n")
        if line
    ]
    return [tuple(map(int, line.split())) for line in lines]


def plain_harvest():
    return harvest(Field(), inputs(), T_SPAN, steps=STEPS, batch_size=BATCH, **TOL)


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """Run 1: rank 1 SIGKILLs itself mid-harvest. Run 2: the same command, to completion (then the tune pieces)."""
    folder = tmp_path_factory.mktemp("resumed")
    died = torchrun("die", folder)
    after_kill = {k for k in range(5) if (folder / "shards" / f"shard-{k:05d}.json").exists()}
    first = solves(folder)
    resumed = torchrun("harvest", folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return folder, died, after_kill, first, solves(folder)


def test_a_killed_rank_is_resumed_without_solving_a_shard_twice(killed_then_resumed):
    folder, died, after_kill, first, total = killed_then_resumed
    assert died.returncode != 0  # torchrun saw rank 1 die and stopped the job
    assert 1 in after_kill and 3 not in after_kill  # rank 1 wrote its first shard, then died before its second
    assert "exitcode  : -9" in died.stderr or "Signal 9" in died.stderr or "SIGKILL" in died.stderr
    counts = collections.Counter(k for _, k in total)
    assert max(counts.values()) == 1  # no shard solved twice over both runs
    second = {k for _, k in (collections.Counter(total) - collections.Counter(first))}
    assert {k for _, k in first} <= after_kill  # what the first run solved was written in full
    assert second == set(range(5)) - after_kill  # the restart solved exactly the shards that were missing
    assert all(k % 2 == rank for rank, k in total)  # shard k on rank k % world_size


def test_two_ranks_equal_one_process_bit_for_bit(killed_then_resumed):
    folder = killed_then_resumed[0]
    plain = plain_harvest()
    merged = torch.load(folder / "merged.pt", weights_only=True)
    assert torch.equal(merged, plain.states)
    loaded = ShardedTrajectories(folder / "shards", f=plain.f).load()
    assert torch.equal(loaded.states, plain.states) and torch.equal(loaded.t, plain.t)
    assert loaded.fingerprint == plain.fingerprint and (loaded.atol, loaded.rtol) == (plain.atol, plain.rtol)
    assert {n: m.tolist() for n, m in loaded.meshes.items()} == {n: m.tolist() for n, m in plain.meshes.items()}


def test_tune_pieces_share_the_work_and_give_every_rank_the_same_objects(killed_then_resumed):
    folder = killed_then_resumed[0]
    ranks = [torch.load(folder / f"tune-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["fitted_here"] == ["HyperEuler"] and ranks[1]["fitted_here"] == ["HyperHeun"]
    # harvest across ranks: both ranks hold the whole harvest, within the reference's tolerance of a plain one
    plain = harvest(Field(), inputs(), T_SPAN, steps=STEPS, batch_size=64, **TOL)
    for r in ranks:
        assert torch.equal(r["states"], ranks[0]["states"])
        assert torch.allclose(r["states"], plain.states, atol=1e-3)
    for label in ("HyperEuler", "HyperHeun"):
        a, b = (r["weights"][label] for r in ranks)
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same fitted weights on both ranks
        assert ranks[0]["validity"][label] == ranks[1]["validity"][label] == pytest.approx(1 / 8)
    torch.manual_seed(0)
    unfitted = MLPHyperNet(2, hidden=(8,)).state_dict()
    assert any(not torch.equal(unfitted[k], ranks[0]["weights"]["HyperHeun"][k]) for k in unfitted)


def test_ranks_given_other_inputs_are_refused_on_every_rank(killed_then_resumed):
    folder = killed_then_resumed[0]
    for rank in (0, 1):
        message = (folder / f"refused-rank{rank}.txt").read_text()
        assert "ranks [1] were given another request than rank 0 (they differ in the inputs)" in message
    assert not (folder / "other" / "shard-00000.pt").exists()  # nothing was solved


def counted(monkeypatch):
    solved = []
    original = shards._solve_shard

    def solve(folder, k, *args):
        solved.append(k)
        original(folder, k, *args)

    monkeypatch.setattr(shards, "_solve_shard", solve)
    return solved


def test_one_process_resumes_and_refuses_or_recomputes_another_request(tmp_path, monkeypatch):
    solved = counted(monkeypatch)
    args = (inputs(), T_SPAN, tmp_path)
    options = dict(shard_size=SHARD, steps=STEPS, batch_size=BATCH, **TOL)
    sharded = harvest_shards(Field(), *args, **options)
    assert solved == [0, 1, 2, 3, 4] and len(sharded) == 40 and sharded.num_shards == 5
    first_states = sharded.load().states
    assert torch.equal(first_states, plain_harvest().states)
    (tmp_path / "shard-00002.json").unlink()  # as if killed between the shard and its record
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the other shards are this request's
        harvest_shards(Field(), *args, **options)
    assert solved[5:] == [2]
    other = Field()
    with torch.no_grad():
        other.net[0].weight.mul_(1.01)
    with pytest.warns(UserWarning, match=r"5 shards .* recomputed .* vector field's parameters"):
        changed = harvest_shards(other, *args, **options)
    assert solved[6:] == [0, 1, 2, 3, 4]
    assert not torch.equal(changed.load().states, first_states)
    with pytest.raises(ValueError, match="another request"):
        sharded.shard(0)  # the first view's shards were rewritten by the new request: never read as its own
    with pytest.raises(ValueError, match="other meshes"):
        harvest_shards(other, *args, **dict(options, steps=[4, 16]))
    assert solved[11:] == []

    def stopped(folder, k, *args):
        raise KeyboardInterrupt  # the job stops while it rewrites the folder for another request

    monkeypatch.setattr(shards, "_solve_shard", stopped)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        harvest_shards(Field(), *args, **options)
    with pytest.raises(FileNotFoundError, match="not complete"):  # never half one request, half another
        ShardedTrajectories(tmp_path)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"shard_size \(6\) must be a multiple of batch_size \(4\)"):
        harvest_shards(Field(), inputs(), T_SPAN, tmp_path, shard_size=6, batch_size=4)
    with pytest.raises(TypeError, match="tensor, got a list"):
        harvest_shards(Field(), [inputs()], T_SPAN, tmp_path)
    with pytest.raises(FileNotFoundError, match="not complete"):
        ShardedTrajectories(tmp_path)
    assert shards.split_across_ranks([1, 2, 3]) == [1, 2, 3]  # alone: everything here
    assert shards.gather_fitted({"a": 1}, ["a", "b"]) == {"a": 1}


def test_fit_streams_the_shards_with_the_statistics_of_all(tmp_path):
    # base given: the tolerance chosen once for RK4 on the first batch, float64 trajectories
    sharded = harvest_shards(
        Field(), inputs(), T_SPAN, tmp_path, shard_size=SHARD, steps=STEPS, batch_size=BATCH, base="rk4"
    )
    whole = sharded.load()
    plain = harvest(Field(), inputs(), T_SPAN, steps=STEPS, batch_size=BATCH, base="rk4")
    assert whole.states.dtype == torch.float64 and torch.equal(whole.states, plain.states)
    assert whole.fingerprint == plain.fingerprint
    field = sharded.f
    before = {k: v.clone() for k, v in field.state_dict().items()}
    reports = {}
    for name, data in (("streamed", sharded), ("in memory", whole)):
        torch.manual_seed(0)
        hs = HyperRK4(MLPHyperNet(2, hidden=(8,)))  # order 4: meshes balanced, g's scale set from all targets
        reports[name] = (fit(hs, data, iterations=100, batch_size=8, progress=False, seed=0), hs)
    (streamed, hs_s), (memory, hs_m) = reports["streamed"], reports["in memory"]
    assert hs_s.residual_scale == pytest.approx(hs_m.residual_scale, rel=1e-5)
    for n in STEPS:
        assert streamed.base_residual_error[n] == pytest.approx(memory.base_residual_error[n], rel=1e-5)
        assert streamed.residual_error[n] < streamed.base_residual_error[n]  # g learned on the streamed shards
    assert streamed.target_noise and hs_s.validity.dt_max == pytest.approx(1 / 4)
    # step sizes, interval, model and the range of all the shards' states: as fitted in memory
    assert dataclasses.replace(hs_s.validity, description="") == dataclasses.replace(hs_m.validity, description="")
    assert f"on {len(whole)} trajectories" in hs_s.validity.description
    assert all(torch.equal(before[k], v) for k, v in field.state_dict().items())
    with pytest.raises(ValueError, match="residual fitting alone"):
        fit(HyperHeun(MLPHyperNet(2)), sharded, method="trajectory", iterations=2, progress=False)


MEMORY = """
import pathlib, tempfile, torch
from torch import nn
from torchdyn_hypersolvers import HyperEuler, MLPHyperNet, fit
from torchdyn_hypersolvers.shards import harvest_shards
torch.set_num_threads(1)

class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t, z):
        return self.lin(z)

def run(x):
    folder = tempfile.mkdtemp()
    sharded = harvest_shards(f, x, t_span, folder, shard_size={shard}, batch_size={shard}, atol=1e-3, rtol=1e-3)
    fit(HyperEuler(MLPHyperNet(2, hidden=(8,))), sharded, iterations=10, batch_size=64, progress=False, seed=0,
        noise_sample=0)
    return sum(p.stat().st_size for p in pathlib.Path(folder).glob("shard-*.pt")), sharded.num_shards

def rss(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))

torch.manual_seed(0)
f = Linear()
x = torch.randn({count}, 2, generator=torch.Generator().manual_seed(0))
t_span = torch.linspace(0, 1, {points})
run(x[: 2 * {shard}])  # first use: lazily loaded code and the allocator's first pools are not the data's
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak resident memory (VmHWM) starts again from here
base = rss("VmRSS:")
total, count = run(x)
print(total, rss("VmHWM:") - base, count)
"""


@pytest.mark.slow  # about 25 s: 200 MB of trajectories harvested and fitted in a fresh process
def test_a_harvest_larger_than_the_memory_budget_is_harvested_and_fitted_under_it():
    """The peak resident memory of the whole process (VmHWM, reset after a warm-up), while it harvests
    trajectories of over four times the budget into shards and fits g on them, grows by less than the budget."""
    budget = 32 * 2**20
    code = MEMORY.format(count=128 * 2048, points=101, shard=2048)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    total, peak, count = map(int, out.stdout.split())
    assert count == 128
    assert total > 4 * budget  # the trajectories on disk
    assert peak < budget, f"peak resident memory grew by {peak / 2**20:.1f} MiB"


@pytest.mark.slow
def test_tune_under_torchrun_splits_the_fits_and_returns_the_same_result_on_every_rank(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{HERE}"}
    done = subprocess.run([*command, str(HERE / "tune_ddp_worker.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"tune-rank{r}.pt", weights_only=False) for r in (0, 1)]
    fitted = [set(r["fitted_here"]) for r in ranks]
    assert fitted[0] and fitted[1] and not fitted[0] & fitted[1]  # each candidate fitted on one rank only
    assert fitted[0] | fitted[1] == set(ranks[0]["weights"])
    made = [set(r["finalists_here"]) for r in ranks]  # the wider g's and the budgets' finalists, split too
    assert made[0] and made[1] and not made[0] & made[1]
    assert {n for n, _ in made[0] | made[1] if isinstance(n, int)} == set(ranks[0]["choices"])
    assert ranks[0]["choices"] == ranks[1]["choices"] and ranks[0]["options"] == ranks[1]["options"]
    for n, state in ranks[0]["final"].items():
        assert all(torch.equal(state[k], ranks[1]["final"][n][k]) for k in state)
