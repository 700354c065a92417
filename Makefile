# The README's commands. `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# CPU machines have no GPU: run the Triton kernels in the interpreter there.
TRITON_INTERPRET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 0 || echo 1)
NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: run test test-latest bench gpu-check clean

run: $(VENV)/.installed
	$(VENV)/bin/kalm-fast demo

test: $(VENV)/.installed-dev
	TRITON_INTERPRET=$(TRITON_INTERPRET) $(PY) -m pytest -q tests

# The newest transformers, sentence-transformers, triton and numpy that pyproject's ranges allow (constraints.txt pins
# the rest: torch's CPU build, mteb), in their own venv, on the tests of the code that meets them: the models and
# training on those libraries, and every Triton kernel in the interpreter and compiled ahead of time for sm_80/sm_90
# without spills. The next release of any shows up here as a red test. Not part of `make test` (about 10 minutes).
# PINS tests given versions instead: "transformers==5.17.0 sentence-transformers==6.0.1 triton==3.6.0 numpy==2.3.5"
# (the H200 machine's), "triton==3.7.1" (what torch 2.13's CUDA build pins), "triton==3.8.0" (torch 2.14's).
PINS ?=
LATEST := .venv-latest
LATEST_PIP := $(LATEST)/bin/python -m pip --disable-pip-version-check -q
LATEST_TESTS := tests/test_models.py tests/test_decoder_packed.py tests/test_train_gradcache.py tests/test_sentence_transformers.py \
	tests/test_mteb.py tests/test_mining.py tests/test_teacher_scores.py tests/test_pipeline.py tests/test_decoder_kernels.py \
	tests/test_mean_pool.py tests/test_focal_infonce.py \
	tests/test_attention.py tests/test_kernel_build.py

test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	grep -v -E '^(transformers|sentence-transformers|triton|numpy)==' constraints.txt > $(LATEST)/constraints.txt
	for pin in $(PINS); do echo "$$pin" >> $(LATEST)/constraints.txt; done
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST_PIP) install -c $(LATEST)/constraints.txt torch
	$(LATEST)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(LATEST)/requirements.txt
	$(LATEST_PIP) install -U -c $(LATEST)/constraints.txt -r $(LATEST)/requirements.txt
	$(LATEST)/bin/python -c "import transformers, sentence_transformers as st, triton, numpy; \
		print('test-latest: transformers', transformers.__version__, 'sentence-transformers', st.__version__, \
		'triton', triton.__version__, 'numpy', numpy.__version__)"
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=$(TRITON_INTERPRET) $(LATEST)/bin/python -m pytest -q $(LATEST_TESTS)

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
	rm -rf build *.egg-info kalm_fast/*.so $(VENV) $(LATEST)
