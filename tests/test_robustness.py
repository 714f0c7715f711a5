"""Issue 11: no silent wrong answers. Every bad input is refused by name; nothing of the user's is changed.

One test (or one parametrized family) per finding 1..17 of the issue, each asserting the fixed
behaviour, plus property tests over bad ``t_span``s for the fast path and for torchdyn's
``NeuralODE``. Decisions encoded here:

- 1: a cache made from another request (f's parameters, inputs, reference, tolerances, dtype,
  state size) is recomputed: the result equals a fresh harvest.
- 2: a Python list ``t_span`` is accepted by the fast path (as ``torch.as_tensor``). Through
  ``NeuralODE``, torchdyn's ``odeint`` itself indexes, negates and concatenates ``t_span``
  before the solver's ``sync_device_dtype`` runs, so a one-point ``t_span``, a list, or a 2-D
  ``t_span`` whose rows hold several values is refused by torchdyn with its own error
  (IndexError, TypeError, RuntimeError); every ``t_span`` that reaches the solver must be
  refused with a named ValueError/TypeError. Integer (and bool, complex) ``t_span``s are refused.
- 13: ``save`` onto a symlink follows the link.
"""

import contextlib
import gc
import json
import os
import re
import select
import signal
import time
import warnings
import weakref

import pytest
import torch
from conftest import Linear2D
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import (
    FitDivergedError,
    HyperEuler,
    HyperRK4,
    MLPHyperNet,
    Trajectories,
    fit,
    harvest,
    load,
    register,
    save,
)
from torchdyn_hypersolvers._mesh import map_steps

SPAN = torch.linspace(0, 1, 2)
NAN, INF = float("nan"), float("inf")
BOTH_DTYPES = r"(?s)(float64.*float32|float32.*float64)"


