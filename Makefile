# The two commands of the README, plus the pieces they are made of.
#   make demo   set up .venv if needed, then run the whole pipeline on the embedded teacher
#   make test   set up .venv if needed, then run the whole test suite
.PHONY: setup demo test lint bench clean

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/fusion-cache demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --durations=15

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_build.py

clean:
	rm -rf demo-out .pytest_cache .ruff_cache
