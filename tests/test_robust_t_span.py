"""Bad ``t_span``s are refused by name on the fast path and through torchdyn's ``NeuralODE``.

A Python list ``t_span`` is accepted by the fast path (as ``torch.as_tensor``). Through ``NeuralODE``,
torchdyn's ``odeint`` itself indexes, negates and concatenates ``t_span`` before the solver's
``sync_device_dtype`` runs, so a one-point ``t_span``, a list, or a 2-D ``t_span`` whose rows hold
several values is refused by torchdyn with its own error (IndexError, TypeError, RuntimeError);
every ``t_span`` that reaches the solver must be refused with a named ValueError/TypeError. Integer
(and bool, complex) ``t_span``s are refused.

No silent wrong answers: one test (or parametrized family) per finding of the hostile-input pass
of version 0.2 (numbered as there).
"""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robustness_helpers import INF, NAN, Field, _hs
from torchdyn.core import NeuralODE

from torchdyn_hypersolvers import (
    HyperEuler,
    MLPHyperNet,
)

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
