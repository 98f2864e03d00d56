# metastem — two entry points: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.metastem-installed
CORES ?= $(shell nproc)
# Numba (pynndescent, umap) compiles for tens of seconds in every fresh process; cache it once.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export MPLCONFIGDIR ?= $(CURDIR)/.cache/matplotlib

.PHONY: run test test-fast env lint lock bench clean help docs

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; metastem needs Python 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml $(SNAKEMAKE_ARGS)
	@echo "Reports: the index page named by the 'metastem: open ...' line above (<outdir>/index.html)"

# Two pytest-xdist workers (whole modules per worker, see tests/conftest.py); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The development loop: unit tests only, no Snakemake end-to-end runs, no SLURM, no browser (markers in
# pyproject.toml). `make test` stays the whole suite (what CI runs).
FAST_MARKERS := not slow and not slurm and not browser
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

help:
	@echo "make run        the pipeline on config/config.yaml (CORES=$(CORES), SNAKEMAKE_ARGS=...)"
	@echo "make test       the whole test suite (PYTEST_ARGS=...)"
	@echo "make test-fast  unit tests only: no Snakemake end-to-end runs, no SLURM, no browser (-m \"$(FAST_MARKERS)\")"
	@echo "make lint       snakemake --lint and snakefmt --check"
	@echo "make bench      pipeline vs plain scanpy scaling benchmark (BENCH_ARGS=..., see benchmarks/README.md)"
	@echo "make lock       regenerate requirements.lock from .venv"
	@echo "make clean      remove results/ and .snakemake/"

lint: $(STAMP)
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/snakefmt --check Snakefile workflow/rules

docs: $(STAMP)
	$(BIN)/python -m metastem.smk.schema_docs workflow/schemas > config/README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lock: $(STAMP)
	{ echo "# Full pinned environment (pip freeze of a working .venv on Python 3.11). Regenerate: make lock"; \
	  $(BIN)/python -m pip freeze --all --exclude-editable --exclude pip --exclude setuptools | sort -f; } > requirements.lock

clean:
	rm -rf results .snakemake
