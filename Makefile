# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make test` runs the test files in this many processes (pytest-xdist, a file per process at a time: a file's
# tests share their servers and fixtures as they did serially). 2 on this 2-core machine: 17:11 -> 9:51 and 8:52.
TEST_WORKERS ?= 3

.PHONY: demo test lint bench serve clean schemathesis

$(BIN)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) (3.11+) is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: $(BIN)/.installed  ## run `kassa demo` on the embedded default
	$(BIN)/kassa demo

test: $(BIN)/.installed  ## the whole test suite
	@# DuckDB's bindings print nanobind "leaked function" noise at interpreter exit; drop it so the
	@# suite's own summary is the last thing printed (pipefail keeps pytest's exit code).
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile 2>&1 \
		| grep -vE '^(nanobind: | - leaked |  - leaked | - \.\.\. skipped remainder|See https://nanobind)'; \
		test $${PIPESTATUS[0]} -eq 0

schemathesis: $(BIN)/.installed  ## the full Schemathesis run: every operation, each key kind, >= 10,000 requests (~2 min)
	SCHEMATHESIS_MAX_EXAMPLES=150 SCHEMATHESIS_MIN_REQUESTS=10000 $(BIN)/pytest tests/test_schemathesis.py 2>&1 \
		| grep -vE '^(nanobind: | - leaked |  - leaked | - \.\.\. skipped remainder|See https://nanobind)'; \
		test $${PIPESTATUS[0]} -eq 0

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(BIN)/.installed  ## every benchmark; each rewrites its section of docs/benchmarks.md (~60 min)
	$(BIN)/python bench/decision_latency.py --write-docs
	$(BIN)/python bench/demo_learning.py --write-docs
	$(BIN)/python bench/startup.py --write-docs
	$(BIN)/python bench/feature_reads.py --write-docs
	$(BIN)/python bench/materialize.py --write-docs
	$(BIN)/python bench/streaming.py --write-docs
	$(BIN)/python bench/learning.py --write-docs
	$(BIN)/python bench/retrain.py --write-docs
	$(BIN)/python bench/model_swap.py --write-docs
	$(BIN)/python bench/rollout.py --write-docs
	$(BIN)/python bench/ope.py --write-docs
	$(BIN)/python bench/webhooks.py --write-docs
	$(BIN)/python bench/catalog_sync.py --write-docs
	$(BIN)/python bench/snippet_paint.py --write-docs
	$(BIN)/python bench/loadtest_suite.py --write-docs
	$(BIN)/python bench/outage.py --write-docs
	$(BIN)/python bench/topology.py --workers 1,2 --write-docs
	$(BIN)/python bench/topology_events.py --rates 10000,20000 --repeats 3 --write-docs
	$(BIN)/python bench/decision_latency.py --backends embedded,redis --rates 600,1000 --runs 3 \
		--features examples/features.yaml --write-docs

serve: $(BIN)/.installed
	$(BIN)/kassa serve --catalog examples/catalog.yaml

clean:
	rm -rf $(VENV) .kassa .pytest_cache .mypy_cache .ruff_cache
