# eyecool: `make install` sets up .venv (idempotent: a second run takes seconds), `make test`, `make demo`,
# `make bench`. Build switches are read from the environment: FORCE_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS,
# DEBUG, NVCC_FLAGS (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
# The extension is rebuilt when the build switches change, not only when sources do.
# The developer build also compiles the CUDA kernels as host code (torch.ops.eyecool_emu.*), which the tests run.
EYECOOL_CUDA_EMULATION ?= 1
export EYECOOL_CUDA_EMULATION
BUILD_CONFIG := FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) DEBUG=$(DEBUG) NVCC_FLAGS=$(NVCC_FLAGS) EYECOOL_CUDA_EMULATION=$(EYECOOL_CUDA_EMULATION)
CONFIG_STAMP := build/.build-config
PYTEST_ARGS ?=

.PHONY: install test demo bench sanitize clean FORCE

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

# Synthetic data -> train the shipped demo config (python/eyecool/configs/demo.yaml) -> evaluate -> pictures,
# on the CPU (see eyecool.engine.demo).
DEMO_OUT ?= output/demo
demo: install
	$(PY) -m eyecool demo --out $(DEMO_OUT)

bench: install
	$(PY) benchmarks/run.py --json bench_out/results.json

# The CPU extension under AddressSanitizer and UBSan, then the op tests against it: a copy of the sources in
# build/sanitize is built in place there (its own objects and .so; the normal build is untouched), python runs
# with libasan preloaded (it must come first; leak checks off, as CPython itself never frees everything) and
# libstdc++ after it (ASan's __cxa_throw interceptor aborts on the first C++ exception, i.e. every TORCH_CHECK,
# unless libstdc++ is loaded when ASan starts), and
# pytest runs from inside the copy so that its eyecool_ext is the one imported. triton is hidden from that python
# (its LLVM aborts at import under ASan; torch.compile on the CPU does not need it). Any ASan error aborts the
# run; any UBSan report fails the target. The full log is build/sanitize/report.txt.
SANITIZE_DIR := build/sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined,float-cast-overflow -fno-omit-frame-pointer -g
SANITIZE_TESTS ?= tests/ops
sanitize:
	@test -x $(PY) || { echo "$(PY) not found: run make install first, or pass PY=/path/to/python"; exit 1; }
	mkdir -p $(SANITIZE_DIR)/eyecool_ext $(SANITIZE_DIR)/site
	echo 'import sys; sys.modules["triton"] = None  # written by make sanitize' > $(SANITIZE_DIR)/site/sitecustomize.py
	cp -p setup.py pyproject.toml $(SANITIZE_DIR)/
	@# Only the sources that changed are copied, with a fresh time stamp: ninja compares time stamps, and a source
	@# copied with its own, older one would look older than an object built from its previous copy.
	cd csrc && find . -type f | while read -r f; do cmp -s "$$f" "$(CURDIR)/$(SANITIZE_DIR)/csrc/$$f" || \
	  { mkdir -p "$$(dirname "$(CURDIR)/$(SANITIZE_DIR)/csrc/$$f")" && cp "$$f" "$(CURDIR)/$(SANITIZE_DIR)/csrc/$$f"; }; done
	mkdir -p $(SANITIZE_DIR)/csrc && cd $(SANITIZE_DIR)/csrc && find . -type f | while read -r f; do \
	  test -e "$(CURDIR)/csrc/$$f" || rm -f "$$f"; done
	find $(SANITIZE_DIR)/eyecool_ext -name '*.py' -delete
	cd eyecool_ext && find . -name '*.py' -exec cp -p --parents {} $(CURDIR)/$(SANITIZE_DIR)/eyecool_ext/ \;
	cd $(SANITIZE_DIR) && CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="$(SANITIZE_FLAGS)" $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SANITIZE_DIR) && PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR)/site:$(CURDIR)/python LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1 \
	  $(abspath $(PY)) -c "import eyecool_ext, sys; assert eyecool_ext.compiled() and '$(SANITIZE_DIR)' in eyecool_ext.__file__, eyecool_ext.__file__; print('sanitized build:', eyecool_ext.__file__)"
	cd $(SANITIZE_DIR) && PYTHONPATH=$(CURDIR)/$(SANITIZE_DIR)/site:$(CURDIR)/python LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1 \
	  $(abspath $(PY)) -m pytest $(addprefix $(CURDIR)/,$(SANITIZE_TESTS)) -q -p no:cacheprovider $(PYTEST_ARGS) \
	  > report.txt 2>&1; status=$$?; tail -n 40 report.txt; exit $$status
	@! grep -E "runtime error:|ERROR: AddressSanitizer" $(SANITIZE_DIR)/report.txt || \
	  { echo "sanitizer findings: see $(SANITIZE_DIR)/report.txt"; exit 1; }

# On a machine with an NVIDIA GPU: build the extension with CUDA in place (with GPU_PYTHON, not the .venv: the GPU
# image has none), compute-sanitizer over every op, CUDA vs CPU vs reference, the CUDA op tests, timings against
# torchvision; one JSON report (GPU_CHECK_JSON) and a table; nonzero exit when a check fails. Without a GPU it says
# so and exits 0 having built nothing. The emulation build is off: the real kernels are what is checked there.
GPU_PYTHON ?= python3
GPU_CHECK_JSON ?= bench_out/gpu_check.json
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/python$${PYTHONPATH:+:$$PYTHONPATH} EYECOOL_CUDA_EMULATION=0 \
	  $(GPU_PYTHON) benchmarks/gpu_check.py --json $(GPU_CHECK_JSON) $(GPU_CHECK_ARGS)

clean:
	rm -rf build eyecool_ext/_C*.so *.egg-info
