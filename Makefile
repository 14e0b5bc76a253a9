# Tierline: every target sets up what it needs, so a fresh clone needs no other step.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# third-party clients whose pins cannot share .venv (litellm: huggingface-hub < 2)
CLIENTS := .venv-clients
MODELS ?= models
# pytest-xdist workers for `make test` (CI and the team's machines have 2 cores); each test module runs whole on one
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help setup proto models models-tiny test lint fuzz soak demo up down bench clients device-arm-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# the local CPU wheel first: any other torch spec would pull GBs of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'  # generates the gRPC code from proto/ (setup.py)
	touch $(STAMP)

setup: $(STAMP) proto ## create .venv, install pinned dependencies, generate the gRPC code

$(CLIENTS)/.installed:
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install -q litellm==1.105.7
	touch $@

clients: $(CLIENTS)/.installed ## a venv with litellm, which tests/test_up_readme.py runs against the router

proto: $(STAMP) ## regenerate the gRPC/protobuf code when proto/ changed (beside the .proto files, ignored)
	$(PY) proto/generate.py

models: setup ## build the default model family from scratch into models/ (CPU, <= 45 min)
	$(PY) -m tierline models build --config default --out $(MODELS)

models-tiny: setup ## build the tiny family (tests use it) into runs/tiny
	$(PY) -m tierline models build --config tiny --out runs/tiny

lint: setup ## ruff over the code, and the import layers (import-linter contracts in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

test: setup lint ## lint + the whole test suite (on TEST_WORKERS pytest-xdist workers, 2; 0: in one process)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

fuzz: setup ## the fuzz suite's long run (>= 10,000 cases against a running platform): counts in runs/fuzz.json
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py
	@cat runs/fuzz.json

demo: setup ## start nats-server, the tiers and the router, send a mixed workload, stop
	$(PY) -m tierline demo --models $(MODELS)

up: setup ## start the platform and leave it running (stop: Ctrl-C or make down)
	$(PY) -m tierline up --models $(MODELS) $(if $(MANIFEST),--manifest $(MANIFEST)) $(if $(REPLICAS),--replicas $(REPLICAS))

down: ## stop what make up started
	@if [ -f runs/up.pid ]; then kill -TERM $$(cat runs/up.pid) && echo stopped; else echo "nothing running"; fi

bench: setup ## the platform measured side by side (<= 20 min): writes BENCHMARKS.md, bench/results.json
	$(PY) -m tierline bench --models $(MODELS)

device-arm-check: setup ## the device agent installed and run on emulated aarch64 (root; slow: not in make test)
	$(PY) -m tierline_infra.device_arm_check

clean: ## remove the venv and caches
	rm -rf $(VENV) $(CLIENTS) .pytest_cache .ruff_cache runs
