# Two commands do all the set-up on a fresh machine:  make train   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench clean

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

lint: setup
	$(BIN)/ruff check ffdist tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf runs .pytest_cache
