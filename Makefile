# pyvmm: `make demo` and `make test` on a fresh Debian-based machine, as root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# `make test` runs two pytest workers: each lab is one busy host core, and tests/conftest.py's lab slots keep
# the labs at one per core (a 2-CPU lab, or one that measures, waits for both).
JOBS ?= 2

.PHONY: deps venv lab-assets test unit lint demo shell fuzz soak bench clean

deps: .deps-stamp venv

.deps-stamp: scripts/install-deps.sh
	bash scripts/install-deps.sh
	touch $@

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

lab-assets: deps
	$(BIN)/pyvmm-lab build

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -m 'not lab' $(PYTEST_ARGS)

test: lab-assets lint
	$(BIN)/pytest -n $(JOBS) --dist worksteal --durations=40 $(PYTEST_ARGS)

# Longer fuzzing of the guest-facing device models (the suite runs a bounded budget of the same targets).
fuzz: venv
	PYVMM_FUZZ=long $(BIN)/pytest -q --durations=0 tests/unit/test_fuzz_*.py $(PYTEST_ARGS)

# 50 passthrough cycles (SD reader + NVMe) in one lab (the suite runs 3): no growth in fds, locked memory or vfio groups.
soak: lab-assets
	PYVMM_SOAK_CYCLES=50 $(BIN)/pytest -m lab -s tests/lab/test_soak.py $(PYTEST_ARGS)

# pyvmm against QEMU in one lab (bench/README.md): bench/results/<date>.json, .md and .png. PYVMM_BENCH_REPS
# sets the repetitions (default 5). matplotlib (the `bench` extra) is only needed here, for the chart.
bench: lab-assets
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/run.py

demo: lab-assets
	$(BIN)/python -m pyvmm.lab.demo

shell: lab-assets
	$(BIN)/pyvmm-lab shell

clean:
	rm -rf $(VENV) .deps-stamp .pytest_cache .ruff_cache
