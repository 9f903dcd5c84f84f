# Everything a fresh machine needs comes from here: Python 3.11+ is the only assumption.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint bench e2e clean venv

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[fast]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.run-installed

venv: $(VENV)/.run-installed

## make run: start the broker on the embedded default config (file backend over ./secrets, ./broker.sock)
run: $(VENV)/.run-installed
	cd examples && exec ../$(BIN)/broker serve

## make test: every test (unit, integration against real servers, deploy checks, Airflow end to end)
test: $(VENV)/.test-installed
	@set +e; $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi; exit $$rc

## make lint: ruff and mypy, as CI would
lint: $(VENV)/.test-installed
	$(BIN)/ruff check broker tests benchmarks
	$(BIN)/ruff format --check broker tests benchmarks
	$(BIN)/mypy

## make bench: benchmarks/ (prints Markdown tables, writes JSON under benchmarks/results)
bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
