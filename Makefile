# The targets the README names. Each creates the virtualenv and installs what it needs,
# so both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint typecheck unit integration slow e2e bench bench-quick clean chaos k8s-tools test-k8s

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: start the embedded local cluster (no Kubernetes needed) and show it working
run: $(STAMP)
	$(BIN)/engram-replication up --demo

## test: lint, type-check and run the test suite (slow, e2e and k8s tests excluded)
test: lint typecheck
	$(BIN)/pytest -m "not slow and not e2e and not k8s" $(PYTEST_ARGS)

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

## k8s-tools: build helm, etcd, kube-apiserver, kube-controller-manager and kubectl from the Go
## module pinned in tools/k8s (Go >= 1.26), once per version, into a cache outside the clone
## (${ENGRAM_K8S_TOOLS:-~/.cache/engram-replication/k8s-tools}); niced, GOMAXPROCS <= 2
k8s-tools: $(STAMP)
	$(BIN)/python -m tests.k8s.tools build

## test-k8s: the real-API-server tier (tests/k8s, docs/testing.md), tools built first if needed
test-k8s: k8s-tools
	$(BIN)/pytest -m k8s tests/k8s $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/engram-replication bench

## chaos: the history checker on real processes: >= 1,000 seeded faults (~25 min), then it
## rewrites the tables of docs/reliability.md. `make chaos SEED=n` replays one run (with
## NODES=3|5, FAULTS=n, MODEL=single|multi as the failure report prints them).
SEED   ?=
NODES  ?=
FAULTS ?=
MODEL  ?=
chaos: $(STAMP)
	$(BIN)/pytest tests/chaos -m chaos --chaos -s \
		$(if $(SEED),--chaos-seed=$(SEED)) $(if $(NODES),--chaos-nodes=$(NODES)) \
		$(if $(FAULTS),--chaos-faults=$(FAULTS)) $(if $(MODEL),--chaos-model=$(MODEL)) \
		$(PYTEST_ARGS)

bench-quick: $(STAMP)
	$(BIN)/engram-replication bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
