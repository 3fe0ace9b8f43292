# Two commands for a newcomer: `make demo` and `make test`. Both set everything up
# (venv, torch, build) on first use and are safe to run again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_STAMP := $(VENV)/.torch-2.13.0
BUILD_STAMP := $(VENV)/.sparsecpu-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h)

.PHONY: demo test bench sanitize clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Pinned: an unpinned torch would resolve to a multi-GB CUDA build.
$(TORCH_STAMP): | $(PY)
	$(PIP) install --quiet "torch==2.13.0" "setuptools>=64" wheel ninja
	touch $@

$(BUILD_STAMP): $(TORCH_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench]"
	touch $@

demo: $(BUILD_STAMP)
	$(PY) benchmarks/demo.py

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench_linear.py

clean:
	rm -rf build $(VENV) torch_sparsecpu/*.so
