# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench serve clean

$(BIN)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) (3.11+) is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: $(BIN)/.installed  ## run `kassa demo` on the embedded default
	$(BIN)/kassa demo

test: $(BIN)/.installed  ## the whole test suite
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(BIN)/.installed
	$(BIN)/python bench/decision_latency.py --write-docs

serve: $(BIN)/.installed
	$(BIN)/kassa serve --catalog examples/catalog.yaml

clean:
	rm -rf $(VENV) .kassa .pytest_cache .mypy_cache .ruff_cache
