# Set-up and entry points. Every target creates/reuses the virtual environment itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: venv demo test test-all clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The tests also need torch + transformers (tiny reference models for the Hugging Face import parity tests).
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,hf-test]'
	touch $(TEST_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlab demo --workdir runs/demo

# Two worker processes (pytest-xdist), one test file per worker at a time: module fixtures run once.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(TEST_STAMP)
	$(PYTEST) -m "not slow"

test-all: $(TEST_STAMP)
	$(PYTEST)

clean:
	rm -rf $(VENV) .pytest_cache
