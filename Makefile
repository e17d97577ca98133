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

# The test files run on two pytest-xdist workers, each file whole on one worker (its module
# fixtures built once), the longest files first (tests/conftest.py). The Ray tests mostly wait,
# so two workers share the two cores well. Each test Ray instance is a LocalRayHead of its
# own (actors/local_cluster.py), so the two workers' clusters never meet. PYTEST_WORKERS=0
# runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q
XDIST = -n $(1) --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST) $(if $(filter-out 0,$(PYTEST_WORKERS)),$(call XDIST,$(PYTEST_WORKERS))) $(PYTEST_ARGS)

# The developer tier: no Ray, no DeepSpeed, nothing marked slow (CI runs everything).
test-fast: install
	$(PYTEST) $(call XDIST,2) -m "not slow and not ray and not deepspeed" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src actors learners tests bench
