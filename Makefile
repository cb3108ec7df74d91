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
# Python writes each module's bytecode (.pyc) when it first imports it; `make install` skips pip's compile step
# (--no-compile) to leave that to first use. An environment that sets PYTHONDONTWRITEBYTECODE would make every
# process compile torch, Prefect and MLflow from source again, so make does not pass it on.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo lint test system-deps ui repro constraints clean servers servers-stop

install: $(STAMP)

# Exact pins come from constraints.txt; pyproject.toml keeps loose ranges for library users. --no-compile: Python
# compiles a module when it is first imported (see PYTHONDONTWRITEBYTECODE above), so only what runs is compiled,
# not every installed file.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check --no-compile -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pruneflow run --params params.yaml

# ruff (lint and import order, all Python files) and mypy (pyproject.toml's [tool.mypy] files); CI runs it
# through `make test`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# More pytest workers than cores: much of the suite waits on servers and subprocesses, not the CPU;
# tests/conftest.py groups the tests that need a Prefect server and orders the long ones first.
PYTEST_WORKERS ?= 4
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# Debian's PostgreSQL and Chromium for the distributed-search and browser tests. Never fails make: where
# they cannot be installed (no root or sudo, no apt-get) those tests skip and say why.
system-deps:
	@bash scripts/install-system-deps.sh || echo "make: system packages missing; the tests that need them will skip"

ui: $(STAMP)
	$(BIN)/pruneflow ui

# A Prefect server (schedules need one) and an MLflow tracking server on a database, both on 127.0.0.1 only;
# pids, logs and Prefect's database in $(SERVERS_DIR)/. `make servers-stop` ends them.
# E.g. make servers PREFECT_PORT=4201 MLFLOW_PORT=5001 MLFLOW_BACKEND=<SQLAlchemy URL>
SERVERS_DIR      ?= .servers
PREFECT_PORT     ?= 4200
MLFLOW_PORT      ?= 5000
MLFLOW_BACKEND   ?= sqlite:///$(CURDIR)/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts

servers: $(STAMP)
	$(BIN)/python -m pruneflow.flows.servers start --dir '$(SERVERS_DIR)' --prefect-port $(PREFECT_PORT) \
		--mlflow-port $(MLFLOW_PORT) --mlflow-backend '$(MLFLOW_BACKEND)' --mlflow-artifacts '$(MLFLOW_ARTIFACTS)'

servers-stop:
	$(BIN)/python -m pruneflow.flows.servers stop --dir '$(SERVERS_DIR)'

# Re-freeze the pins after changing pyproject.toml's ranges.
constraints: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | sed '/^pruneflow/d' > constraints.txt.new
	{ head -2 constraints.txt; cat constraints.txt.new; } > constraints.txt && rm constraints.txt.new

clean:
	rm -rf runs mlartifacts mlflow.db .pytest_cache .mypy_cache .ruff_cache

# The pipeline through DVC instead of Prefect: version the data, then `dvc repro` (pruneflow on PATH).
repro: $(STAMP)
	$(BIN)/pruneflow stage data
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc metrics show
