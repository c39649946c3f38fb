# eyecool: `make install` sets up .venv (idempotent: a second run takes seconds), `make test`, `make demo`,
# `make bench`. Build switches are read from the environment: FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# DEBUG, NVCC_FLAGS (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
# The extension is rebuilt when the build switches change, not only when sources do.
BUILD_CONFIG := FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) DEBUG=$(DEBUG) NVCC_FLAGS=$(NVCC_FLAGS)
CONFIG_STAMP := build/.build-config
PYTEST_ARGS ?=

.PHONY: install test demo bench clean FORCE

install: $(VENV)/.installed-package $(VENV)/.extension-built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-requirements: requirements.txt requirements-nodeps.txt | $(PY)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	touch $@

# Writes the stamp only when the configuration differs, so make sees a change only then.
$(CONFIG_STAMP): FORCE
	@mkdir -p build
	@echo '$(BUILD_CONFIG)' | cmp -s - $@ || echo '$(BUILD_CONFIG)' > $@

# pip's editable install registers both packages and the `eyecool` command, and builds the extension once.
$(VENV)/.installed-package: setup.py pyproject.toml $(VENV)/.installed-requirements
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# Later source or switch changes rebuild incrementally (ninja, objects kept in build/).
$(VENV)/.extension-built: $(EXT_SOURCES) $(CONFIG_STAMP) $(VENV)/.installed-package
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Synthetic data -> train configs/demo.yaml -> evaluate -> pictures, on the CPU (see eyecool.engine.demo).
DEMO_OUT ?= output/demo
demo: install
	$(PY) -m eyecool demo --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/run.py --json bench_out/results.json

clean:
	rm -rf build eyecool_ext/_C*.so *.egg-info
