# Single entry point. `make demo` and `make test` each create the virtualenv if needed, install
# what they need, build the extension and run. Override PYTHON to pick the interpreter.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deps-installed

.PHONY: demo test venv build check-cuda bench clean

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --quiet --no-build-isolation --no-deps -e .

check-cuda:
	bash scripts/check_cuda_kernels.sh

demo: build
	$(PY) examples/demo.py

test: build check-cuda
	$(PY) -m pytest tests -q

bench: build
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf build *.egg-info imi_softmax/_C*.so
