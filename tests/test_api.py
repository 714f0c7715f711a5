"""The public API: its size, the names that moved, and the package's layering."""

import ast
import importlib
import pathlib

import pytest
import torch

import torchdyn_hypersolvers as th
from torchdyn_hypersolvers import FixedStepSolver, HyperEuler, HyperRK4, HyperSolver, MLPHyperNet, tableaus

PACKAGE = pathlib.Path(th.__file__).parent


def test_public_api_is_small_and_importable():
    assert len(th.__all__) <= 38
    for name in th.__all__:
        assert getattr(th, name) is not None, name


@pytest.mark.parametrize("name", sorted(th._MOVED))
def test_moved_names_still_import_with_a_deprecation_warning(name):
    module, attr = th._MOVED[name]
    with pytest.warns(DeprecationWarning, match=f"moved to torchdyn_hypersolvers.{module}.{attr}"):
        value = getattr(th, name)
    assert value is getattr(importlib.import_module(f"torchdyn_hypersolvers.{module}"), attr)


def test_unknown_top_level_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        th.nope  # noqa: B018


def test_no_module_imports_the_package_init():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
                names = {alias.name for alias in node.names}
                assert names <= {p.stem for p in PACKAGE.glob("*.py")}, (path.name, names)
            if isinstance(node, ast.Import):
                assert all(alias.name != "torchdyn_hypersolvers" for alias in node.names), path.name


def test_the_tableau_lives_on_the_class():
    assert HyperEuler.tableau is tableaus.EULER and HyperRK4.tableau is tableaus.RK4
    assert th.Euler.tableau is tableaus.EULER and th.RK4.tableau is tableaus.RK4
    assert HyperSolver.tableau is None and FixedStepSolver.tableau is None

    class HyperRalstonAgain(HyperSolver):
        tableau = tableaus.RALSTON

    hs = HyperRalstonAgain(MLPHyperNet(2))
    assert hs.tableau is tableaus.RALSTON and hs.order == 2
    x = torch.randn(4, 2)
    f = torch.nn.Linear(2, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            hs.solve(lambda t, z: f(z), x, torch.linspace(0, 1, 5)),
            th.Ralston().solve(lambda t, z: f(z), x, torch.linspace(0, 1, 5)),
        )
    with pytest.raises(TypeError, match="is euler; it takes no other base"):
        th.Euler("rk4")
    with pytest.raises(TypeError, match="needs a base solver"):
        FixedStepSolver()


def test_torchdyn_constructor_signature_and_old_convention_name():
    g = MLPHyperNet(2)
    assert HyperEuler(g, dtype=torch.float64).dtype == torch.float64
    assert HyperEuler(g, torch.float64).dtype == torch.float64
    assert HyperEuler(g, "explicit").convention == "dt_t_z_dz"  # the name before 0.2 is an alias
    assert th.HyperRungeKutta4 is HyperRK4
    assert th.Euler(torch.float64).dtype == torch.float64
