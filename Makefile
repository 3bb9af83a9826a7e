# make test: create .venv if missing, install torch 2.13.0 (the CPU wheel on disk) first, then the project with dev extras,
# then ruff and pytest. make demo: the whole experiment offline on the built-in default.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-full lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

test-full: lint
	$(BIN)/python -m pytest -q -m ""

demo: install
	$(BIN)/python -m cli.demo

clean:
	rm -rf $(VENV) runs .cache
