# Every target creates .venv and installs the package into it when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow test-wheel lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[examples,dev,lightning]'
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

clean:
	rm -rf $(VENV) build dist *.egg-info results
