# The README's commands. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# CPU machines have no GPU: run the Triton kernels in the interpreter there.
TRITON_INTERPRET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 1)
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: run test bench gpu-check clean

run: $(VENV)/.installed
	$(VENV)/bin/kalm-fast demo

test: $(VENV)/.installed-dev
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(PY) -m pytest -q tests

bench: $(VENV)/.installed-dev
	$(PY) -m benchmarks.run_all

# On a GPU machine whose packages are already installed (the H200 test machine): no venv, the system interpreter.
# Results in $$OUT (default build/gpu-check): summary.md, summary.json, gpu-check.tar.gz. See .ci/gpu_check.py.
gpu-check:
	$(PYTHON) .ci/gpu_check.py

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build lies on the machine's disk (a bare `torch` would pull a CUDA build).
$(VENV)/.installed: $(VENV)/bin/python $(NATIVE_SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -c constraints.txt torch
	$(PIP) install -c constraints.txt -e .
	$(PY) -c "import kalm_fast._native as n; print('kalm_fast native build:', n.build_info())"
	touch $@

# The [dev] extras without rebuilding the native module.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))" > $(VENV)/dev-requirements.txt
	$(PIP) install -c constraints.txt -r $(VENV)/dev-requirements.txt
	touch $@

clean:
	rm -rf build *.egg-info kalm_fast/*.so $(VENV)
