"""The package's code stays in pieces a reader can hold: no class over 150 lines, no public function
over 60 lines of code (its docstring not counted) or 10 parameters."""

import ast
import pathlib

import torchdyn_hypersolvers as th

PACKAGE = pathlib.Path(th.__file__).parent
MAX_CLASS_LINES = 150
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 10


def _code_lines(node) -> int:
    """Lines of ``node`` without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def _definitions():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def test_no_class_is_too_long():
    long = [
        f"{file}:{node.lineno} {node.name} ({_code_lines(node)} lines)"
        for file, node in _definitions()
        if isinstance(node, ast.ClassDef) and _code_lines(node) > MAX_CLASS_LINES
    ]
    assert not long, long


def test_no_public_function_is_too_long_or_takes_too_many_parameters():
    problems = []
    for file, node in _definitions():
        if isinstance(node, ast.ClassDef) or not _public(node.name):
            continue
        args = node.args
        count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
        count -= int(bool(args.args) and args.args[0].arg in ("self", "cls"))
        if count > MAX_PARAMETERS:
            problems.append(f"{file}:{node.lineno} {node.name} takes {count} parameters")
        if _code_lines(node) > MAX_FUNCTION_LINES:
            problems.append(f"{file}:{node.lineno} {node.name} has {_code_lines(node)} lines")
    assert not problems, problems
