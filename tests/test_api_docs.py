"""The API reference (docs/api, ``make api-docs``) builds from the docstrings without a broken reference.

Sphinx runs in nitpicky mode (``-n``): every cross-reference that does not resolve is a warning.
References to objects outside the package (torch, torchdyn, the standard library) are ignored in
docs/api/conf.py; any other unresolved reference -- a name that no longer exists, a bare name
that Sphinx cannot find from the docstring's module, a reference into a private module
(``_mesh``, ``_loop``, ...) -- fails the test, as does a module that autodoc cannot import.
"""

import pathlib
import re
import subprocess
import sys

import pytest

import torchdyn_hypersolvers

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
PACKAGE = ROOT / "torchdyn_hypersolvers"
PUBLIC = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))

# What makes the build wrong, as Sphinx words it.
BROKEN = re.compile(
    r"reference target not found|reference to a private module|undefined label|more than one target found"
    r"|failed to import|autodoc: failed|duplicate object description|Unknown (interpreted text role|directive type)"
)


def test_every_public_module_has_a_page():
    pages = {p.stem for p in API.glob("*.rst")}
    assert sorted(set(PUBLIC) - pages) == [], "public modules without a page in docs/api"
    index = (API / "index.rst").read_text()
    assert [m for m in PUBLIC + ["package"] if not re.search(rf"^\s+{m}$", index, flags=re.M)] == []


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    pytest.importorskip("sphinx", reason="the API reference needs the docs extra: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("api")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-n", "-q", "-E", "-d", str(out / "doctrees"), str(API),
         str(out / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out / "html"


def test_api_reference_builds_without_broken_references(build):
    proc, _ = build
    assert proc.returncode == 0, proc.stderr[-3000:]
    broken = [line for line in proc.stderr.splitlines() if BROKEN.search(line)]
    assert broken == [], f"{len(broken)} broken references in the API reference:\n" + "\n".join(broken)


def test_every_top_level_name_is_documented(build):
    proc, html = build
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = "\n".join(p.read_text() for p in html.glob("*.html"))
    missing = [
        name
        for name in torchdyn_hypersolvers.__all__
        if not name.startswith("__") and not re.search(rf'id="torchdyn_hypersolvers\.\w+\.{name}"', pages)
    ]
    assert missing == [], "exported from the top level but documented on no page"
    # napoleon turned the Google-style sections into fields
    assert "Parameters" in pages and not re.search(r">\s*Args:\s*<", pages)
