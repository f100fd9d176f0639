#!/usr/bin/env bash
# Pretraining walk-through on the default corpus (this Python's standard library source, byte tokenizer).
# Run from the repository root after `make setup`:  bash examples/pretrain_stdlib.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/walkthrough}

echo "== 1. Plan: sizes and per-rank memory, without allocating anything"
$PY train.py --config configs/debug.yaml --dry-run --world-size 2 | tail -n 16

echo "== 2. Check the run in one process, then train 100 steps on two ranks (FSDP2 over gloo on CPU, NCCL on GPUs), exporting at the end"
$PY train.py --config configs/debug.yaml --check --world-size 2 training.steps=100 job.output_dir="$OUT" export.hf=true
$PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py --config configs/debug.yaml \
  training.steps=100 job.output_dir="$OUT" export.hf=true export.dtype=float32

echo "== 3. What the run wrote"
ls "$OUT" "$OUT/export/hf"
echo "TensorBoard: $PY -m tensorboard.main --logdir $OUT/tensorboard"

echo "== 4. The export is a plain Hugging Face checkpoint: generate with transformers"
$PY - "$OUT/export/hf" <<'PY'
import sys, torch
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1]).eval()
prompt = torch.tensor([[256] + list(b"def ")])  # 256 = BOS of the byte tokenizer
torch.manual_seed(0)
out = model.generate(prompt, max_new_tokens=120, do_sample=True, temperature=0.8, top_k=40)
print(bytes(t for t in out[0, 1:].tolist() if t < 256).decode("utf-8", "replace"))
PY
