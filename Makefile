# Switchboard — every target installs what it needs, so any one works on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# the Node.js client (tests/integration/test_node_client.py runs it)
NODE_CLIENT := clients/node
NODE_STAMP  := $(NODE_CLIENT)/node_modules/.installed

.PHONY: install gen check-gen lint test test-unit test-integration demo up down status bench redis-server

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# the CPU build of torch first: an unpinned torch pulls several GB of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

install: $(STAMP)

$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	npm ci --prefix $(NODE_CLIENT) --ignore-scripts --no-audit --no-fund
	@touch $@

gen: $(STAMP)
	scripts/gen.sh

# fails when gen/ differs from what proto/ generates
check-gen: gen
	@if [ -n "$$(git status --porcelain -- gen)" ]; then \
	  git status --porcelain -- gen; echo "gen/ is out of date with proto/: run 'make gen' and commit"; exit 1; fi

lint: $(STAMP)
	scripts/lint-proto.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) $(NODE_STAMP) check-gen lint
	$(BIN)/pytest $(PYTEST_ARGS) tests

test-unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS) tests/unit

test-integration: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS) tests/integration

demo: $(STAMP)
	$(BIN)/python -m services.demo

up: $(STAMP)
	$(BIN)/switchboard up

down: $(STAMP)
	$(BIN)/switchboard down

status: $(STAMP)
	$(BIN)/switchboard status

bench: $(STAMP) redis-server
	$(BIN)/python -m bench

bench-%: $(STAMP) redis-server
	$(BIN)/python -m bench $*

# the Celery side of bench-tasks-throughput needs a Redis server (Debian's package)
redis-server:
	@command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null \
	  || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null)
