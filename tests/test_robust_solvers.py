"""Solvers refuse g's bad outputs and bad state dtypes by name; map_steps falls back only where
vmap cannot trace; compiled solves free what they hold.

No silent wrong answers: one test (or parametrized family) per finding of the hostile-input pass
of version 0.2 (numbered as there).
"""

import gc
import warnings
import weakref

import pytest
import torch
from robustness_helpers import BOTH_DTYPES, SPAN, Field, _hs, _perturbed
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import (
    HyperEuler,
    MLPHyperNet,
    register,
)
from torchdyn_hypersolvers._mesh import map_steps

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
