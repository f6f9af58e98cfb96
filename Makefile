# Doorstroom: set-up and processes (see shared contract, "Set-up and processes").
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=
LINT_PATHS := api workers domain cli

.PHONY: install services test run bench bench-quick lint fuzz

# Create .venv and install the locked dependencies (dev group included).
# uv is taken from PATH; failing that it is pip-installed and, when pip put it somewhere
# off PATH (--user, a pyenv shim not yet rehashed), called as `python3 -m uv`.
# `uv sync --frozen` is a no-op (well under a second) when the venv already matches uv.lock.
install:
	@if command -v uv >/dev/null 2>&1; then uv=uv; \
	else \
	  if ! $(PYTHON) -m uv --version >/dev/null 2>&1; then \
	    echo "uv not found: installing it with pip"; \
	    $(PYTHON) -m pip install --quiet uv \
	      || $(PYTHON) -m pip install --quiet --user uv \
	      || $(PYTHON) -m pip install --quiet --user --break-system-packages uv; \
	  fi; \
	  if command -v uv >/dev/null 2>&1; then uv=uv; else uv="$(PYTHON) -m uv"; fi; \
	fi; \
	$$uv sync --frozen

# Start PostgreSQL and Redis where they are installed but not answering (never stops them).
services:
	bash scripts/ensure-services.sh

# The whole suite against real PostgreSQL and Redis; .ci/run calls exactly this.
# The quick benchmark joins in once bench/run.py exists (skipped silently until then, so
# pytest's summary stays the last line of output).
test: install services
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
	@if [[ -f bench/run.py ]]; then $(MAKE) --no-print-directory bench-quick; fi

# Everything on the embedded defaults (SQLite + file broker): migrate, seed, API, worker,
# beat and the demo. Ctrl-C stops it all.
run: install
	$(VENV)/bin/doorstroom up

bench: install
	$(VENV)/bin/python -m bench.run

bench-quick: install
	$(VENV)/bin/python -m bench.run --quick

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy $(LINT_PATHS)

# Long property-based API fuzzing; not part of `make test`. Skipped until tests/fuzz exists.
fuzz: install services
	@if [[ -d tests/fuzz ]]; then \
	  SCHEMATHESIS_MAX_EXAMPLES=500 $(VENV)/bin/pytest tests/fuzz -q $(PYTEST_ARGS); \
	else echo "tests/fuzz does not exist yet: nothing to fuzz"; fi
