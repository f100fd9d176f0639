#!/usr/bin/env bash
# GPU acceptance in one command, on a machine with one CUDA GPU and no network (bench/acceptance.py says
# what it runs). Installs nothing from a registry: the wheels `make gpu-wheels` put in .whl/ beside the tree
# (torchao, omegaconf, datasets and their missing needs; bitsandbytes when built with BNB=1) go into a
# folder of their own on PYTHONPATH, over the machine's own torch and transformers.
#   bash scripts/gpu_acceptance.sh [--dry] [--budget SECONDS] [--only STEP,...] [--out DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ " $* " != *" --dry "* ]] && nvidia-smi -L >/dev/null 2>&1 && compgen -G ".whl/*.whl" >/dev/null; then
  SITE="${TMPDIR:-/tmp}/tessera-gpu-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
# Our packages from the tree itself (the GPU machine's python has no editable install of them).
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "$PY" -m bench.acceptance "$@"
