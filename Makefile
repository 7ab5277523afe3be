# Developer entry points. `make` or `make help` lists them.
# Add a target with a `## description` comment and it shows up in help.

SHELL := /bin/bash
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
export PYTHON
# Every `python -m` here runs with -P: the repo root holds a folder named `operator/`
# (posttrain.operator), which must never shadow the standard library's `operator`.

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# ---- Python: set-up, lint, tests (README's quickstart; .ci/run calls these) ----

VENV ?= .venv

.PHONY: setup
setup: ## create .venv and install posttrain with every extra (editable)
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[trainer,operator,gcs,dev]'

.PHONY: lint
lint: ## ruff (lint + format check) and mypy over the whole posttrain namespace
	$(PYTHON) -P -m ruff check .
	$(PYTHON) -P -m ruff format --check .
	hack/typecheck.sh

.PHONY: test
test: lint ## lint, then the whole test suite (brings the local cluster up for the cluster tests)
	$(PYTHON) -P -m pytest --durations=20  # the slowest, for the suite's time budget

# ---- local Kubernetes (hack/, docs/development.md) ----

.PHONY: tools
tools: ## build the pinned etcd, kube-*, jobset, kueue, kwok and helm binaries (cached in ~/.cache/posttrain)
	hack/tools.sh build

.PHONY: libtpu
libtpu: ## libtpu (the TPU compiler) in ~/.cache/posttrain, for the test of plan's libtpu path
	PYTHON=$(VENV)/bin/python hack/libtpu.sh

.PHONY: tool-versions
tool-versions: ## print the --version of every built binary
	hack/tools.sh versions

.PHONY: cluster-up
cluster-up: ## start the local control plane; KUBECONFIG=.cluster/kubeconfig
	hack/cluster.sh up

.PHONY: cluster-down
cluster-down: ## stop the local control plane and remove its state
	hack/cluster.sh down

.PHONY: cluster-status
cluster-status: ## show whether each local control-plane process is running
	hack/cluster.sh status

.PHONY: test-cluster
test-cluster: ## run the tests that need the local cluster (starts one if none is up)
	$(PYTHON) -P -m pytest -m cluster tests/cluster

# ---- install: chart and images (docs/install.md) ----

.PHONY: crds
crds: ## regenerate the CRD from the API model, and the Helm chart's copy of it
	@# -P: keep the repository root off sys.path, where operator/ would shadow the stdlib module
	$(PYTHON) -P -m posttrain.cli crd > crds/posttrain.dev_posttrainjobs.yaml
	cp crds/posttrain.dev_posttrainjobs.yaml charts/posttrain/crds/
