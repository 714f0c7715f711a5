"""Every ```python block in README.md and docs/*.md runs as written, alone.

Each block runs in a fresh namespace with a temporary directory as the working
directory, so blocks share nothing and must be self-contained. Shell commands and
output belong in ```bash or ```text blocks, which are not run.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README] + sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _name(page: pathlib.Path) -> str:
    return page.relative_to(ROOT).as_posix()


BLOCKS = [(f"{_name(page)}[{i}]", code) for page in PAGES for i, code in enumerate(FENCE.findall(page.read_text()))]


def _links(page: pathlib.Path):
    """The local pages a markdown page links to, as resolved paths."""
    return {(page.parent / target).resolve() for target in LINK.findall(page.read_text()) if "://" not in target}


def test_snippets_found():
    assert len([name for name, _ in BLOCKS if name.startswith("README.md")]) >= 1
    assert len(BLOCKS) >= 10


def test_readme_is_a_first_screen():
    assert README.stat().st_size < 10 * 1024


def test_every_docs_page_is_linked():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    linked = _links(README) | _links(DOCS / "index.md")
    assert [_name(p) for p in pages if p.resolve() not in linked] == []


def test_links_resolve():
    for page in PAGES:
        for target in _links(page):
            assert target.exists(), f"{_name(page)} links to missing {target}"


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_snippet_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
