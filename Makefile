# Timebox: `make run` starts everything on this machine, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install broker run test test-cluster lint bench bench-quick clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

BENCH_STAMP := $(VENV)/.bench-installed-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

broker:  ## start the local RabbitMQ (with its management UI) when it is installed and down
	@scripts/ensure-broker

run: install broker  ## gateway on :8000 and one worker against the local broker
	@scripts/run-local

test: install broker
	$(PY) -m pytest $(PYTEST_ARGS)

test-cluster: install  ## starts a three-node RabbitMQ cluster here, stops a node under load
	$(PY) -m pytest -m cluster tests/test_cluster.py $(PYTEST_ARGS)

bench: $(BENCH_STAMP) broker  ## every benchmark, full size (about 45 minutes); results in bench/results/
	$(PY) -m bench

bench-quick: $(BENCH_STAMP) broker  ## the same, smaller, in about four minutes
	$(PY) -m bench --quick

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
