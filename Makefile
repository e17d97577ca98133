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

# PYTEST_WORKERS=2 runs test files on two pytest-xdist workers, each file whole on one worker
# (its module fixtures built once), slow files first (tests/conftest.py): 19-20 min of pytest
# instead of 27.5 on 2 cores. Off for `make test` (and CI) for now: two Ray instances on one
# machine confuse Ray parts that look for "the" cluster themselves (Ray Train's placement-group
# cleaner failed with "Found multiple active Ray instances"), and each of two parallel
# clean-clone runs had a Ray test fail. The fast tier starts no Ray and always runs parallel.
PYTEST_WORKERS ?= 0
PYTEST := $(BIN)/python -m pytest -q
XDIST = -n $(1) --dist loadfile --no-loadscope-reorder

test: install
	$(PYTEST) $(if $(filter-out 0,$(PYTEST_WORKERS)),$(call XDIST,$(PYTEST_WORKERS))) $(PYTEST_ARGS)

# The developer tier: no Ray, no DeepSpeed, nothing marked slow (CI runs everything).
test-fast: install
	$(PYTEST) $(call XDIST,2) -m "not slow and not ray and not deepspeed" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src actors learners tests bench
