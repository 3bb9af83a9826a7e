# make test: create .venv if missing, install torch 2.13.0 (the CPU wheel on disk) first, then the project with dev extras,
# then ruff and pytest. make demo: the whole experiment offline on the built-in default.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Another CPU, emulated: ATen without SIMD kernels, MKL limited to SSE4.2 in its compatible mode, one thread. Each of
# these changes the rounding of fp32 sums (tests/test_markers.py shows it), as a newcomer's CPU would.
OTHER_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1

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
	env $(OTHER_CPU) $(BIN)/python -m pytest -q -m cross_machine

test-full: lint
	$(BIN)/python -m pytest -q -m ""

demo: install
	$(BIN)/python -m cli.demo

clean:
	rm -rf $(VENV) runs .cache
