# Every target that runs something first does the whole set-up on a fresh machine: a virtual environment
# with pinned dependencies (requirements/), then the build of pydc._C (CUDA sources too where a toolkit is
# found; see setup.py). `make test` is what CI runs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

DEPS_STAMP := $(VENV)/.deps-installed
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
BUILD_STAMP := build/.pydc-built
QUALITY_STAMP := $(VENV)/.quality-deps-installed

.PHONY: setup build train quality test test-cuda bench mutants clean

setup: $(DEPS_STAMP)

$(DEPS_STAMP): requirements/base.txt requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/dev.txt
	touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) setup.py build_ext --inplace
	mkdir -p build && touch $@

# The product's main job: DeepCluster with the `small` net on the bundled digits (a few minutes on a CPU).
train: build
	$(PY) -m pydc.train

# Learning quality beyond the digits: every algorithm with its defaults on four small datasets of different kinds,
# beside raw-pixel k-means, a random network and UMAP + k-means (report in runs/quality; 60 min with 1 thread on a
# heavily shared 2-core machine, 8 training runs of 4-9 min there).
quality: build $(QUALITY_STAMP)
	$(PY) -m pydc.quality --output runs/quality

$(QUALITY_STAMP): requirements/quality.txt $(DEPS_STAMP)
	$(PY) -m pip install --quiet -r requirements/quality.txt
	touch $@

test: build
	$(PY) -m pytest tests

test-cuda: build
	$(PY) -m pytest -m cuda tests

# Planted bugs (tests/mutants/mutants.toml): each is applied to a copy of the tree in build/mutants, the tests
# that should catch it run there, survivors are printed. C++ mutants rebuild that copy CPU-only (incremental
# after the first run). `make test` runs the Python mutants too (tests/test_mutants.py).
mutants: build
	$(PY) tests/mutants/run.py --workdir build/mutants

bench: build
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build pydc/_C*.so pydc/_build_info.json
