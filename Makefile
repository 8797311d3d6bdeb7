# rtserve: `make serve` runs the demo (the fraud-scoring reference service), `make test`
# runs the whole suite, `make load` drives the demo with stalls on (RATE=500 DURATION=10).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RATE ?= 500
DURATION ?= 10
FRAUD_STAMP := $(VENV)/.installed-fraud

.PHONY: serve load fraud-bench test lint venv clean bench bench-quick callgrind

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(FRAUD_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[fraud]'
	touch $(FRAUD_STAMP)

# The fraud-scoring reference service (examples/fraud) with the in-process feature store;
# it also answers the first demo's /hello, /slow and /echo; the live page is /dashboard.
serve: $(FRAUD_STAMP)
	$(VENV)/bin/rtserve examples.fraud:app --bind 127.0.0.1:8080 --dashboard --shed-with-fallback

# Open-loop load on 127.0.0.1:8080 (started for the run if `make serve` is not running),
# 1% of feature fetches stalling 200 ms; a line per second.
load: $(FRAUD_STAMP)
	$(PY) bench/fraud_load.py --port 8080 --rate $(RATE) --duration $(DURATION)

# rtserve (1 and 2 processes) against FastAPI on uvicorn, open loop at 1x and 2x capacity.
fraud-bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/fraud_bench.py

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

# Instructions per request (callgrind; exact on a busy machine): native A, WSGI A, B.
callgrind: $(STAMP)
	$(PY) bench/callgrind_server.py --repeat 2
	$(PY) bench/callgrind_server.py --app wsgi --repeat 2
	$(PY) bench/callgrind_server.py --workload B --repeat 2
