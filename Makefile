# Two commands do all the set-up on a fresh machine:  make train   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench fuzz gpu-wheels gpu-check clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent). pip, not uv/poetry: pip takes
# torch from this machine's local copy instead of downloading several GB.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

train: setup
	$(BIN)/python -m ffdist.train recipes/digits.yaml $(ARGS)

test: setup
	$(BIN)/ruff check ffdist tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzzer's long run (tests/fuzz, random cases; about an hour on 2 cores). The suite runs
# the same tests in a fixed, ~1-minute profile. FUZZ_SCALE=0.1 for a quicker look.
fuzz: setup
	FFDIST_FUZZ=long FFDIST_FUZZ_SCALE=$(or $(FUZZ_SCALE),1) $(BIN)/python -m pytest tests/fuzz -q \
		-p no:cacheprovider --hypothesis-show-statistics --timeout 14400 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check ffdist tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run_all

# GPU machines: `make gpu-wheels` here (network), copy the repo there, `make gpu-check` there
# (its python3, no venv). `make gpu-check PY=.venv/bin/python ARGS=--cpu-dry-run` tries the
# script on a CPU. See docs/performance.md.
gpu-wheels:
	PIP=$(BIN)/pip benchmarks/gpu_wheels.sh

gpu-check:
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
