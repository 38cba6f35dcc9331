# One entry point for a fresh machine: every target creates .venv if missing and installs into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-full lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev,cluster]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/celli-scale demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q --durations=25

# Quick suite (tiny sizes, each benchmark once): a regression smoke test, 7-9 min on 2 cores.
bench: $(STAMP)
	$(BIN)/asv machine --yes --machine local >/dev/null
	CELLI_BENCH_QUICK=1 $(BIN)/asv run --python=same --machine local --quick --show-stderr

# Full sizes (long: select families with BENCH="PME|Ewald" etc.).
BENCH ?= .
bench-full: $(STAMP)
	$(BIN)/asv machine --yes --machine local >/dev/null
	$(BIN)/asv run --python=same --machine local --bench "$(BENCH)" --show-stderr

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check celli_scale tests bench

clean:
	rm -rf $(VENV) .asv build *.egg-info
