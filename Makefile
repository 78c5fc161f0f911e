# apdask: `make demo` runs the main job, `make test` runs lint and the tests, `make docs`
# builds the documentation site.
# Each creates or refreshes .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format venv clean bench docs test-brokers

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,postgres,jobqueue]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/apdask demo

# ruff, the import-layer contract (pyproject.toml [tool.importlinter]) and mypy.
lint: $(STAMP)
	$(BIN)/ruff check apdask tests benchmarks
	$(BIN)/ruff format --check apdask tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format apdask tests benchmarks
	$(BIN)/ruff check --fix apdask tests benchmarks

# The concurrency tests fork hundreds of writer processes from the test process. They
# run in a process of their own: scipy.fft's thread pool, started by any earlier test
# that transforms with workers > 1, joins its threads in a fork handler, and that join
# can hang under load (a pocketfft race, seen once at the 86th of 189 forks).
CONCURRENCY := tests/ppdb/test_ppdb_concurrency.py

test: lint
	$(BIN)/python -m pytest -m "not slow" -q $(CONCURRENCY)
	$(BIN)/python -m pytest -m "not slow" -q --ignore=$(CONCURRENCY)

# Brokers' consumer code (Ampel, Pitt-Google, fink-client, Confluent's schema-registry
# deserializer) on our alerts.  A venv of its own: pittgoogle-client pins
# python-dateutil<3, which the main environment's packages do not accept.
BROKERS := .venv-brokers
BROKERS_STAMP := $(BROKERS)/.installed

$(BROKERS_STAMP): pyproject.toml
	test -x $(BROKERS)/bin/python || $(PYTHON) -m venv $(BROKERS)
	$(BROKERS)/bin/python -m pip install --quiet --upgrade pip
	$(BROKERS)/bin/python -m pip install --quiet -e ".[test,broker-clients]"
	touch $(BROKERS_STAMP)

test-brokers: $(BROKERS_STAMP)
	$(BROKERS)/bin/python -m pytest -q -p no:cacheprovider tests/services/test_brokers.py

# The documentation site (Sphinx, docs/conf.py) in docs/_build/html; warnings are errors.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/apdask bench

clean:
	rm -rf $(VENV) $(BROKERS) apdask-demo .pytest_cache .ruff_cache docs/_build docs/generated docs/notebooks docs/jupyter_execute
