# Every target creates .venv and installs the package into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow test-wheel lint bench api-docs clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[examples,dev,lightning,docs,flow]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Build sdist and wheel, install the wheel in a fresh venv, smoke-test it (about half a minute).
test-wheel: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_packaging.py

bench: $(STAMP)
	$(PY) -m benchmarks --out results/bench

# The API reference, built from the docstrings (Sphinx autodoc + napoleon) into build/api.
api-docs: $(STAMP)
	$(PY) -m sphinx -b html -n -q docs/api build/api
	@echo "API reference: build/api/index.html"

clean:
	rm -rf $(VENV) build dist *.egg-info results
