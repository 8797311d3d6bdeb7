# rtserve: `make serve` runs the demo, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint venv clean bench bench-quick

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

serve: | $(PY)
	$(PY) -m pip install -q -e .
	$(VENV)/bin/rtserve examples.hello:app --bind 127.0.0.1:8080

test: $(STAMP)
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl)
	@command -v openssl >/dev/null || (apt-get update -qq && apt-get install -y -qq openssl)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py --quick
