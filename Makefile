# tokenmeter: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

QUOTAD := $(BIN)/tokenmeter-quotad

.PHONY: setup demo test unit integration bench lint clean

# setup.py and the C source too: `pip install -e` compiles pipeline/_avrocol.c in place
$(STAMP): pyproject.toml setup.py pipeline/_avrocol.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# the quota server (Go): the worker runs it from the virtualenv's bin
$(QUOTAD): $(STAMP) $(wildcard quotad/*.go) quotad/go.mod quotad/go.sum
	@command -v go >/dev/null || { echo "setup: Go 1.26 is needed to build the quota server (quotad/)"; exit 1; }
	cd quotad && go build -trimpath -o ../$(QUOTAD) .

## setup: create .venv, install tokenmeter with its dev tools, build the quota server
setup: $(STAMP) $(QUOTAD)

## demo: local Kafka + embedded ClickHouse + worker + simulated traffic, then a summary
demo: setup
	$(BIN)/tokenmeter demo

## test: start a test Kafka broker, run unit + integration tests, stop the broker
test: setup
	$(BIN)/python scripts/run_tests.py

unit: setup
	$(BIN)/python -m pytest tests/unit -q

## bench: end-to-end benchmark on its own broker (tests/perf/bench_pipeline.py): the worker
##        on a live-shaped backlog of BENCH_EVENTS events (default 200000) vs the same-run
##        ceiling, a 10 % garbage mix, latency at 25,000 events/s offered, peak RSS and
##        per-stage CPU; JSON + logs in bench-results/, a table on stdout
##        (docs/performance.md). BENCH_ARGS passes options on, e.g. a 10-minute RSS soak:
##        make bench BENCH_ARGS="--soak-s 600"; make bench BENCH_EVENTS=1000000
BENCH_EVENTS ?= 200000
BENCH_ARGS ?=
bench: setup
	BENCH_EVENTS=$(BENCH_EVENTS) $(BIN)/python scripts/run_tests.py --bench $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf .tokenmeter-test .pytest_cache .mypy_cache .ruff_cache
