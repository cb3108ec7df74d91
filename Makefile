# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: install demo test ui repro constraints clean

install: $(STAMP)

# Exact pins come from constraints.txt; pyproject.toml keeps loose ranges for library users.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pruneflow run --params params.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

ui: $(STAMP)
	$(BIN)/pruneflow ui

# Re-freeze the pins after changing pyproject.toml's ranges.
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | sed '/^pruneflow/d' > constraints.txt.new
	{ head -2 constraints.txt; cat constraints.txt.new; } > constraints.txt && rm constraints.txt.new

clean:
	rm -rf runs mlartifacts mlflow.db .pytest_cache

# The pipeline through DVC instead of Prefect: version the data, then `dvc repro` (pruneflow on PATH).
repro: $(STAMP)
	$(BIN)/pruneflow stage data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc metrics show
