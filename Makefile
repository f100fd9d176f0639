# The two commands of the README. Each sets everything up first (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test gpu-wheels

setup:
	@bash scripts/setup.sh

# Trains the default config (configs/debug.yaml) on this machine's CPU or GPU.
train: setup
	$(PY) train.py --config configs/debug.yaml

# The whole suite: unit, distributed (real gloo ranks), end to end; the 15 slowest tests last. Its files
# run side by side, one per core (pytest-xdist; each file whole on one worker, so that a module's shared
# runs happen once): serially they kept 1.3 of 2 cores busy, waiting on gloo, Slurm and process start-up.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

# .whl/: the wheels the lent GPU machine lacks, for scripts/gpu_acceptance.sh (BNB=1 adds bitsandbytes).
gpu-wheels:
	@bash scripts/gpu_wheels.sh
