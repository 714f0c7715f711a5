"""Sphinx configuration of the API reference (``make api-docs``: HTML in build/api).

Built offline from the docstrings: autodoc + napoleon (Google-style ``Args:``), the builtin
alabaster theme, no intersphinx. Each page of a public module uses the ``public-module``
directive below, which documents what the module exports (its ``__all__``, or else its own public
names plus what it re-exports from private modules); private modules (``_mesh``, ``_loop``, ...)
have no page. A docstring reference to a private module or to a name that is not documented is
a warning, which ``tests/test_api_docs.py`` (nitpicky, ``-n``) turns into a failure.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx import addnodes
from sphinx.ext.napoleon import Config
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import torchdyn_hypersolvers  # noqa: E402

PACKAGE = "torchdyn_hypersolvers"
project = "torchdyn-hypersolvers"
author = "torchdyn-hypersolvers contributors"
release = version = torchdyn_hypersolvers.__version__

extensions = ["sphinx.ext.autodoc"]  # napoleon: see _napoleon below
html_theme = "alabaster"
html_static_path: list = []
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"  # the class line, then __init__'s parameters
autodoc_inherit_docstrings = False  # overrides without a docstring: no copy of torch's or Lightning's
NAPOLEON = Config(napoleon_google_docstring=True, napoleon_numpy_docstring=False, napoleon_use_rtype=False)

try:  # lightning.py needs PyTorch Lightning (the `lightning` extra); document it without too
    import pytorch_lightning  # noqa: F401
except ImportError:  # pragma: no cover - the dev venv has it
    autodoc_mock_imports = ["pytorch_lightning", "lightning"]

# Nitpicky mode (-n) reports every reference it cannot resolve. Objects outside this package
# (torch, torchdyn, the standard library, typing) have no page here: those are not errors.
# Anything of this package that does not resolve stays a warning.
nitpick_ignore_regex = [
    ("py:.*", r"(torch|torchdyn|torchdiffeq|numpy|np|matplotlib|pytorch_lightning|lightning|pl|nn|optim)(\..*)?"),
    ("py:.*", r"(Tensor|Module|Parameter|Generator|Optimizer|LRScheduler|TensorDataset|DataLoader|Dataset)"),
    ("py:.*", r"(LightningModule|LightningDataModule|Trainer|Callback)"),
    ("py:.*", r"(typing|collections|os|pathlib|io|dataclasses|enum|abc|contextlib|argparse)\..*"),
    ("py:.*", r"(Any|Callable|Dict|Iterable|Iterator|List|Literal|Mapping|Optional|Sequence|Set|Tuple|Type|Union)"),
    ("py:.*", r"(Generic|NamedTuple|TypeVar|ClassVar|Protocol|PathLike|Path|BinaryIO|IO|Self)"),
    ("py:.*", r"(int|float|str|bool|bytes|dict|list|tuple|set|object|type|slice|complex|None|Ellipsis|callable)"),
    ("py:.*", r"(ValueError|TypeError|RuntimeError|KeyError|Warning|UserWarning|ImportError|Exception)"),
    ("py:.*", r"(builtins|functools)\..*"),
    ("py:.*", r"T|T_co|F|_T"),
]

# One page each (docs/api/<name>.rst); the package's top level is package.rst.
PUBLIC_MODULES = [
    f"{PACKAGE}.{name}"
    for name in (
        "tableaus",
        "solvers",
        "guard",
        "multistage",
        "hypernets",
        "harvest",
        "fit",
        "evaluate",
        "metrics",
        "plots",
        "io",
        "registry",
        "tuning",
        "budget",
        "nonstationary",
        "shards",
        "flow_matching",
        "control",
        "validity",
        "lightning",
    )
]
_PRIVATE = re.compile(r"(^|[.~])_[A-Za-z0-9]\w*(?=\.|$)")
logger = logging.getLogger(__name__)


def _is_private_module(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split(".")[1:])


def exported_names(modname: str) -> list:
    """What a public module exports: ``__all__``, or else the public classes and functions it
    defines plus those it re-exports from this package's private modules."""
    module = importlib.import_module(modname)
    if getattr(module, "__all__", None) is not None:
        return list(module.__all__)
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        owner = getattr(obj, "__module__", "") or ""
        if owner == modname or (
            owner.startswith(PACKAGE + ".") and _is_private_module(owner) and name in torchdyn_hypersolvers.__all__
        ):
            names.append(name)
    return names


