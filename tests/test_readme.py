"""Every ```python block in README.md and docs/*.md runs as written, alone, and prints sense.

Each block runs in a fresh namespace with a temporary directory as the working
directory, so blocks share nothing and must be self-contained. Shell commands and
output belong in ```bash or ```text blocks, which are not run.

What a block prints is checked too: a block that prints prints something, no number comes
out as nan or inf, torchdyn's "we've wrapped it for you" shows at most once, and the blocks
in ``EXPECT`` print their key phrases and shapes (never measured numbers).
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


# A number printed as nan or inf: a solve or a fit that went wrong without raising.
NOT_A_NUMBER = re.compile(r"(?<![\w.])[-+]?(nan|inf)(?!\w)", flags=re.I)
# ... except here: an untimed sweep (``timing=False``) has no wall-clock time.
NAN_COLUMNS = {"docs/evaluation.md[3]": {"wall (ms)"}}
WRAPPED = "we've wrapped it for you"  # torchdyn's notice, printed per NeuralODE built from an f without t

# What a block must print (regular expressions, one line each): the phrases, shapes, counts and
# table rows its comments promise. Not measured errors or times.
EXPECT = {
    "docs/flow-matching.md[0]": [r"^\| 4 \| Hyper\w+", r"^samples: \(256, 2\)$"],
    "docs/flow-matching.md[1]": [r"^shape: \(2, 512, 2\)$"],
    "docs/flow-matching.md[2]": [r"labels kept: \[0, 1, 2, 3, 3\]"],
    "docs/flow-matching.md[3]": [r"W2 to reference"],
    "README.md[0]": [r"^\| NFE \| choice \|", r"^\| 4 \| Hyper\w+", r"^\| 8 \| Hyper\w+"],
    "README.md[1]": [
        r"^residual fit, 200 iterations",
        r"^\| HyperEuler \| 8 \| 8 \| 8 \|",  # 8 steps: 8 evaluations of f, 8 calls of g
        r"^\| euler \| 8 \| 8 \| 0 \|",
        r"^\| rk4 \| 8 \| 32 \| 0 \|",
        r"^\| dopri5 \| tol 0\.0001 \|",
    ],
    "docs/errors.md[0]": [
        r"returned shape \(4, 3\) for a state of shape \(4, 2\)",
        r"t_span must be strictly increasing or strictly decreasing",
    ],
    "docs/evaluation.md[0]": [
        r"^at 8 steps HyperEuler's terminal error is \d+(\.\d)?x below Euler's$",
        r"^10 rows: \['HyperEuler', 'dopri5', 'euler', 'midpoint', 'rk4'\]$",
    ],
    "docs/evaluation.md[1]": [r"^euler 2 ", r"^euler 4 ", r"^rk4 2 ", r"^rk4 4 "],
    "docs/evaluation.md[2]": [r"^torch\.Size\(\[5, 8, 2\]\)$", r"^\[True, True, False\]$"],
    "docs/evaluation.md[3]": [r"^\| g\(euler\)@midpoint \| 4 \| 8 \| 4 \|", r"^\| midpoint \| 8 \| 16 \| 0 \|"],
    "docs/guard.md[0]": [
        r"^10 steps x 16 samples: \d+ fell back to the base solver",
        r"^Guarded: a sample's step falls back to euler",
    ],
    "docs/guard.md[1]": [r"fell back to the base solver euler"],
    "docs/hypernets.md[1]": [r"^torch\.Size\(\[5, 8, 2\]\)$"],
    "docs/save-load.md[0]": [r"^Valid for step sizes \|dt\| in \[0\.05, 0\.1\]"],
    "docs/save-load.md[1]": [r"not the requested 'euler'", r"'state_dict'"],
    "docs/solver-names.md[0]": [r"^\['my-hypereuler'\]$"],
    "docs/tuning.md[2]": [r"^held-out terminal error at 4 evaluations of f: \d\.\d\de-\d\d -> \d\.\d\de-\d\d$"],
}


def _not_numbers(name: str, out: str):
    """The lines of ``out`` that print nan or inf, leaving out the table columns NAN_COLUMNS allows."""
    allowed, header, bad = NAN_COLUMNS.get(name, set()), None, []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            header = None
        elif header is None:
            header = cells
        elif all(set(c) <= set("-:") for c in cells):
            continue
        else:
            line = " | ".join(c for h, c in zip(header, cells) if h not in allowed)
        if NOT_A_NUMBER.search(line):
            bad.append(line)
    return bad


def test_expectations_name_existing_blocks():
    names = {name for name, _ in BLOCKS}
    assert sorted((set(EXPECT) | set(NAN_COLUMNS)) - names) == []


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_snippet_runs(name, code, tmp_path, monkeypatch, capsys):
    if name.startswith("docs/flow-matching.md"):  # the [flow] extra
        pytest.importorskip("torchcfm")
        pytest.importorskip("ot")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
    out = capsys.readouterr().out
    if re.search(r"^\s*print\(", code, flags=re.M):
        assert [line for line in out.splitlines() if line.strip() and WRAPPED not in line], f"{name} prints nothing"
    assert _not_numbers(name, out) == [], f"{name} printed nan or inf"
    assert out.count(WRAPPED) <= 1, f"{name}: torchdyn's notice more than once"
    missing = [p for p in EXPECT.get(name, []) if not re.search(p, out, flags=re.M)]
    assert missing == [], f"{name} did not print these; it printed:\n{out[-3000:]}"
