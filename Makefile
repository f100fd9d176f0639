# The two commands of the README. Each sets everything up first (scripts/setup.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test gpu-wheels

setup:
	@bash scripts/setup.sh

# Trains the default config (configs/debug.yaml) on this machine's CPU or GPU.
train: setup
	$(PY) train.py --config configs/debug.yaml

# The whole suite: unit, distributed (real gloo ranks), end to end; the 15 slowest tests last.
test: setup
	$(PY) -m pytest -q --durations=15 tests

# .whl/: the wheels the lent GPU machine lacks, for scripts/gpu_acceptance.sh (BNB=1 adds bitsandbytes).
gpu-wheels:
	@bash scripts/gpu_wheels.sh
