# Single entry point. `make demo` and `make test` each create the virtualenv if needed, install
# what they need, build the extension and run. Override PYTHON to pick the interpreter, VENV to
# use another virtualenv.
#
# Nothing is rebuilt that did not change: `make build` runs only when a file under csrc/, setup.py,
# imi_softmax/_build_config.py, pyproject.toml or the venv's torch is newer than the venv's build stamp (or the compiled library
# is missing), and then recompiles only the changed objects: `setup.py build_ext --inplace` keeps its
# objects and ninja file in build/ (`pip install -e .` compiles everything again in a fresh temporary
# directory on every call). The venv sees the source tree through a .pth file, like an editable
# install, so Python edits need no rebuild. `make check-cuda` reruns nvcc only when a .cu/.cuh/.h
# changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-installed
BUILT := $(VENV)/.imi-built
# The list of sources, rewritten (at parse time, so `make -n` sees it too) only when a file was added
# or deleted: that also triggers a rebuild.
SOURCE_LIST := build/.imi-sources
CUDA_CHECKED := build/.cuda-checked

SOURCES := $(sort $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \
                                               -o -name '*.hpp' \))) setup.py pyproject.toml \
           imi_softmax/_build_config.py
CUDA_SOURCES := $(filter %.cu %.cuh %.h csrc/cuda/%.cpp csrc/tensor_views.h,$(SOURCES)) scripts/check_cuda_kernels.sh $(wildcard scripts/cuda_glue_stubs/*.h)
$(shell mkdir -p build && { echo '$(SOURCES)' | cmp -s - $(SOURCE_LIST) || echo '$(SOURCES)' > $(SOURCE_LIST); })
# torch/version.py is rewritten whenever torch is (re)installed into the venv.
TORCH_STAMP := $(wildcard $(VENV)/lib/python*/site-packages/torch/version.py)
# A missing compiled library (e.g. after `make clean`) forces a rebuild whatever the stamps say.
NEED_SO := $(if $(wildcard imi_softmax/_C*.so),,FORCE)

.PHONY: demo test test-fallback test-sanitize venv build check-cuda bench clean FORCE

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

# A regular (non-editable) install left in the venv would shadow the source tree: removed first.
$(BUILT): $(STAMP) $(SOURCES) $(SOURCE_LIST) $(TORCH_STAMP) $(NEED_SO)
	@$(PIP) uninstall --quiet --yes imi_softmax >/dev/null 2>&1 || true
	@mkdir -p build && echo "compiling the imi_softmax extension (changed objects only; log in build/build.log)"
	@IMI_STRICT_BUILD=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py build_ext --inplace > build/build.log 2>&1 \
	  || { tail -n 60 build/build.log; echo "build failed: full log in build/build.log"; exit 1; }
	@$(PY) -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "imi_softmax-src.pth").write_text(sys.argv[1] + "\n")' '$(CURDIR)'
	touch $@

build: $(BUILT)
	@echo "imi_softmax extension up to date ($(VENV))"

# Stamped only where nvcc ran, so a machine that gains nvcc later still checks.
$(CUDA_CHECKED): $(CUDA_SOURCES)
	bash scripts/check_cuda_kernels.sh
	@if command -v $${NVCC:-nvcc} >/dev/null 2>&1; then mkdir -p $(@D) && touch $@; fi

check-cuda: $(CUDA_CHECKED)
	@echo "CUDA kernels compile-checked (nvcc reruns only when a .cu/.cuh/.h changes)"

demo: build
	$(PY) examples/demo.py

test: build check-cuda
	$(PY) -m pytest tests -q
	$(MAKE) --no-print-directory test-fallback
	$(MAKE) --no-print-directory test-sanitize

# The same suite on the pure-PyTorch ops a machine without a compiler gets (their checks and
# messages are the kernels'; tests that need the compiled library skip).
test-fallback: build
	IMI_FORCE_FALLBACK=1 $(PY) -m pytest tests -q

# The op-level tests against an ASan + UBSan build of the CPU ops in build/sanitize/ (~2.5 min to
# build the first time, ~4 min of tests on 2 cores); skipped where the compiler has no sanitizers.
test-sanitize: build
	PY=$(PY) bash scripts/sanitize_check.sh

bench: build
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build *.egg-info imi_softmax/_C*.so $(BUILT)
