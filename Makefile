# Switchboard — every target installs what it needs, so any one works on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# the Node.js client (tests/integration/test_node_client.py runs it)
NODE_CLIENT := clients/node
NODE_STAMP  := $(NODE_CLIENT)/node_modules/.installed
# the chat page Envoy serves on the public port (tests/integration/test_browser_chat.py)
WEB         := clients/web
WEB_STAMP   := $(WEB)/node_modules/.installed

.PHONY: install gen check-gen deploy-check lint test test-unit test-integration demo up down status bench fuzz soak redis-server web chromium litellm prometheus

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

$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json
	npm ci --prefix $(WEB) --ignore-scripts --no-audit --no-fund
	@touch $@

# TypeScript from proto/ (protoc-gen-es), type-checked, bundled by esbuild into $(WEB)/dist/
web: $(STAMP) $(WEB_STAMP)
	npm run --silent --prefix $(WEB) build

gen: $(STAMP)
	scripts/gen.sh

# fails when gen/ differs from what proto/ generates
check-gen: gen
	@if [ -n "$$(git status --porcelain -- gen)" ]; then \
	  git status --porcelain -- gen; echo "gen/ is out of date with proto/: run 'make gen' and commit"; exit 1; fi

# the Kubernetes chart: its generated files (Envoy's config from the launcher's renderer)
# up to date, rendered offline and validated (schemas, policies, bad values)
deploy-check: $(STAMP)
	$(BIN)/python -m services.launcher.kubernetes check
	$(BIN)/pytest -q $(PYTEST_ARGS) tests/unit/test_deploy_chart.py tests/unit/test_deploy_envoy.py tests/unit/test_deploy_images.py

lint: $(STAMP)
	scripts/lint-proto.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) $(NODE_STAMP) web chromium prometheus check-gen lint
	$(BIN)/pytest $(PYTEST_ARGS) tests

test-unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS) tests/unit

test-integration: $(STAMP) $(NODE_STAMP) web chromium prometheus
	$(BIN)/pytest $(PYTEST_ARGS) tests/integration

demo: $(STAMP) web
	$(BIN)/python -m services.demo

up: $(STAMP) web
	$(BIN)/switchboard up

down: $(STAMP)
	$(BIN)/switchboard down

status: $(STAMP)
	$(BIN)/switchboard status

bench: $(STAMP) redis-server
	$(BIN)/python -m bench

bench-%: $(STAMP) redis-server
	$(BIN)/python -m bench $*

# 30 minutes of mixed load with a service process killed every 3 minutes, every process's
# memory, descriptors and event-loop tasks sampled (SWITCHBOARD_SOAK_S and
# SWITCHBOARD_SOAK_KILL_EVERY_S shorten it): bench/results/soak.json and soak.png
soak bench-soak: $(STAMP)
	$(BIN)/python -m bench.soak

# every public RPC fuzzed through Envoy, FUZZ_CASES per RPC (default 2,000): `make test`
# runs a bounded share of it (tests/integration/test_fuzz.py). Writes
# bench/results/fuzz.json, its case and INTERNAL/UNKNOWN counts also into faults.json
fuzz: bench-fuzz

# bench-http compares the gateway with LiteLLM's proxy, installed into a venv of its own:
# its proxy extras pin packages (openai among them) that the project's venv holds at
# other versions. Pinned: a later release (1.107.0) was a compromised upload. Without
# it the benchmark records no comparison and says why.
LITELLM_VERSION := 1.106.12
LITELLM_VENV    := .tools/litellm
LITELLM_STAMP   := $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)

bench bench-http: litellm

litellm:
	@test -f $(LITELLM_STAMP) || { rm -rf $(LITELLM_VENV) && $(PYTHON) -m venv $(LITELLM_VENV) \
	  && $(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)' \
	  && touch $(LITELLM_STAMP); } || echo "litellm: not installed; bench-http compares with nothing"

# the Celery side of bench-tasks-throughput needs a Redis server (Debian's package)
redis-server:
	@command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null \
	  || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null)

# the browser test drives Debian's Chromium through its chromedriver (selenium)
chromium:
	@(command -v chromium && command -v chromedriver) >/dev/null \
	  || apt-get install -y -q chromium chromium-driver >/dev/null \
	  || (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)

# `switchboard up --prometheus` and the SLO rules' tests run Debian's prometheus binaries
# (never its service: see the script)
prometheus:
	@scripts/install-prometheus.sh
