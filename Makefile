# Quick start: `make train-local` runs the main job on the embedded default;
# `make test` runs the test suite. Both install what they need first (idempotent).
VENV ?= .venv
BIN := $(VENV)/bin
TINY := tiny-models
# Each quick-start run gets its own output folder: a fresh run refuses one holding a run.
RUN_DIR ?= runs/local/$(shell date +%Y%m%d-%H%M%S)

.PHONY: install tiny-models train-local test test-fast lint

install:
	VENV=$(VENV) scripts/install.sh

tiny-models: install
	$(BIN)/spatialrl tiny-models $(TINY)

train-local: install
	$(BIN)/spatialrl train --config configs/local.yaml --set output_dir=$(RUN_DIR)

# Test files run on PYTEST_WORKERS processes (pytest-xdist), each file whole on one worker so
# that its module fixtures (a Ray instance, a service) are built once, in the order
# tests/conftest.py sets (slow files first): Ray tests mostly wait, so two share two cores.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST) $(PYTEST_ARGS)

# The developer tier: no Ray, no DeepSpeed, nothing marked slow (CI runs everything).
test-fast: install
	$(PYTEST) -m "not slow and not ray and not deepspeed" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src actors learners tests bench
