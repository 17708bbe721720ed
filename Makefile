# Two commands do all the set-up on a fresh machine:  make train   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench fuzz clean

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

clean:
	rm -rf runs .pytest_cache
