# The two commands: `make run` (pipeline + demo traffic on a local stack) and
# `make test` (lint, type-check and the whole suite on the same stack).
# Both install everything they need first; both are safe to repeat.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PYTHON := $(abspath $(BIN)/python)

.PHONY: setup stack topics run test lint unit integration bench chaos down wipe

setup:
	@bash deploy/local/install.sh

stack: setup
	@bash deploy/local/up.sh

topics: stack
	@$(BIN)/cachesync topology apply

# The CDN stand-ins (deploy/local/up.d/cdn.sh) write where they listen to .stack/cdn.env.
run: topics
	@set -a; if [ -f .stack/cdn.env ]; then . ./.stack/cdn.env; fi; set +a; \
	$(BIN)/cachesync run all --demo --rate $${RATE:-20}

lint: setup
	@$(BIN)/ruff check consumers schemas topology tests bench deploy
	@$(BIN)/ruff format --check consumers schemas topology tests bench deploy
	@$(BIN)/mypy

# The benchmark smoke run goes first so that pytest's summary is the run's last line.
test: lint stack
	@$(BIN)/python -m bench --smoke
	@$(BIN)/pytest -q $${PYTEST_ARGS:-}

# Throughput, latency and memory against ceilings measured in the same run (bench/).
bench: stack
	@$(BIN)/python -m bench

# One fault at a time through the real pipeline, checked in the caches (bench/chaos/), on a
# stack of its own (.stack-chaos/, ports +1000): the shared stack is never touched.
# CHAOS_ARGS=--quick for a shorter run.
chaos: setup
	@$(BIN)/python -m bench.chaos $${CHAOS_ARGS:-}

unit: setup
	@$(BIN)/pytest -q tests/unit

integration: stack
	@$(BIN)/pytest -q tests/integrations/caching

down:
	@bash deploy/local/down.sh

wipe:
	@bash deploy/local/down.sh --wipe
