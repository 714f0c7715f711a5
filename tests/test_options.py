"""Options objects of harvest and pareto: the reference solve and the task metric, and the keyword
forms they replace (which keep working and give the same numbers)."""

import pytest
import torch
from torch import nn

from torchdyn_hypersolvers import harvest
from torchdyn_hypersolvers.evaluate import Task, pareto
from torchdyn_hypersolvers.harvest import Reference

SPAN = torch.linspace(0, 1, 2)


def field(t, z):
    return torch.stack([z[:, 1], -z[:, 0] - 0.1 * z[:, 1]], 1)


def test_a_reference_object_harvests_what_the_tolerance_keywords_harvest():
    x = torch.randn(6, 2)
    by_keywords = harvest(field, x, SPAN, steps=[4], reference="torchdyn:tsit5", atol=1e-8, rtol=1e-7)
    by_object = harvest(field, x, SPAN, steps=[4], reference=Reference("torchdyn:tsit5", atol=1e-8, rtol=1e-7))
    assert torch.equal(by_keywords.states, by_object.states)
    assert (by_object.reference, by_object.atol, by_object.rtol) == ("torchdyn:tsit5", 1e-8, 1e-7)
    # a keyword overrides the object's tolerance; the other one stays
    mixed = harvest(field, x, SPAN, steps=[4], reference=Reference("dopri5", atol=1e-5, rtol=1e-7), atol=1e-8)
    assert (mixed.reference, mixed.atol, mixed.rtol) == ("torchdiffeq:dopri5", 1e-8, 1e-7)


def test_bad_references_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown reference solver 'rk45'"):
        Reference("rk45")
    with pytest.raises(ValueError, match="atol must be a positive finite number, got -1"):
        Reference(atol=-1)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['atl'\]"):
        harvest(field, torch.randn(2, 2), SPAN, atl=1e-8)


def test_a_task_object_scores_what_the_task_keywords_score():
    x, labels = torch.randn(12, 2), torch.randint(0, 2, (12,))
    head = nn.Linear(2, 2)
    common = dict(solvers=["euler"], steps=[2], timing=False)
    by_keywords = pareto(field, x, SPAN, head=head, labels=labels, **common)
    by_object = pareto(field, x, SPAN, task=Task(head, labels), **common)
    assert by_keywords.rows[0].task_decrement == by_object.rows[0].task_decrement is not None
    assert pareto(field, x, SPAN, **common).rows[0].task_decrement is None  # no head, no task


def test_the_sweep_reference_tolerance_and_unknown_keywords():
    x = torch.randn(4, 2)
    loose = pareto(field, x, SPAN, solvers=["rk4"], steps=[4], timing=False, reference_tol=1e-5)
    tight = pareto(field, x, SPAN, solvers=["rk4"], steps=[4], timing=False, reference=Reference("dopri5", 1e-9, 1e-9))
    assert (loose.reference, loose.reference_tol, tight.reference_tol) == ("torchdiffeq:dopri5", 1e-5, 1e-9)
    assert pareto(field, x, SPAN, solvers=["rk4"], steps=[4], timing=False).reference_tol == 1e-7
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['tolerance'\]"):
        pareto(field, x, SPAN, tolerance=1e-3)
