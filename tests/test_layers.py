"""The package's modules depend on each other one way: an explicit layer order, no cycle, no import
hidden inside a function to dodge one; the module paths of earlier versions still import."""

import ast
import importlib
import pathlib
import warnings

import pytest

import torchdyn_hypersolvers as th
from torchdyn_hypersolvers._compat import MOVED_MODULES

PACKAGE = pathlib.Path(th.__file__).parent

# Lower layers never import higher ones. Within a layer, imports are allowed where they do not make a
# cycle (checked separately). Every module of the package must be listed.
LAYERS = [
    {"_version", "_checks", "_progress", "_files", "_states", "tableaus", "metrics", "_workers"},
    {"_mesh", "_solver_names", "_costs", "_adjoint", "_precision", "_records", "_outside_fit", "_user_model",
     "_model_identity"},
    {"_reference", "hypernets", "validity", "_loop"},
    {"_residuals", "solvers"},
    {"_wrapped", "multistage", "registry", "_time_grid", "nonstationary"},
    {"guard", "harvest", "control", "plots", "flow_matching"},
    {"_optimisation", "evaluate", "fit", "io"},
    {"budget", "tuning", "lightning", "shards"},
    {"_compat", "__init__"},
]


def _modules():
    return {path.stem: path for path in PACKAGE.glob("*.py")}


def _imports(path: pathlib.Path):
    """``(package module imported, at module level?)`` for every relative import of the file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(name.split(".")[0], id(node) in top) for name in names]
    return found


def test_every_module_has_a_layer():
    listed = set().union(*LAYERS)
    assert set(_modules()) == listed, (set(_modules()) - listed, listed - set(_modules()))


def test_imports_follow_the_layer_order_and_sit_at_module_level():
    layer = {name: k for k, names in enumerate(LAYERS) for name in names}
    lazy_ok = {("evaluate", "plots")}  # matplotlib is an optional extra: plots are imported on use
    for name, path in _modules().items():
        for imported, at_top in _imports(path):
            if imported not in layer:
                continue
            assert layer[imported] <= layer[name], f"{name} ({layer[name]}) imports {imported} ({layer[imported]})"
            assert at_top or (name, imported) in lazy_ok, f"{name} imports {imported} inside a function"


def test_no_import_cycle():
    graph = {name: {m for m, _ in _imports(path) if m in _modules()} for name, path in _modules().items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(trail + [nxt])}"
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_paths_import_with_a_deprecation_warning(old):
    module = importlib.import_module(f"torchdyn_hypersolvers.{old}")
    target = importlib.import_module(f"torchdyn_hypersolvers.{MOVED_MODULES[old][0]}")
    name = target.__all__[0]
    with pytest.warns(DeprecationWarning, match=f"torchdyn_hypersolvers.{old} is private now"):
        value = getattr(module, name)
    assert value is getattr(target, name)


def test_old_names_module_still_resolves_solvers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchdyn_hypersolvers.names import resolve_base, resolve_solver
    assert resolve_solver("euler").kind == "fixed" and resolve_base("rk4").order == 4
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        importlib.import_module("torchdyn_hypersolvers.names").nope  # noqa: B018
