# Two commands on a fresh machine:
#   make run   - set up .venv and run the embedded stack with demo traffic (streamapp dev --demo)
#   make test  - set up .venv (+ Debian test packages) and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[embedded,test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/streamapp dev --demo

test: $(STAMP)
	./scripts/system-deps.sh
	$(BIN)/ruff format --check streamapp tests benchmarks
	$(BIN)/ruff check streamapp tests benchmarks
	$(BIN)/python -m pytest -q

# The fast tests only (no broker, S3 server, worker process or browser): seconds, not minutes.
unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff format streamapp tests benchmarks
	$(BIN)/ruff check --fix streamapp tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sink.py

clean:
	rm -rf $(VENV) data test-artifacts
