# naqs — developer and user entry points. Everything installs itself into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_FLAGS ?=
# Test processes (pytest-xdist); a test file runs whole in one process (module fixtures once).
TEST_WORKERS ?= 2

.PHONY: install test validate lint format run bench bench-netket race race-tune gpu-check clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv, install pinned CPU torch then naqs[dev,cluster] (editable)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev,cluster]"
	@touch $(STAMP)

test: install  ## default suite (excludes slow physics checks), TEST_WORKERS processes
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_FLAGS)

validate: install  ## slow physics checks (VMC convergence against exact answers)
	$(PY) -m pytest -m slow --durations=15 $(PYTEST_FLAGS)

lint: install  ## ruff check + format check
	$(VENV)/bin/ruff check naqs_cli tests benchmarks
	$(VENV)/bin/ruff format --check naqs_cli tests benchmarks

format: install  ## ruff format + autofix
	$(VENV)/bin/ruff check --fix naqs_cli tests benchmarks
	$(VENV)/bin/ruff format naqs_cli tests benchmarks

run: install  ## the default small TFIM training run (about a minute on 2 cores)
	$(VENV)/bin/naqs train

bench: install  ## performance benchmarks -> benchmarks/results/*.json, *.md
	$(PY) benchmarks/run_all.py

# NetKet lives in its own venv, never in .venv; NETKET_FLAGS=--quick for a smoke run.
NETKET_VENV  := benchmarks/netket_venv
NETKET_STAMP := $(NETKET_VENV)/.installed
NETKET_FLAGS ?=

bench-netket: install $(NETKET_STAMP)  ## naqs vs NetKet side by side -> benchmarks/results/netket.*
	$(PY) benchmarks/netket_compare.py $(NETKET_FLAGS)

# RACE_FLAGS e.g. --cases tfim4x4,heis4x4 --seeds 0 (see benchmarks/race.py --help).
RACE_FLAGS ?=
race: install $(NETKET_STAMP)  ## accuracy at equal wall time vs NetKet -> benchmarks/results/race.*
	$(PY) benchmarks/race.py $(RACE_FLAGS)

race-tune: install $(NETKET_STAMP)  ## tune every race contender (other seeds) -> results/race_tuned.json
	$(PY) benchmarks/race.py --tune $(RACE_FLAGS)

$(NETKET_STAMP): benchmarks/requirements-netket.txt
	@test -x $(NETKET_VENV)/bin/python || $(PYTHON) -m venv $(NETKET_VENV)
	$(NETKET_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-r benchmarks/requirements-netket.txt
	@touch $(NETKET_STAMP)

gpu-check: install  ## on a CUDA machine: GPU tests, throughput, 10x10 training (< 8 min) -> results/gpu.md
	benchmarks/gpu_check.sh

clean:  ## remove the venv, caches and run outputs
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find outputs -mindepth 1 ! -name .gitignore ! -name README.md -prune -exec rm -rf {} +
