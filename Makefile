# rtserve: `make serve` runs the demo (the fraud-scoring reference service), `make test`
# runs the whole suite (pure Python, then the compiled build), `make load` drives the demo
# with stalls on (RATE=500 DURATION=10), `make compiled` builds .venv-compiled.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RATE ?= 500
DURATION ?= 10
FRAUD_STAMP := $(VENV)/.installed-fraud

# The compiled build (docs/compiled.md): mypyc compiles the hot modules (setup.py's
# COMPILED) into a second venv, installed, not editable, so that `import rtserve` there
# loads the C extensions. Rebuilt when any source changes.
CVENV := .venv-compiled
CPY := $(CVENV)/bin/python
CSTAMP := $(CVENV)/.installed

.PHONY: serve load fraud-bench test lint venv clean bench bench-quick callgrind compiled compiled-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# RTSERVE_COMPILE=1 only for the build: pip's isolated build environment gets mypy (mypyc)
# from setup.py; gcc and the Python headers compile the C it generates.
$(CSTAMP): pyproject.toml setup.py $(wildcard src/rtserve/*.py)
	@$(MAKE) --no-print-directory compiled-deps
	test -x $(CPY) || $(PYTHON) -m venv $(CVENV)
	$(CPY) -m pip install -q --upgrade pip
	RTSERVE_COMPILE=1 $(CPY) -m pip install -q '.[test]'
	touch $(CSTAMP)

# What the C compile needs beyond Python: gcc and the Python headers (apt-get if missing).
compiled-deps:
	@command -v gcc >/dev/null || (apt-get update -qq && apt-get install -y -qq gcc)
	@$(PYTHON) -c "import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
		|| (apt-get update -qq && apt-get install -y -qq python3-dev)

compiled: $(CSTAMP)

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
	@$(MAKE) --no-print-directory compiled-deps
	@# The compiled build (about 2 CPU-minutes of gcc) runs niced in the background while
	@# the pure-Python pass runs, which mostly waits on sockets and child processes; then
	@# the same suite runs against it. --tb=native: pytest's own traceback display
	@# re-parses source for every frame, which crashed on Python 3.11 for compiled frames.
	@set -e; \
	nice -n 10 $(MAKE) --no-print-directory compiled > $(CVENV).log 2>&1 & build=$$!; \
	trap 'kill $$build 2>/dev/null || true' EXIT; \
	$(VENV)/bin/ruff check .; \
	$(VENV)/bin/mypy; \
	$(PY) -m pytest -q -p no:cacheprovider; \
	echo "waiting for the compiled build ($(CVENV).log)"; \
	if ! wait $$build; then tail -50 $(CVENV).log; echo "make compiled failed"; exit 1; fi; \
	RTSERVE_EXPECT_COMPILED=1 $(CPY) -m pytest -q -p no:cacheprovider --tb=native

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(CVENV) build *.egg-info src/*.egg-info

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
