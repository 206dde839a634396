# The targets the README names. Each creates the virtualenv and installs what it needs,
# so both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit integration slow e2e bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: start the embedded local cluster (no Kubernetes needed) and show it working
run: $(STAMP)
	$(BIN)/engram-replication up --demo

## test: lint, type-check and run the test suite (slow and e2e tests excluded)
test: lint typecheck
	$(BIN)/pytest -m "not slow and not e2e" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -m e2e tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/engram-replication bench

bench-quick: $(STAMP)
	$(BIN)/engram-replication bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
