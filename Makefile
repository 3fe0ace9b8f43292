# Two commands for a newcomer: `make demo` and `make test`. Both set everything up
# (venv, torch, build) on first use and are safe to run again.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_STAMP := $(VENV)/.torch-2.13.0
BUILD_STAMP := $(VENV)/.sparsecpu-built
LINT_TOOLS_STAMP := $(VENV)/.lint-tools
SOURCES := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h)

.PHONY: demo test lint bench probe sanitize clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Pinned: an unpinned torch would resolve to a multi-GB CUDA build.
$(TORCH_STAMP): | $(PY)
	$(PIP) install --quiet "torch==2.13.0" "setuptools>=64" wheel ninja
	touch $@

$(BUILD_STAMP): $(TORCH_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench,lint]"
	touch $@

# The lint tools alone: pyproject.toml's `lint` extra, read from there, without building
# the extension (linting needs torch's headers, not a build of ours).
$(LINT_TOOLS_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PY) -c "import subprocess, sys, tomllib; \
	extra = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['lint']; \
	subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--quiet', *extra])"
	touch $@

demo: $(BUILD_STAMP)
	$(PY) benchmarks/demo.py

# Tests marked `slow` (BERT-base end to end, about 40 s) are skipped unless
# SLOW=1 (`SLOW=1 make test`, as .ci/run does); tests/conftest.py reads it.
test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

# Ruff's rules and settings are in pyproject.toml; lint-cpp compiles the C++ with
# -Wall -Wextra -Werror. Neither needs the extension built.
lint: $(LINT_TOOLS_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(MAKE) --no-print-directory -j $(shell nproc) lint-cpp

bench: $(BUILD_STAMP)
	$(PY) benchmarks/bench_linear.py

# The AVX2 kernels alone, one core, no torch (benchmarks/probe_kernels.cpp): FMA peak,
# the microkernel's L1 ceiling, pack / kernel / unpack of BERT's 3072x768 layer at 90%, and
# the kernel with its activations forced into L1 (the cost of L1 misses).
PROBE := build/probe_kernels
PROBE_SOURCES := benchmarks/probe_kernels.cpp csrc/kernels/pack.cpp csrc/kernels/spmm_f32__avx2.cpp
$(PROBE): $(PROBE_SOURCES) $(wildcard csrc/kernels/*.h)
	mkdir -p build
	g++ -O3 -std=c++17 -fno-math-errno -Icsrc/kernels -o $@ $(PROBE_SOURCES)
probe: $(PROBE)
	$(PROBE) 3072 768 0.9

# Every C++ source of ours with -Wall -Wextra -Werror, parsed and type-checked only
# (-fsyntax-only: no code is generated, a few seconds per file), with setup.py's -std and
# -fopenmp and the defines torch's build adds. Torch's and Python's headers come in with
# -isystem, so only warnings in csrc/ count. Needs torch installed in $(PY).
# Each source is checked once and again only when it or a header changes (a stamp per
# file under build/lint; a fresh clone checks them all), in parallel.
LINT_DIR := build/lint
CPP_SOURCES := $(sort $(wildcard csrc/*/*.cpp))
LINT_STAMPS := $(CPP_SOURCES:%.cpp=$(LINT_DIR)/%.ok)
LINT_CXXFLAGS = -std=c++17 -fopenmp -fno-math-errno -Wall -Wextra -Werror -fsyntax-only \
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
  $(shell $(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))") \
  -isystem $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])")
.PHONY: lint-cpp
lint-cpp: $(LINT_STAMPS)
$(LINT_DIR)/%.ok: %.cpp $(wildcard csrc/*/*.h) | $(LINT_TOOLS_STAMP)
	@echo "g++ -Wall -Wextra -Werror -fsyntax-only $<"
	@g++ $(LINT_CXXFLAGS) $<
	@mkdir -p $(dir $@) && touch $@

# The kernel/op tests under AddressSanitizer + UBSan. The instrumented extension is built
# into build/sanitize (never over the in-place torch_sparsecpu/_C*.so) next to a copy of
# the Python package; `python -P` keeps the checkout's torch_sparsecpu off sys.path so the
# copy wins over the editable install. libasan must be preloaded (it has to come first),
# and libstdc++ with it: Python does not link libstdc++, and without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts on the first C++ exception (any
# TORCH_CHECK). Python itself leaks, so leak detection is off. --capture=sys: a sanitizer
# report goes to fd 2 and the process then exits, so pytest's fd capture would swallow it.
SAN_LIB := build/sanitize
# The int8 kernels' tests (tests/test_int8.py: every ISA at tile edges, saturation
# extremes, repacks) run under it too.
SAN_TESTS := tests/test_fuzz.py $(wildcard tests/test_kernels.py tests/test_ops.py tests/test_conv.py tests/test_conv_chain.py \
                                           tests/test_argument_errors.py tests/test_packed_validation.py \
                                           tests/test_int8.py)
sanitize: $(BUILD_STAMP)
	TORCH_SPARSECPU_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(SAN_LIB) --build-temp build/sanitize-tmp
	mkdir -p $(SAN_LIB)/torch_sparsecpu/passes
	cp torch_sparsecpu/*.py $(SAN_LIB)/torch_sparsecpu/
	cp torch_sparsecpu/passes/*.py $(SAN_LIB)/torch_sparsecpu/passes/
	export LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" PYTHONPATH="$(CURDIR)/$(SAN_LIB)" \
	       ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1; \
	$(PY) -P -c "import torch_sparsecpu as t, sys; f = t._C.__file__; print('sanitized extension:', f); \
	sys.exit(0 if f.startswith('$(CURDIR)/$(SAN_LIB)/') else 'not the sanitized build')" && \
	$(PY) -P -m pytest -q -p no:cacheprovider --capture=sys $(SAN_TESTS)

clean:
	rm -rf build $(VENV) torch_sparsecpu/*.so