def home_of(modname: str, name: str) -> str:
    """The public module whose page documents ``modname.name``: the module that defines it when
    that module is public and exports it, else the first public module (in page order) exporting it."""
    obj = getattr(importlib.import_module(modname), name)
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return modname  # constants: documented where they are exported
    owner = getattr(obj, "__module__", "") or ""
    if owner in PUBLIC_MODULES and name in exported_names(owner):
        return owner
    for candidate in PUBLIC_MODULES:
        if getattr(importlib.import_module(candidate), name, None) is obj and name in exported_names(candidate):
            return candidate
    raise LookupError(f"{modname}.{name} is exported but no public module's page documents it")


def _role(obj) -> str:
    if inspect.isclass(obj):
        return "exc" if issubclass(obj, BaseException) else "class"
    return "func" if callable(obj) else "data"


_ROLE = re.compile(r":\w+:`~?\.?([^`<]*?)(?:\s*<[^>]*>)?`")


def _summary(obj) -> str:
    """The first sentence of ``obj``'s docstring, its cross-references as plain literals (they
    were written for the docstring's own module)."""
    text = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
    text = _ROLE.sub(lambda m: f"``{m.group(1)}``", text)
    return re.split(r"(?<=[.:;])\s", text, maxsplit=1)[0].rstrip(":;")


class PublicModule(SphinxDirective):
    """``.. public-module:: torchdyn_hypersolvers.fit``: the module's docstring and what it exports
    (what another public module documents is linked there, not documented twice)."""

    required_arguments = 1

    def run(self):
        modname = self.arguments[0]
        names = exported_names(modname)
        own = [n for n in names if home_of(modname, n) == modname]
        lines = [f".. automodule:: {modname}"]
        lines.append("   :members: " + ", ".join(own) if own else "   :no-members:")
        module = importlib.import_module(modname)
        elsewhere = [
            f":{_role(getattr(module, n))}:`~{home_of(modname, n)}.{n}`"
            for n in names
            if home_of(modname, n) != modname
        ]
        if elsewhere:
            lines += ["", "Also exported here (documented on their own page): " + ", ".join(elsewhere) + "."]
        return self._parse(lines)

    def _parse(self, lines):
        node = nodes.section()
        nested_parse_with_titles(self.state, StringList(lines, source=self.get_source_info()[0]), node)
        return node.children


class PublicApi(PublicModule):
    """``.. public-api::``: one line per name of the package's ``__all__``, linked to its page."""

    required_arguments = 0

    def run(self):
        lines = []
        for name in torchdyn_hypersolvers.__all__:
            if name.startswith("__"):
                continue
            obj = getattr(torchdyn_hypersolvers, name)
            lines.append(f"* :{_role(obj)}:`~{home_of(PACKAGE, name)}.{name}` -- {_summary(obj)}")
        return self._parse(lines)


def _napoleon(app, what, name, obj, options, lines):
    """Napoleon's Google-style parsing (``Args:``, ``Returns:``, ...) for modules, classes and
    functions. Not for constants and properties: napoleon reads their docstrings as
    ``type: description``, and "Forward Euler: ..." is prose, not a type."""
    if what in ("data", "attribute", "property"):
        return
    lines[:] = GoogleDocstring(lines, NAPOLEON, app, what, name, obj, options).lines()


def _warn_private_references(app, doctree):
    """A docstring reference into a private module is an error even where it resolves (a
    re-exported object is also registered under its defining, private, module)."""
    for node in doctree.findall(addnodes.pending_xref):
        if node.get("refdomain") != "py":
            continue
        if any(isinstance(parent, addnodes.desc_signature) for parent in _ancestors(node)):
            continue  # type annotations in a signature: the code's own types, not docstring text
        target = node.get("reftarget", "")
        if _PRIVATE.search(target):
            logger.warning(
                "reference to a private module: %s (document the public name instead)",
                target,
                location=node,
                type="ref",
                subtype="private",
            )


def _ancestors(node):
    while node.parent is not None:
        node = node.parent
        yield node


def setup(app):
    app.add_directive("public-module", PublicModule)
    app.add_directive("public-api", PublicApi)
    app.connect("autodoc-process-docstring", _napoleon)
    app.connect("doctree-read", _warn_private_references)
    return {"parallel_read_safe": True}
