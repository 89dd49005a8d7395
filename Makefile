# Fresh machine: `make run` starts the demo, `make test` runs the suite. Both set up .venv first.
# `run` installs the runtime only; `test` and `lint` add the test and lint extras, `bench` its own.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP   := $(VENV)/.run-stamp
TEST_STAMP  := $(VENV)/.test-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The C source too: an editable install builds the compiled core once, in place.
FASTPATH := src/portway/stream/_fastpath.c

$(RUN_STAMP): pyproject.toml $(FASTPATH) | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(FASTPATH) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	touch $@

$(BENCH_STAMP): pyproject.toml $(FASTPATH) | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/portway demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy --strict src

bench: $(BENCH_STAMP)
	bench/setup.sh
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache src/portway/stream/*.so
