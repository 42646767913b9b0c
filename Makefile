# The two commands: `make run` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the test suite drives for real (headless browser for /docs and /redoc, Prometheus).
SYSTEM_TOOLS := chromium:chromium prometheus:prometheus promtool:prometheus

.PHONY: setup run test lint typecheck pytest bench system-deps clean

setup: $(STAMP) node_modules/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# ReDoc's standalone bundle comes from the npm registry (package-lock.json pins it).
node_modules/.installed: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && touch $@; \
	else \
		echo "npm not found: /redoc will answer 503 until 'npm ci' has run" >&2; \
	fi

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Dev mode and a 10 s poll, so the built-in simulated fleet shows history within a minute; a short
# canary warm-up and validation delay, so a workflow on it ends in minutes (README: Your first workflow).
run: setup
	PERFAGENT_POLLING_INTERVAL=$${PERFAGENT_POLLING_INTERVAL:-10} \
	PERFAGENT_CANARY_WARMUP=$${PERFAGENT_CANARY_WARMUP:-45} \
	PERFAGENT_CANARY_WINDOW=$${PERFAGENT_CANARY_WINDOW:-120} \
	PERFAGENT_WORKFLOW_VALIDATION_DELAY=$${PERFAGENT_WORKFLOW_VALIDATION_DELAY:-30} \
	$(BIN)/perfagent serve --dev

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup system-deps
	$(BIN)/pytest

test: lint typecheck pytest

bench: setup
	$(BIN)/python benchmarks/parse.py
	$(BIN)/python benchmarks/detect.py

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis
