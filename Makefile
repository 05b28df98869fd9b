# The two commands: `make run` (pipeline + demo traffic on a local stack) and
# `make test` (lint, type-check and the whole suite on the same stack).
# Both install everything they need first; both are safe to repeat.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PYTHON := $(abspath $(BIN)/python)

.PHONY: setup stack topics run test lint unit integration bench bench-long chaos down wipe helm

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
	@$(BIN)/hadolint Dockerfile

# The helm binary the chart's tests render with (tests/unit/test_chart.py), built once
# into .stack/bin/ by deploy/helm/install-helm.sh.
helm: setup
	@bash deploy/helm/install-helm.sh

# The tests also start the stack's extras (deploy/local/env.sh): a SASL_SSL broker and
# eu-west's own cluster with MirrorMaker 2; `make run` leaves them off.
test integration: export CACHESYNC_STACK_EXTRAS ?= secure two-clusters

# The benchmark smoke run goes first so that pytest's summary is the run's last line.
test: lint stack helm

	@$(BIN)/python -m bench --smoke
	@$(BIN)/pytest -q $${PYTEST_ARGS:-}

# Throughput, latency and memory against ceilings measured in the same run (bench/).
bench: stack
	@$(BIN)/python -m bench

# The long mode, in neither `make test` nor `make bench`: 1,000,000 purges through the mapper
# and the 3 Redis sinks, judged by the consistency checker's read-backs; the share converged
# within 1 s, in nines per region (bench/consistency_at_scale.py). LONG_ARGS="--purges 30000"
# for a quick check; results in bench/results/consistency_at_scale.{json,md}.
bench-long: stack
	@$(BIN)/python -m bench.consistency_at_scale $${LONG_ARGS:-}

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
