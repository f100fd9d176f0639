#!/usr/bin/env bash
# Creates .venv with everything Tessera needs. Idempotent: re-running only installs what changed.
#
# torch comes first, because what pip would pick for a bare "torch" differs by machine:
#  - a Python that already has torch (a GPU user's own build): the venv sees it and it is left alone;
#  - a machine with an NVIDIA driver and no torch: pip's default (CUDA) build;
#  - a CPU-only machine: exactly torch==2.13.0 (the CPU wheel). Anything looser makes pip fetch the
#    newest release with several GB of CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: using the torch that $PYTHON already has ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" torch==2.13.0
  fi
fi
# pip resolves the whole project again even when nothing changed (seconds, and the network for build
# isolation): skip it while pyproject.toml and this script are those last installed.
STAMP="$VENV/.tessera-installed"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "${PIP[@]}" -e ".[dev,quant,bench]"
  echo "$WANT" > "$STAMP"
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
