# armguard: the two commands a new machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help venv demo test unit lint format broker-start broker-stop bench clean

help:
	@echo "make demo    a local Kafka, the daemon and a simulated regression until the kill switch fires"
	@echo "make test    create the virtualenv, start a real local Kafka, run all tests, stop Kafka"
	@echo "make unit    unit tests and doctests only (no broker)"
	@echo "make lint    ruff check and format check"
	@echo "make bench   benchmarks under bench/ (starts the local broker)"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	scripts/demo

test: venv
	scripts/run-tests

unit: venv
	$(PY) -m pytest -p no:cacheprovider tests/unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	scripts/run-bench

broker-start: venv
	scripts/kafka-local start

broker-stop:
	scripts/kafka-local stop

clean:
	scripts/kafka-local stop || true
	rm -rf $(VENV) run .pytest_cache .ruff_cache .hypothesis
