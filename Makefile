# pha_lab: every target runs inside .venv, created from requirements.lock on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NAME ?= smoke
EXP ?= tiny_pha
ARGS ?=
RUNS_DIR ?= runs
TRACKING_URI ?= sqlite:///$(abspath $(RUNS_DIR))/mlflow.db

# On a machine that brings its own torch/CUDA stack (e.g. a GPU image), skip the venv:
#   make sweep NAME=repro_baselines SYSTEM_PYTHON=python3
ifdef SYSTEM_PYTHON
PY := $(SYSTEM_PYTHON)
PHA := $(SYSTEM_PYTHON) -m pha_lab.cli
STAMP :=
else
PHA := $(VENV)/bin/pha-lab
endif

.PHONY: help setup lint format test test-slow test-cluster sweep train bench tables tables-results ui clean
.DEFAULT_GOAL := help

help:  ## this list (every target with its one-line description)
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-zA-Z][a-zA-Z_-]*:.*## / {printf "  make %-15s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP)  ## create .venv from requirements.lock (every other target does it on first use)

ifndef SYSTEM_PYTHON
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)
endif

lint: $(STAMP)  ## ruff check + ruff format --check over the whole tree (config: pyproject.toml [tool.ruff])
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)  ## apply ruff's safe fixes and its formatting to the whole tree, then list what needs a hand
	$(PY) -m ruff check --fix --silent --exit-zero .
	$(PY) -m ruff format .
	$(PY) -m ruff check .

test: $(STAMP)  ## fast tests (< 10 min on 2 CPU cores)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)  ## the heavier tests marked `slow` (not the cluster ones)
	$(PY) -m pytest -q -m "slow and not cluster" $(ARGS)

test-cluster: $(STAMP)  ## real PostgreSQL + MLflow server + one-node SLURM (as root: installs the Debian packages)
	$(PY) -m pytest -q -m cluster tests/cluster $(ARGS)

sweep: $(STAMP)  ## make sweep NAME=smoke|ablation|baselines|hpo|mqar|scale ...
	$(PHA) sweep $(NAME) $(ARGS)

train: $(STAMP)  ## make train EXP=pha_125m ARGS="trainer.max_steps=100"
	$(PHA) train $(EXP) $(ARGS)

bench: $(STAMP)  ## make bench ARGS="efficiency --plan": throughput and memory vs context (bench/*.yaml)
	$(PHA) bench $(ARGS)

tables: $(STAMP)  ## execute the analysis notebooks into analysis/out (ARGS="--tracking-uri ...")
	$(PHA) tables $(ARGS)

tables-results: $(STAMP)  ## regenerate analysis/out from the committed results/ (no GPU needed)
	$(PHA) tables --tracking-uri sqlite:///$(abspath results)/mlflow.db --efficiency-csv docs/benchmarks/efficiency.csv $(ARGS)

ui: $(STAMP)  ## browse runs at http://127.0.0.1:5000 (switch the sidebar to "Model training" for the runs tables)
	mkdir -p $(RUNS_DIR)
	@echo 'MLflow 3.17 opens experiments in its GenAI view: click "Model training" in the sidebar once (the browser remembers it),'
	@echo 'or open http://127.0.0.1:5000/#/experiments/ID?workflowType=machine_learning'
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port 5000

clean:  ## remove the venv, caches and local runs (asks nothing: runs/ holds your MLflow database)
	rm -rf $(VENV) .pytest_cache .cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
