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

.PHONY: run test env lint lock bench clean docs

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

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/snakefmt --check Snakefile workflow/rules

docs: $(STAMP)
	$(BIN)/python -m metastem.schema_docs workflow/schemas > config/README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lock: $(STAMP)
	{ echo "# Full pinned environment (pip freeze of a working .venv on Python 3.11). Regenerate: make lock"; \
	  $(BIN)/python -m pip freeze --all --exclude-editable --exclude pip --exclude setuptools | sort -f; } > requirements.lock

clean:
	rm -rf results .snakemake
