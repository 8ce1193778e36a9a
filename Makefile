# meshgate: `make run` sets up and starts a local fleet + gateway; `make test` runs the suite.
PYTHON ?= python3
# The gateway's own venv (.venv) runs on the system's CPython when it is 3.11+ with venv
# support: distro builds (Debian's, like the official Docker images') are compiled with
# PGO and LTO into a static binary; a default source build (pyenv's: no PGO, a shared
# libpython) cost ~15% more gateway CPU per request here (bench/README.md). The Triton
# and LiteLLM venvs keep $(PYTHON).
SYSTEM_PYTHON := $(shell /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3)
GATEWAY_PYTHON ?= $(or $(SYSTEM_PYTHON),$(PYTHON))
VENV := .venv
TRITON_VENV := .venv-triton
LITELLM_VENV := .venv-litellm
BIN := $(VENV)/bin
PORT ?= 8080
TRITON_PORT_BASE ?= 18000
TRITON_COUNT ?= 2

.PHONY: run test unit e2e bench bench-suite build lint venv triton-venv litellm-venv clean

venv: $(VENV)/.installed
triton-venv: $(TRITON_VENV)/.installed
litellm-venv: $(LITELLM_VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(GATEWAY_PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The Triton python-backend stub runs models with this venv's packages: numpy<2 is
# required by Triton 2.51's python backend (see ARCHITECTURE.md, "Running Triton here").
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q 'nvidia-pytriton==0.7.0' 'numpy<2'
	touch $@

# LiteLLM's proxy, a peer of `make bench`, in its own venv: its pins would fight ours.
$(LITELLM_VENV)/.installed:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==1.106.2'
	touch $@

# The bench extra (matplotlib, tqdm) on top of the test install.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

# Compiled fastpath in place (the editable install imports it from the source tree).
build: venv
	$(BIN)/python setup.py -q build_ext --inplace

run: build triton-venv
	$(BIN)/meshgate up --triton-count $(TRITON_COUNT) --triton-port-base $(TRITON_PORT_BASE) \
		--port $(PORT) --model-repository model_repository

test: build triton-venv
	$(BIN)/python -m pytest tests -q

unit: build
	$(BIN)/python -m pytest tests/unit -q

e2e: build triton-venv
	$(BIN)/python -m pytest tests/e2e -q

# Every published number in one run (bench/publish.py): JSON + PNGs in bench/results/,
# the targets printed at the end. LiteLLM is a peer: if its venv cannot be installed the
# run goes on and says so.
bench: build triton-venv $(VENV)/.bench-installed
	-$(MAKE) litellm-venv
	$(BIN)/python -m bench.publish

# The pytest-benchmark suite (bench/test_bench_*.py); its JSON lands in bench/results/.
bench-suite: build triton-venv
	mkdir -p bench/results
	$(BIN)/python -m pytest bench -q --benchmark-only \
		--benchmark-json=bench/results/benchmarks-$$(date +%Y%m%d-%H%M%S).json

lint: venv
	$(BIN)/ruff check gateway fastpath adapters tests bench
	$(BIN)/mypy

clean:
	rm -rf build fastpath/*.so fastpath/*.c fastpath/_*_c.py *.egg-info
