# Edgeway developer commands. `make run` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
MEMBERS := libs/common libs/edge services/gateway services/ingestion services/occupancy \
	services/telemetry services/video-relay
export UV_PYTHON_DOWNLOADS := never
export UV_NO_PROGRESS := 1

.PHONY: setup run up test test-fast lint format bench constraints clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) constraints.txt pyproject.toml $(addsuffix /pyproject.toml,$(MEMBERS))
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -c constraints.txt \
		$(addprefix -e ,$(MEMBERS)) --group dev
	touch $@

setup: $(VENV)/.installed ## create .venv with every member and the dev tools

run: setup ## start the stack with live demo data on the embedded defaults
	@deploy/local/ensure-services.sh
	@$(PY) deploy/local/devstack.py

up: ## the compose stack (needs a Docker engine; this machine has none)
	docker compose -f deploy/compose/compose.yaml up --build

test: setup lint ## the whole suite, connected tests included (needs RabbitMQ and PostgreSQL)
	@deploy/local/ensure-services.sh --postgres
	@deploy/local/ensure-test-tools.sh
	$(PY) -m pytest

test-fast: setup ## unit tests only
	$(PY) -m pytest -m "not connected"

lint: setup ## ruff and mypy (strict)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(addsuffix /src,$(MEMBERS))

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup ## benchmarks: print tables, write JSON under bench/results/
	@deploy/local/ensure-services.sh --postgres
	$(PY) -m bench.broker_overhead
	$(PY) -m bench.telemetry_ingest
	$(PY) -m bench.occupancy_fanout
	$(PY) -m bench.video_fanout
	$(PY) -m bench.ingest_upload

constraints: $(UV) ## re-pin every dependency (writes constraints.txt, no index URLs)
	printf -- '-e %s\n' $(MEMBERS) | $(UV) pip compile - --group pyproject.toml:dev \
		--python-version 3.11 --no-header --no-annotate --no-emit-index-url \
		| grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) $(TOOLS) var
