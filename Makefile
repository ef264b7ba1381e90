# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck sample clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Set up, load the embedded sample into the default store and summarise it.
run: $(STAMP)
	$(BIN)/ontrack init
	$(BIN)/ontrack ingest data/sample/input
	$(BIN)/ontrack compute
	$(BIN)/ontrack report
	$(BIN)/ontrack flags | tail -n 12
	$(BIN)/ontrack summary
	$(BIN)/ontrack demo-users
	$(BIN)/ontrack serve --host 127.0.0.1 --port 8050

## Set up with the dev extras, lint, type-check and run the whole test suite.
test: $(STAMP)
	$(BIN)/ruff check pipeline dashboard tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -q

## Regenerate the committed sample (deterministic: same seed, same files).
sample: $(STAMP)
	$(BIN)/ontrack synth --sample --out data/sample

clean:
	rm -rf $(VENV) data/ontrack.db data/ontrack.db-wal data/ontrack.db-shm
