#!/usr/bin/env bash
# Context parallelism on a laptop CPU: one sequence of 16,384 tokens, every process held to 1 GiB of
# private memory (RLIMIT_DATA, via prlimit). One rank cannot hold it; two context-parallel ranks, each
# with half of the sequence (parallel.cp=2), train it. Run from the repository root after `make setup`:
#   bash examples/long_context_cpu.sh
# (python -m bench.long_context does the same for several lengths and prints a table: docs/long-context.md.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/long-context}
BUDGET=${BUDGET:-1073741824}  # bytes per process
# One sequence per step; freed memory goes back to the system at once, so the budget bounds live memory.
ARGS=(--config configs/debug.yaml training.steps=2 metrics.log_every=1 checkpoint.enabled=false
      model.max_seq_len=16384 training.seq_len=16384 training.local_batch_size=1 training.global_batch_size=1
      training.cpu_malloc=system data.prefetch=0 metrics.progress=off)
export MALLOC_MMAP_THRESHOLD_=65536
mkdir -p "$OUT"

echo "== 1. One rank, 16,384 tokens, 1 GiB: expected to run out of memory"
if prlimit --data="$BUDGET" "$PY" train.py "${ARGS[@]}" job.output_dir="$OUT/cp1" > "$OUT/cp1.log" 2>&1; then
  echo "it fit: this machine's allocator needs less than measured in docs/long-context.md"
else
  grep -m1 -o "can't allocate memory[^.]*" "$OUT/cp1.log" || tail -n 3 "$OUT/cp1.log"
fi

echo "== 2. Two context-parallel ranks, each with half of every sequence, the same 1 GiB each"
prlimit --data="$BUDGET" "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 train.py "${ARGS[@]}" \
  parallel.cp=2 job.output_dir="$OUT/cp2" | grep -E "^(training|step)"
