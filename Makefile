# Two commands do all the set-up on a fresh machine:  make train   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test test-all lint bench fuzz gpu-wheels gpu-check clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent). pip, not uv/poetry: pip takes
# torch from this machine's local copy instead of downloading several GB.
# One line per phase; pip's own output (build-backend banners and warnings) goes to
# $(SETUP_LOG), whose last lines are shown, with the phase's name, when a phase fails.
SETUP_LOG := $(VENV)/setup.log
TORCH_NOTE := (a first run downloads them: up to ~3 GB with the CUDA libraries on Linux, \
a few minutes; a pip cache or local wheels make it quick)

$(STAMP): pyproject.toml
	@start=$$(date +%s); \
	if ! test -x $(BIN)/python; then \
	  echo "make setup: creating $(VENV) with $$($(PY) --version 2>/dev/null) ($(PY))"; \
	  $(PY) -m venv $(VENV) || { echo "make setup: FAILED creating $(VENV) with $(PY) -m venv" \
	    "(on Debian/Ubuntu: apt install python3-venv; or PY=/path/to/python3.10+)" >&2; exit 1; }; \
	fi; \
	phase() { what="$$1"; note="$$2"; shift 2; echo "make setup: $$what$${note:+ $$note}"; \
	  "$$@" >$(SETUP_LOG) 2>&1 && return 0; \
	  echo "make setup: FAILED while $$what; the end of pip's output ($(SETUP_LOG)):" >&2; \
	  tail -n 25 $(SETUP_LOG) >&2; exit 1; }; \
	phase "upgrading pip" "" $(BIN)/pip install --quiet --upgrade pip; \
	phase "installing torch and torchvision" "$(TORCH_NOTE)" $(BIN)/pip install --quiet "torch>=2.4" "torchvision>=0.19"; \
	phase "installing ffdist and its extras" "(deepspeed, accelerate, tensorboard, test tools)" \
	  $(BIN)/pip install --quiet -e ".[test]"; \
	touch $(STAMP); \
	echo "make setup: done in $$(( $$(date +%s) - start )) s; use it with" \
	  ". $(VENV)/bin/activate (then ffdist ...) or $(BIN)/ffdist ..."

train: setup
	$(BIN)/python -m ffdist.train recipes/digits.yaml $(ARGS)

# The fast tier (12.7 minutes on 2 CPU cores, 2026-12-06; target 15): every path once.
# test-all adds the tests marked `extended`, second configurations of covered paths
# (30 minutes in all).
test: setup
	$(BIN)/ruff check ffdist tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not extended" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/ruff check ffdist tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzzer's long run (tests/fuzz, random cases; ~15 min on 2 cores: benchmarks/RESULTS.md). test-all
# runs the same tests in a fixed, ~1-minute profile. FUZZ_SCALE=0.1 for a quicker look.
fuzz: setup
	FFDIST_FUZZ=long FFDIST_FUZZ_SCALE=$(or $(FUZZ_SCALE),1) $(BIN)/python -m pytest tests/fuzz -q \
		-p no:cacheprovider --hypothesis-show-statistics --timeout 14400 $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check ffdist tests benchmarks
	$(BIN)/lint-imports --no-cache

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
