#!/usr/bin/env bash
# .whl/: the wheels the lent GPU machine lacks (../shared/notes/gpu-machine.md: Python 3.12, torch 2.11, no
# network), for scripts/gpu_acceptance.sh. Pure-Python or manylinux x86-64 wheels for CPython 3.12, without
# their dependencies (the machine has the rest). About 8 MB; BNB=1 adds bitsandbytes (about 43 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${WHL_DIR:-.whl}"
mkdir -p "$DEST"
PLATFORMS=(--platform any --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
WANT=(torchao==0.18.0 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 termcolor==3.3.0
      # compressed-tensors, for transformers to load the quantized exports (and what it imports)
      compressed-tensors==0.20.1 loguru==0.7.3 psutil==7.2.2 pydantic==2.14.4 pydantic-core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5)
[ "${BNB:-0}" = 1 ] && WANT+=(bitsandbytes==0.50.2)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WANT[@]}"
# HQQ publishes no wheel: build its pure-Python one here.
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST" hqq==0.2.8.post1
du -sh "$DEST" && ls "$DEST"