class Field(nn.Module):
    """dz/dt = -a z + b sin(flip(z)): smooth, for states of any size and floating dtype; counts its calls."""

    def __init__(self, a=0.7, b=0.3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.calls = 0

    def forward(self, t, z, args=None):  # args: torchdyn's DEFunc passes it to fields that take t
        self.calls += 1
        return -self.a * z + self.b * torch.sin(z.flip(-1))


def _perturbed(g, scale=0.3):
    """Random weights everywhere (the package's hypernets start with a zero last layer)."""
    with torch.no_grad():
        for p in g.parameters():
            p.normal_(0, scale)
    return g


def _hs(dim=2):
    return HyperEuler(_perturbed(MLPHyperNet(dim, hidden=(8,))))


def _linear_trajectories(n=16, steps=4, dtype=torch.float32, **kwargs):
    f = Linear2D(dtype)
    return harvest(f, torch.randn(n, 2, dtype=dtype), SPAN, steps=[steps], **kwargs)


# --- 1. harvest's cache records what it was made from ------------------------------------------

CACHE_CHANGES = {
    "f-weights-changed-in-place": lambda f, x: _with_new_weights(f, x),
    "another-f": lambda f, x: (Field(a=1.3, b=-0.2), x, {}),
    "other-inputs": lambda f, x: (f, x + 1.0, {}),
    "fewer-trajectories": lambda f, x: (f, x, {"max_trajectories": 4}),
    "other-tolerances": lambda f, x: (f, x, {"atol": 1e-3, "rtol": 1e-3}),
    "other-reference": lambda f, x: (f, x, {"reference": "torchdyn:tsit5"}),
    "other-dtype": lambda f, x: (f, x.double(), {}),
    "other-state-size": lambda f, x: (f, torch.randn(x.shape[0], 3), {}),
}


def _with_new_weights(f, x):
    with torch.no_grad():
        f.a.add_(0.5)
    return f, x, {}


@pytest.mark.parametrize("change", sorted(CACHE_CHANGES))
def test_01_harvest_cache_is_reused_only_for_the_same_request(tmp_path, change):
    path = tmp_path / "trajectories.pt"
    f, x = Field(), torch.randn(8, 2)
    first = harvest(f, x, SPAN, steps=[3], cache=path)
    # the same request reuses the cache: equal states, f never called
    f.calls = 0
    again = harvest(f, x, SPAN, steps=[3], cache=path)
    assert f.calls == 0
    assert torch.equal(again.states, first.states)
    # another request is recomputed: the result is what a fresh harvest gives
    f2, x2, kwargs = CACHE_CHANGES[change](f, x)
    cached = harvest(f2, x2, SPAN, steps=[3], cache=path, **kwargs)
    fresh = harvest(f2, x2, SPAN, steps=[3], **kwargs)
    assert cached.states.shape == fresh.states.shape, (tuple(cached.states.shape), tuple(fresh.states.shape))
    assert cached.states.dtype == fresh.states.dtype
    assert torch.equal(cached.states, fresh.states)
    assert (cached.reference, cached.atol, cached.rtol) == (fresh.reference, fresh.atol, fresh.rtol)
    assert cached.f is f2


# --- 2. t_span through NeuralODE gets the fast path's checks; inf refused ------------------------

T_SPAN_CASES = {
    # path, t_span, expected exception(s), match
    "node-non-monotonic": ("node", [0.0, 0.5, 0.3, 1.0], ValueError, "t_span"),
    "node-non-monotonic-from-decreasing": ("node", [1.0, 0.5, 0.7, 0.0], ValueError, "t_span"),
    "node-repeated-points": ("node", [0.0, 0.5, 0.5, 1.0], ValueError, "t_span"),
    "node-nan": ("node", [0.0, NAN, 1.0], ValueError, "t_span"),
    "node-inf": ("node", [0.0, 0.5, INF], ValueError, "t_span"),
    "fast-inf": ("fast", [0.0, 0.5, INF], ValueError, "t_span"),
    "fast-minus-inf": ("fast", [0.0, -INF], ValueError, "t_span"),
    # torchdyn's odeint indexes t_span[1] before the solver sees it: refused by torchdyn, never silently
    "node-one-point": ("node", [0.0], (ValueError, IndexError), None),
}


@pytest.mark.parametrize("case", list(T_SPAN_CASES))
def test_02_bad_t_span_is_refused_by_name_on_both_paths(case):
    path, values, exc, match = T_SPAN_CASES[case]
    f, hs, x = Field(), _hs(), torch.randn(4, 2)
    t_span = torch.tensor(values)
    with pytest.raises(exc, match=match):
        if path == "node":
            NeuralODE(f, solver=hs)(x, t_span)
        else:
            hs.solve(f, x, t_span)


def test_02_list_t_span_fast_path_equals_tensor_and_neuralode_refuses_it():
    f, hs, x = Field(), _hs(), torch.randn(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(hs.solve(f, x, [0.0, 0.5, 1.0]), hs.solve(f, x, torch.tensor([0.0, 0.5, 1.0])))
    # torchdyn's odeint concatenates / negates a list before any solver hook: it must fail, never return
    for values in ([0.0, 0.5, 1.0], [1.0, 0.0]):
        with pytest.raises((TypeError, ValueError)):
            NeuralODE(f, solver=hs)(x, values)


# --- 3. step counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [2.7, 0, -1])
def test_03_harvest_refuses_non_integer_and_non_positive_step_counts(steps):
    with pytest.raises(ValueError, match=re.escape(str(steps))):
        harvest(Field(), torch.randn(4, 2), SPAN, steps=[steps])


# --- 4. g's output dtype ---------------------------------------------------------------------------


class Float64Out(MLPHyperNet):
    """A float32 hypernet that returns float64."""

    def forward(self, dt, t, z, dz):
        return super().forward(dt, t, z, dz).double()


@pytest.mark.parametrize("path", ["fast", "node"])
def test_04_g_returning_another_dtype_is_refused_naming_both(path):
    hs = HyperEuler(_perturbed(Float64Out(2, hidden=(8,))))
    f, x = Field(), torch.randn(4, 2)
    with pytest.raises((TypeError, ValueError), match=BOTH_DTYPES):
        if path == "fast":
            hs.solve(f, x, SPAN)
        else:
            NeuralODE(f, solver=hs)(x, SPAN)


# --- 5. map_steps falls back only on vmap's own failures -------------------------------------------


class FailsOnce:
    """A per-step function whose first call raises ``error`` (a CUDA error, an OOM): not a vmap failure."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, t, z):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return z * t


def untraceable(t, z):
    """Data-dependent control flow on t: vmap cannot trace it."""
    if float(t) > 0.5:
        return z * 2
    return z


@pytest.mark.parametrize("case", ["cuda-error", "out-of-memory", "untraceable-warns-every-time"])
def test_05_map_steps_falls_back_only_when_vmap_cannot_trace(case):
    t, z = torch.linspace(0, 1, 3), torch.randn(3, 4, 2)
    if case == "untraceable-warns-every-time":
        expected = torch.stack([untraceable(t[k], z[k]) for k in range(3)])
        for _ in range(2):  # not once per process: every fallback says so
            with pytest.warns(RuntimeWarning, match="vectoris"):
                out = map_steps(untraceable, t, z)
            torch.testing.assert_close(out, expected)
        return
    error = RuntimeError("CUDA error: boom") if case == "cuda-error" else torch.cuda.OutOfMemoryError("boom: OOM")
    fn = FailsOnce(error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="boom"):
            map_steps(fn, t, z)
    assert fn.calls == 1, "the work was silently rerun in a loop"


# --- 6. non-finite fitting data refused up front -----------------------------------------------------


def test_06_fit_refuses_non_finite_trajectories_with_count_and_place():
    trajectories = _linear_trajectories(n=64, steps=4)
    states = trajectories.states.clone()
    states[-1, 40:43, 0] = NAN  # three values, in trajectories a 4-trajectory fit never samples
    bad = Trajectories(trajectories.t, states, trajectories.meshes, trajectories.f)
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    with pytest.raises(ValueError, match=r"(?i)non-finite|nan") as info:
        fit(hs, bad, iterations=3, batch_size=4, progress=False, seed=0)
    message = str(info.value)
    assert re.search(r"\b3\b", message), message  # how many
    assert re.search(r"\b40\b", message), message  # where


# --- 7. validity records the interval and the direction -------------------------------------------


@pytest.fixture(scope="module")
def fitted_on_unit_interval():
    torch.manual_seed(0)
    f = Field()
    trajectories = harvest(f, torch.randn(16, 2), SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    fit(hs, trajectories, iterations=20, progress=False, seed=0)
    return hs, f


@pytest.mark.parametrize(
    "case, t_span, match",
    [
        ("fast-longer-interval", torch.linspace(0, 8, 33), r"(?i)interval|\b8\b"),
        ("fast-backward", torch.linspace(1, 0, 5), r"(?i)backward|direction|decreasing|revers"),
        ("node-longer-interval", torch.linspace(0, 8, 33), r"(?i)interval|\b8\b"),
        ("node-backward", torch.linspace(1, 0, 5), r"(?i)interval|backward|direction|decreasing|revers|-1"),
    ],
)
def test_07_validity_checks_the_time_interval_and_direction(fitted_on_unit_interval, case, t_span, match):
    hs, f = fitted_on_unit_interval
    x = torch.randn(4, 2)
    with warnings.catch_warnings():  # where it was fitted (same |dt|, same interval): silent
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            hs.solve(f, x, torch.linspace(0, 1, 5))
    with pytest.warns(UserWarning, match=match), torch.no_grad():
        if case.startswith("fast"):
            hs.solve(f, x, t_span)
        else:
            NeuralODE(f, solver=hs)(x, t_span)


# --- 8. load validates the tableau and the weights -----------------------------------------------------


def _saved(tmp_path):
    hs = _hs()
    trajectories = Trajectories(torch.linspace(0, 1, 5), torch.randn(5, 4, 2), {4: torch.arange(5)})
    path = tmp_path / "hs.pt"
    save(hs, path, trajectories=trajectories)
    return hs, path


def _tampered(tmp_path, mutate):
    _, path = _saved(tmp_path)
    blob = torch.load(path, weights_only=True)
    mutate(blob)
    torch.save(blob, path)
    return path


def _nan_weight(blob):
    key = sorted(k for k, v in blob["state_dict"].items() if v.is_floating_point())[0]
    blob["state_dict"][key].view(-1)[0] = NAN


TAMPERED_TABLEAU = {
    "nan-weights": (_nan_weight, r"(?i)nan|non-finite|not finite"),
    "order-minus-5": (lambda blob: blob["tableau"].update(order=-5), r"-5"),
    "b-not-summing-to-1": (lambda blob: blob["tableau"].update(b=[0.5]), r"(?i)sum|0\.5"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_TABLEAU))
def test_08_load_refuses_nan_weights_and_inconsistent_tableaus(tmp_path, case):
    mutate, match = TAMPERED_TABLEAU[case]
    path = _tampered(tmp_path, mutate)
    with pytest.raises(ValueError, match=match):
        load(path)


# --- 9. fit estimates the noise in its targets ------------------------------------------------------


def _noise(report):
    noise = report.target_noise
    return max(noise.values()) if isinstance(noise, dict) else float(noise)


def test_09_fit_warns_when_reference_noise_swamps_the_residual_targets():
    # float32 and atol=rtol=1e-4 on 8 steps: RK4's targets are divided by dt**5 = 3e-5, the
    # reference error in them is several times the targets themselves
    noisy = _linear_trajectories(n=16, steps=8, atol=1e-4, rtol=1e-4)
    hs = HyperRK4(MLPHyperNet(2, hidden=(16,)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = fit(hs, noisy, iterations=20, progress=False, seed=0)
        except ValueError as err:  # refusing is also acceptable
            assert "noise" in str(err).lower(), err
            report = None
    if report is not None:
        assert any(issubclass(w.category, UserWarning) and "noise" in str(w.message).lower() for w in caught), [
            str(w.message) for w in caught
        ]
        assert hasattr(report, "target_noise")
    # a clean reference (float64, tight tolerances) fits silently and reports little noise
    clean = _linear_trajectories(n=16, steps=8, dtype=torch.float64, atol=1e-12, rtol=1e-12)
    hs = HyperRK4(MLPHyperNet(2, hidden=(16,)).double())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clean_report = fit(hs, clean, iterations=20, progress=False, seed=0)
    assert not any("noise" in str(w.message).lower() for w in caught), [str(w.message) for w in caught]
    if report is not None:
        assert _noise(clean_report) < _noise(report)


# --- 10. f is bit-for-bit unchanged and gradient-free after harvest + fit ---------------------------


def _bn_net():
    net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        net(torch.randn(32, 2))  # non-trivial running statistics
    return net.train()


class BNField(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _bn_net()

    def forward(self, t, z, args=None):
        return self.net(z)


def _model(kind):
    """(what harvest is given, the module the user owns)."""
    if kind == "callable":
        net = _bn_net()

        def f(t, z):
            return net(z)

        return f, net
    if kind == "module":
        field = BNField()
        return field, field
    if kind == "neuralode":
        node = NeuralODE(BNField(), solver="dopri5")
        return node, node
    model = nn.Sequential(nn.BatchNorm1d(2), NeuralODE(BNField(), solver="dopri5", return_t_eval=False))
    with torch.no_grad():
        model[0](torch.randn(32, 2))
    return model.train(), model


@pytest.mark.parametrize("method", ["residual", "trajectory"])
@pytest.mark.parametrize("kind", ["callable", "module", "neuralode", "sequential"])
def test_10_f_is_unchanged_and_gradient_free_after_harvest_and_fit(kind, method):
    model, owned = _model(kind)
    state = {k: v.clone() for k, v in owned.state_dict().items()}
    modes = [m.training for m in owned.modules()]
    flags = [p.requires_grad for p in owned.parameters()]
    trajectories = harvest(model, torch.randn(16, 2), SPAN, steps=[4])
    hs = HyperEuler(MLPHyperNet(2, hidden=(8,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # BatchNorm may not vectorise
        fit(hs, trajectories, method=method, iterations=5, batch_size=8, progress=False, seed=0)
    after = owned.state_dict()
    changed = [k for k in state if not torch.equal(state[k], after[k])]
    assert not changed, f"harvest/fit changed the user's {changed}"
    assert [m.training for m in owned.modules()] == modes
    assert [p.requires_grad for p in owned.parameters()] == flags
    with_grad = [name for name, p in owned.named_parameters() if p.grad is not None]
    assert not with_grad, f"harvest/fit left .grad on the user's {with_grad}"


# --- 11. a diverged fit keeps g's last finite weights ------------------------------------------------


def test_11_fit_with_infinite_lr_restores_the_last_finite_weights():
    trajectories = _linear_trajectories(n=16, steps=4)
    hs = _hs()
    before = [p.detach().clone() for p in hs.parameters()]
    with pytest.raises(FitDivergedError):
        fit(hs, trajectories, lr=INF, iterations=20, progress=False, seed=0)
    assert all(bool(torch.isfinite(p).all()) for p in hs.parameters()), "g was left with non-finite weights"
    # the very first step made every weight non-finite: the last finite weights are the initial ones
    assert all(torch.equal(a, b) for a, b in zip(hs.parameters(), before))


# --- 12. compiled solves do not keep the solver or f alive ------------------------------------------


def test_12_compiled_solve_lets_solver_and_f_be_garbage_collected():
    hs, f = _hs(), Field()
    with torch.no_grad():
        hs.solve(f, torch.randn(4, 2), torch.linspace(0, 1, 5), compile="aot_eager")
    hs_ref, f_ref = weakref.ref(hs), weakref.ref(f)
    del hs, f
    gc.collect()
    assert hs_ref() is None, "the hypersolver is kept alive after a compiled solve"
    assert f_ref() is None, "the vector field is kept alive after a compiled solve"


# --- 13. save follows a symlink ----------------------------------------------------------------------


def test_13_save_onto_a_symlink_follows_it(tmp_path):
    target_dir = tmp_path / "store"
    target_dir.mkdir()
    target = target_dir / "g.pt"
    target.write_bytes(b"an older file")
    link = tmp_path / "current.pt"
    try:
        link.symlink_to(target)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks are not supported here")
    hs = _hs()
    save(hs, link)
    assert link.is_symlink(), "save replaced the symlink by a file"
    assert os.readlink(link) == str(target)
    assert target.read_bytes() != b"an older file", "the link's target did not get the new content"
    for path in (link, target):
        loaded = load(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), hs.parameters()))
    leftovers = [p.name for d in (tmp_path, target_dir) for p in d.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


# --- 14. non-finite inputs are refused up front, for every reference (no hang) ----------------------


def _run_forked(fn, timeout):
    """Run ``fn()`` in a forked child; its exception as a dict, or None when it did not finish in time."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running any of pytest's teardown
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            try:
                fn()
                result = {"type": None, "value_error": False, "message": ""}
            except BaseException as err:  # noqa: B036 -- reported to the parent as data
                result = {"type": type(err).__name__, "value_error": isinstance(err, ValueError), "message": str(err)}
            with os.fdopen(write_fd, "w") as handle:
                json.dump(result, handle)
        finally:
            os._exit(0)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
        return None
    with os.fdopen(read_fd) as handle:
        data = handle.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"type": "crashed", "value_error": False, "message": ""}


@pytest.mark.parametrize("reference", ["torchdyn:dopri5", "default"])
def test_14_harvest_refuses_nan_inputs_naming_batch_and_row_without_hanging(reference):
    x = torch.randn(10, 2)
    x[7, 1] = NAN  # batch 1 (0-based; 2 counting from 1), row 3 of it, row 7 of the inputs
    kwargs = {} if reference == "default" else {"reference": reference}

    def run():
        harvest(Field(), x, SPAN, steps=[4], batch_size=4, **kwargs)

    result = _run_forked(run, timeout=30)
    assert result is not None, f"harvest with reference {reference} on a NaN input did not return in 30 s"
    assert result["value_error"], result
    message = result["message"]
    assert re.search(r"(?i)batch(es)?\W*(1|2)\b", message), message
    assert re.search(r"(?i)rows?\W*(3|7)\b", message), message


# --- 15. load: every malformed file is a named ValueError ----------------------------------------------


def test_15_load_truncated_file_is_a_value_error(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    n = len(data)
    wrong = {}
    for cut in sorted({0, 1, n // 4, n // 2, n - 64, n - 21, n - 20, n - 10, n - 1}):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        try:
            load(truncated)
            wrong[cut] = "loaded"
        except ValueError:
            pass
        except Exception as err:
            wrong[cut] = type(err).__name__
    assert not wrong, f"truncated files (cut point: outcome) not refused with ValueError: {wrong}"


def test_15_load_text_file_is_a_value_error_naming_it(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(ValueError, match=re.escape(text.name)):
        load(text)


def _set(*keys, value):
    def mutate(blob):
        record = blob
        for key in keys[:-1]:
            record = record[key]
        record[keys[-1]] = value

    return mutate


def _delete(*keys):
    def mutate(blob):
        record = blob
        for key in keys[:-1]:
            record = record[key]
        del record[keys[-1]]

    return mutate


ILL_FORMED = {
    "tableau-missing-b": (_delete("tableau", "b"), r"(?i)tableau"),
    "tableau-a-not-a-list": (_set("tableau", "a", value=5), r"(?i)tableau"),
    "tableau-order-not-an-int": (_set("tableau", "order", value="four"), r"(?i)order"),
    "tableau-not-a-dict": (_set("tableau", value="rk4"), r"(?i)tableau"),
    "hypernet-missing-class": (_delete("hypernet", "class"), r"(?i)hypernet|class"),
    "hypernet-config-not-a-dict": (_set("hypernet", "config", value="hidden"), r"(?i)hypernet|config"),
    "hypernet-config-bad-value": (_set("hypernet", "config", "state_dim", value="two"), r"(?i)state_dim|config"),
    "solver-not-a-str": (_set("solver", value=7), r"(?i)solver"),
    "validity-missing-fields": (_set("validity", value={"dt_min": 0.25}), r"(?i)validity|dt_max|state_shape"),
    "validity-state-shape-ill-typed": (_set("validity", "state_shape", value="two"), r"(?i)validity|state_shape"),
    "validity-dt-ill-typed": (_set("validity", "dt_min", value="small"), r"(?i)validity|dt_min"),
}


@pytest.mark.parametrize("case", sorted(ILL_FORMED))
def test_15_load_missing_or_ill_typed_fields_are_value_errors(tmp_path, case):
    mutate, match = ILL_FORMED[case]
    path = _tampered(tmp_path, mutate)
    with pytest.raises(ValueError, match=match):
        load(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_15_load_to_cuda_on_a_cpu_only_machine_does_not_call_the_file_corrupt(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(Exception) as info:  # noqa: B017 -- any error, as long as it says what is wrong
        load(path, map_location="cuda")
    message = str(info.value)
    assert "corrupt" not in message.lower(), message
    assert "cuda" in message.lower(), message


@contextlib.contextmanager
def _address_space_limit(extra_bytes):
    """Cap this process's address space at its current size plus ``extra_bytes`` (Linux)."""
    resource = pytest.importorskip("resource")
    try:
        with open("/proc/self/status") as handle:
            size = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        pytest.skip("needs /proc/self/status")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra_bytes if hard == resource.RLIM_INFINITY else min(size + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_15_load_checks_the_config_against_the_weights_before_building(tmp_path):
    # a few-KB file whose config asks for two 2**17-wide layers (64 GiB of weights)
    path = _tampered(tmp_path, _set("hypernet", "config", "hidden", value=[2**17, 2**17]))
    assert path.stat().st_size < 64 * 1024
    start = time.perf_counter()
    with _address_space_limit(2 << 30), pytest.raises(ValueError, match=r"(?i)parameter|shape") as info:
        load(path)
    assert time.perf_counter() - start < 3, "load spent seconds before refusing the file"
    assert re.search(r"131072|parameter", str(info.value)), str(info.value)


# --- 16. harvest: bad inputs and bad caches ------------------------------------------------------------


def _one_argument_field(z):
    return -z


def _corrupt_cache(path):
    path.write_bytes(b"this is not a trajectories file")


def _truncated_cache(path):
    harvest(Field(), torch.randn(8, 2), SPAN, steps=[4], cache=path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


HARVEST_CASES = {
    # name: (model, inputs, kwargs, cache preparation, exceptions, match)
    "empty-tensor": (Field, lambda: torch.empty(0, 2), {}, None, ValueError, r"(?i)empty|no inputs|\b0\b"),
    "max-trajectories-0": (
        Field,
        lambda: torch.randn(8, 2),
        {"max_trajectories": 0},
        None,
        ValueError,
        "max_trajectories",
    ),
    "batch-size-0": (Field, lambda: torch.randn(8, 2), {"batch_size": 0}, None, ValueError, "batch_size"),
    "int-inputs": (Field, lambda: torch.ones(8, 2, dtype=torch.long), {}, None, (TypeError, ValueError), "int64"),
    "float16-inputs": (Field, lambda: torch.randn(8, 2).half(), {}, None, (TypeError, ValueError), "float16"),
    "inf-inputs": (
        Field,
        lambda: torch.tensor([[0.5, 1.0], [INF, 0.0]]),
        {},
        None,
        ValueError,
        r"(?i)\binf|non-finite",
    ),
    "one-argument-callable": (
        lambda: _one_argument_field,
        lambda: torch.randn(8, 2),
        {},
        None,
        TypeError,
        r"(?i)vector field|f\(t, ?z\)",
    ),
    "corrupt-cache": (Field, lambda: torch.randn(8, 2), {}, _corrupt_cache, ValueError, r"(?i)cache"),
    "truncated-cache": (Field, lambda: torch.randn(8, 2), {}, _truncated_cache, ValueError, r"(?i)cache"),
}


@pytest.mark.parametrize("case", list(HARVEST_CASES))
def test_16_harvest_refuses_bad_inputs_by_name(tmp_path, case):
    make_model, make_inputs, kwargs, prepare, exc, match = HARVEST_CASES[case]
    kwargs = dict(kwargs)
    if prepare is not None:
        kwargs["cache"] = tmp_path / "cache.pt"
        prepare(kwargs["cache"])
    with pytest.raises(exc, match=match):
        harvest(make_model(), make_inputs(), SPAN, steps=[4], **kwargs)


# --- 17. solvers: bad g outputs, bad state dtypes ----------------------------------------------------


class TupleOut(MLPHyperNet):
    def forward(self, dt, t, z, dz):
        out = super().forward(dt, t, z, dz)
        return out, out


class NoneOut(MLPHyperNet):
    def forward(self, dt, t, z, dz):
        super().forward(dt, t, z, dz)


SOLVER_CASES = {
    # name: (g class, state, exceptions, match)
    "g-returns-tuple": (TupleOut, lambda: torch.randn(4, 2), TypeError, "tuple"),
    "g-returns-None": (NoneOut, lambda: torch.randn(4, 2), TypeError, "None"),
    "int-state": (MLPHyperNet, lambda: torch.ones(4, 2, dtype=torch.long), (TypeError, ValueError), "int64"),
    "complex-state": (
        MLPHyperNet,
        lambda: torch.randn(4, 2, dtype=torch.complex64),
        (TypeError, ValueError),
        "complex64",
    ),
    "float16-state-float32-g": (
        MLPHyperNet,
        lambda: torch.randn(4, 2).half(),
        (TypeError, ValueError),
        r"(?s)(float16.*float32|float32.*float16)",
    ),
}


@pytest.mark.parametrize("case", list(SOLVER_CASES) + ["registered-name-float64-model"])
def test_17_solvers_refuse_bad_g_outputs_and_state_dtypes_by_name(case):
    if case == "registered-name-float64-model":
        hs = _hs()  # g in float32
        register("robustness-test-hs", hs)
        try:
            model = NeuralODE(Field().double(), solver="robustness-test-hs")
            with pytest.raises((TypeError, ValueError), match=BOTH_DTYPES):
                model(torch.randn(4, 2, dtype=torch.float64), torch.linspace(0, 1, 3))
        finally:
            from torchdyn_hypersolvers.registry import unregister

            unregister("robustness-test-hs")
        return
    cls, make_state, exc, match = SOLVER_CASES[case]
    hs = HyperEuler(_perturbed(cls(2, hidden=(8,))))
    with pytest.raises(exc, match=match):
        hs.solve(Field(), make_state(), torch.linspace(0, 1, 3))


# --- property: every bad t_span is refused, on the fast path and through NeuralODE -------------------

_finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)
_increasing = st.lists(_finite, min_size=2, max_size=6, unique=True).map(sorted)
_valid = st.tuples(_increasing, st.booleans()).map(lambda v: v[0][::-1] if v[1] else v[0])


def _tensor(values):
    return torch.tensor(values, dtype=torch.float32)


def _non_monotone(values):
    steps = [b - a for a, b in zip(values, values[1:])]
    return not (all(s > 0 for s in steps) or all(s < 0 for s in steps))


def _with_repeat(args):
    values, i = args
    i = i % len(values)
    return values[: i + 1] + [values[i]] + values[i + 1 :]


def _with_non_finite(args):
    values, bad, i = args
    i = i % (len(values) + 1)
    return values[:i] + [bad] + values[i:]


def _two_d(args):
    values, layout = args
    t = _tensor(values)
    if layout == "column":
        return t.reshape(-1, 1)
    if layout == "row":
        return t.reshape(1, -1)
    return torch.stack([t, t], 1)


BAD_T_SPANS = st.one_of(
    st.lists(_finite, max_size=1).map(_tensor),  # no step
    _finite.map(lambda v: torch.tensor(v)),  # 0-D
    st.lists(_finite, min_size=3, max_size=6, unique=True).filter(_non_monotone).map(_tensor),
    st.tuples(_valid, st.integers(0, 10)).map(_with_repeat).map(_tensor),
    st.tuples(_valid, st.sampled_from([NAN, INF, -INF]), st.integers(0, 10)).map(_with_non_finite).map(_tensor),
    st.lists(st.integers(-5, 5), min_size=2, max_size=6, unique=True).map(sorted).map(torch.tensor),  # integer
    _valid.map(lambda v: _tensor(v).to(torch.complex64)),  # complex
    st.just(torch.tensor([False, True])),  # bool
    st.tuples(_valid, st.sampled_from(["column", "row", "pairs"])).map(_two_d),  # 2-D
)

PROPERTY = settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _reaches_the_solver(t_span):
    """Whether torchdyn's odeint hands this t_span to the solver's sync_device_dtype at all (it
    compares t_span[1] < t_span[0] first, which fails for complex times inside torchdyn)."""
    return t_span.dim() >= 1 and t_span.shape[0] >= 2 and t_span[0].numel() == 1 and not t_span.is_complex()


@PROPERTY
@given(t_span=BAD_T_SPANS)
def test_property_fast_path_refuses_every_bad_t_span(t_span):
    f, hs = Field(), HyperEuler(MLPHyperNet(2, hidden=(4,)))
    with pytest.raises((ValueError, TypeError)), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hs.solve(f, torch.randn(3, 2), t_span)


@PROPERTY
@given(t_span=BAD_T_SPANS)
def test_property_neuralode_refuses_every_bad_t_span(t_span):
    f, hs = Field(), HyperEuler(MLPHyperNet(2, hidden=(4,)))
    expected = (ValueError, TypeError) if _reaches_the_solver(t_span) else Exception
    with pytest.raises(expected), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        NeuralODE(f, solver=hs)(torch.randn(3, 2), t_span)


def test_property_strategy_only_draws_bad_t_spans():
    """Sanity for the strategies above: nothing they draw is a valid mesh (finite, float, 1-D, monotone)."""

    @settings(max_examples=50, deadline=None, database=None)
    @given(t_span=BAD_T_SPANS)
    def check(t_span):
        valid = (
            t_span.dim() == 1
            and t_span.numel() >= 2
            and t_span.is_floating_point()
            and bool(torch.isfinite(t_span).all())
            and not _non_monotone(t_span.tolist())
        )
        assert not valid, t_span

    check()
